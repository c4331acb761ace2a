"""The command layer shared by every entry point of both packages (pipeline's and massreg's).

    @command(epilog=...)                 # click.command with the house settings (-h, 110 columns)
    @force_option("Replace OUTPUT if it exists.")
    def main(...):
        with user_errors():              # UserError / OSError -> one line `Error: ...`, exit status 1
            ...

A command's body stays thin: parse, build the entry point's config dataclass, call the pure function.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import click

from pipeline.errors import UserError

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


def command(**kwargs):
    """click.command with the house context settings (both -h and --help; help text up to 110 columns)."""
    return click.command(context_settings=CONTEXT_SETTINGS, **kwargs)


def force_option(help: str):
    """--force, the one flag that lets a command replace an existing output."""
    return click.option("--force", is_flag=True, help=help)


@contextmanager
def user_errors() -> Iterator[None]:
    """A UserError (or an OSError from opening an input) becomes click's one-line `Error: MESSAGE` and exit
    status 1; everything else (a bug) keeps its traceback."""
    try:
        yield
    except (UserError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
