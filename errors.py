"""The errors that are the user's to fix, and the scripts' entry point that reports them.

A bad CSV row, a missing image, a foreign checkpoint, a held lock, missing pretrained
weights, a full disk, an unwritable output path or a bad command-line option each carry
a one-line message naming the file (and row) or option at fault; a traceback would only
bury it. Anything else is a bug and keeps its traceback.

This module defines those exception classes and depends on nothing else in the project,
so every module can raise them and every script can report them without importing the
heavy ones (torch, timm) first.
"""
from __future__ import annotations

import argparse
import errno
import signal
import sys
from typing import Any, Callable, Iterable, NoReturn


class DataError(ValueError):
    """Bad input. The message is one line: ``<file>:<row>: <reason>`` (or ``<file>: <reason>``).

    When a DataLoader worker raises one, PyTorch re-creates it in the main
    process with the worker's traceback as the message; the constructor reduces
    that back to the original one-line message, so no worker traceback reaches
    the user.
    """

    def __init__(self, message: str = "") -> None:
        super().__init__(_worker_message(str(message)))

    @classmethod
    def at(cls, file: Any, row: Any, reason: str) -> "DataError":
        """``<file>:<row>: <reason>``; ``row=None`` for problems of a whole file."""
        return cls(f"{file}: {reason}" if row is None else f"{file}:{row}: {reason}")


def _worker_message(message: str) -> str:
    if "Original Traceback" in message:
        lines = [ln for ln in message.strip().splitlines() if ln.strip()]
        last = lines[-1] if lines else message
        marker = "DataError: "
        return last[last.index(marker) + len(marker):] if marker in last else last
    return " ".join(message.split("\n")).strip()


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be used; the message is one line naming the file."""


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights were asked for and cannot be obtained; says how to provide them."""


class ResumeError(RuntimeError):
    """The saved state cannot be continued with the current settings."""


class LockError(RuntimeError):
    """Another live process holds the output directory."""


class DiskFullError(OSError):
    """The disk (or quota) filled up while a file was written; the message names the file."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, as a cluster's scheduler sends it to preempt a job (or ``kill`` does).

    A KeyboardInterrupt, so that everything that handles Ctrl-C handles it the same way:
    the trainer keeps the epoch in progress and says how to resume, the lock is released,
    DataLoader workers leave quietly. Only :func:`exit_status` tells the two apart.
    """


def exit_status(exc: KeyboardInterrupt) -> int:
    """The shell's status for an interruption: 128 + the signal's number (130 for Ctrl-C,
    143 for SIGTERM)."""
    return 128 + int(signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)


# the statuses exit_status gives: a child process that exited with one was interrupted
INTERRUPTED_STATUSES: frozenset[int] = frozenset({128 + int(signal.SIGINT), 128 + int(signal.SIGTERM)})


def _raise_terminated(signum: int, frame: Any) -> NoReturn:
    raise Terminated


def handle_sigterm() -> None:
    """Make SIGTERM raise :class:`Terminated` in the main thread, unless SIGTERM has a handler
    or was set to be ignored by whoever started the process."""
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _raise_terminated)


EXPECTED_ERRORS: tuple[type[BaseException], ...] = (
    DataError, CheckpointError, PretrainedWeightsError, LockError, FileNotFoundError, ResumeError, DiskFullError)
# errno values that mean "the disk (or quota) is full"
FULL_ERRNOS: frozenset[int] = frozenset({errno.ENOSPC, errno.EDQUOT})
# Operating-system errors that the user fixes (space, permissions, a path that is a folder
# or under a file), wherever in a chain of exceptions they surface.
USER_ERRNOS: frozenset[int] = FULL_ERRNOS | frozenset(
    {errno.EROFS, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR})


def os_error_in_chain(exc: BaseException | None, errnos: Iterable[int]) -> OSError | None:
    """The first ``OSError`` with one of ``errnos`` in ``exc``'s chain (itself, then its
    cause or context), if any.

    Writers report a full disk in different ways: Python file writes raise the OSError,
    ``torch.save`` raises a RuntimeError whose context holds it.
    """
    wanted = set(errnos)
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in wanted:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def expected(exc: BaseException) -> BaseException | None:
    """The error to report in one line for ``exc`` (itself, or the user-fixable OSError
    behind it), or None when ``exc`` is a bug that deserves its traceback."""
    if isinstance(exc, EXPECTED_ERRORS):
        return exc
    return os_error_in_chain(exc, USER_ERRNOS)


def one_line(exc: BaseException) -> str:
    """The one-line message of an expected error."""
    if isinstance(exc, OSError) and not isinstance(exc, DiskFullError) and exc.strerror:
        where = exc.filename if exc.filename is not None else ""
        return f"{where}: {exc.strerror}" if where else exc.strerror
    return " ".join(str(exc).split("\n")).strip() or type(exc).__name__


def _parse_error(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    print(f"error: {parser.prog}: {message} (see --help)", file=sys.stderr, flush=True)
    raise SystemExit(1)


def run(main: Callable[[argparse.Namespace], Any], parser: argparse.ArgumentParser) -> None:
    """Parse the command line, call ``main``; an expected error exits 1 with its one line.

    Bad options (argparse's own checks and the ``type=`` validators) are reported the
    same way, before any work starts. SIGTERM is handled like Ctrl-C (:class:`Terminated`).
    """
    handle_sigterm()
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
