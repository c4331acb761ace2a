"""Writing output files so that an interrupted run never leaves a half-written file that looks whole.

    from pipeline.files import atomic_write_text, check_new_output
    check_new_output(path, force)                 # before any work: an existing output needs --force
    atomic_write_text(path, json.dumps(...))      # temp file beside it, fsync, os.replace

The one place every command of both packages (pipeline and massreg) writes through.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, IO

from pipeline.errors import UserError


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[IO], object], mode: str = "wb") -> Path:
    """Call write(fh) on a temp file beside `path`, fsync, then os.replace it into place.

    An interrupted write leaves only a hidden `.NAME.*.tmp`, never a half-written file under `path`, and
    removes that temporary on the way out (Ctrl-C, a stop signal raised as KeyboardInterrupt, a full disk)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, mode) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` atomically (see atomic_write)."""
    return atomic_write(path, lambda fh: fh.write(text), mode="w")


def check_new_output(path: str | os.PathLike, force: bool, *, label: str | None = None) -> None:
    """UserError (one line) when `path` exists and --force was not given; `label` names it as the user typed
    it (e.g. "--out x.csv"), else the path."""
    if Path(path).exists() and not force:
        raise UserError(f"{label or path} exists; pass --force to replace it")


def os_cause(exc: OSError) -> str:
    """An OSError as one short line: '[Errno 28] No space left on device', not a library's paragraph."""
    if exc.errno:
        return f"[Errno {exc.errno}] {os.strerror(exc.errno)}"
    return " ".join(str(exc).split()) or type(exc).__name__
