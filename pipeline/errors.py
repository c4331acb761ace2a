"""The one user-error class of the project. Every error a user can fix (bad input, an option that does not
fit, an output that exists, a file that cannot be written) derives from UserError, and the command layer
(pipeline.cli.run_command) turns it into one line `Error: ...` and exit status 1. Anything else is a bug and
keeps its traceback."""
from __future__ import annotations


class UserError(Exception):
    """A one-line message that names the file, row or option and says what to do."""
