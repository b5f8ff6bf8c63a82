"""The errors that are the user's to fix, and the scripts' entry point that reports them.

A bad CSV row, a missing image, a foreign checkpoint, a held lock, missing pretrained
weights, a full disk, an unwritable output path or a bad command-line option each carry
a one-line message naming the file (and row) or option at fault; a traceback would only
bury it. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import errno
import sys
from typing import Any, Callable, NoReturn

import io_utils
from engine import ResumeError
from io_utils import LockError
from models import CheckpointError, PretrainedWeightsError
from unified_dataset import DataError

EXPECTED_ERRORS: tuple[type[BaseException], ...] = (
    DataError, CheckpointError, PretrainedWeightsError, LockError, FileNotFoundError, ResumeError,
    io_utils.DiskFullError)
# Operating-system errors that the user fixes (space, permissions, a path that is a folder
# or under a file), wherever in a chain of exceptions they surface.
USER_ERRNOS: frozenset[int] = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR})


def expected(exc: BaseException) -> BaseException | None:
    """The error to report in one line for ``exc`` (itself, or the user-fixable OSError
    behind it), or None when ``exc`` is a bug that deserves its traceback."""
    if isinstance(exc, EXPECTED_ERRORS):
        return exc
    return io_utils.os_error_in_chain(exc, USER_ERRNOS)


def one_line(exc: BaseException) -> str:
    """The one-line message of an expected error."""
    if isinstance(exc, OSError) and not isinstance(exc, io_utils.DiskFullError) and exc.strerror:
        where = exc.filename if exc.filename is not None else ""
        return f"{where}: {exc.strerror}" if where else exc.strerror
    return " ".join(str(exc).split("\n")).strip() or type(exc).__name__


def _parse_error(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    print(f"error: {parser.prog}: {message} (see --help)", file=sys.stderr, flush=True)
    raise SystemExit(1)


def run(main: Callable[[argparse.Namespace], Any], parser: argparse.ArgumentParser) -> None:
    """Parse the command line, call ``main``; an expected error exits 1 with its one line.

    Bad options (argparse's own checks and the ``type=`` validators) are reported the
    same way, before any work starts.
    """
    parser.error = lambda message: _parse_error(parser, message)  # type: ignore[method-assign]
    args = parser.parse_args()
    try:
        main(args)
    except Exception as exc:
        err = expected(exc)
        if err is None:
            raise
        print(f"error: {one_line(err)}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
