"""Atomic file writes and the per-output-directory run lock.

Every file the pipeline writes goes through :func:`atomic_write` (or one of its
wrappers) so that a reader, or a run resumed after a crash, never sees a
half-written CSV, JSON or checkpoint: the bytes land in a temporary file in the
same directory and ``os.replace`` moves them into place, which POSIX and Windows
both guarantee to be atomic within one filesystem.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import pandas as pd


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it onto ``path`` on success.

    On any exception the temporary file is removed and ``path`` is untouched.
    ``fsync=False`` skips flushing to disk before the rename: still atomic for
    readers, but a power cut may leave an empty file. Only for files that can be
    re-derived (cache entries), where the fsync would dominate the cost.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if fsync:
            with open(tmp_path, "rb+") as fh:  # data on disk before the rename makes it visible
                os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write(path: str | os.PathLike, writer: Callable[[Path], Any], fsync: bool = True) -> Path:
    """Call ``writer(tmp_path)`` and atomically move the result onto ``path``."""
    with atomic_path(path, fsync=fsync) as tmp:
        writer(tmp)
    return Path(path)


def write_csv(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a DataFrame as CSV (no index) atomically."""
    return atomic_write(path, lambda tmp: df.to_csv(tmp, index=False))


def write_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write JSON (indented, sorted keys, non-JSON types via ``str``) atomically."""

    def _write(tmp: Path) -> None:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")

    return atomic_write(path, _write)


def write_text(text: str, path: str | os.PathLike) -> Path:
    """Write a text file atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


class LockError(RuntimeError):
    """Another live process holds the output directory."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM
    return True


class RunLock:
    """One run per output directory, via an exclusive-create lock file.

    The file holds ``host:pid``. A lock whose process is dead (on this host) is
    stale: it is taken over, and the takeover is reported. Use as a context
    manager; re-entrant within one process (the driver holds it while calling
    stage ``main`` functions, which take it too).
    """

    _held: dict[Path, int] = {}

    def __init__(self, directory: str | os.PathLike, name: str = ".run.lock") -> None:
        self.path = Path(directory).resolve() / name
        self.took_over_from: str | None = None

    def _owner(self) -> str:
        return f"{socket.gethostname()}:{os.getpid()}"

    def acquire(self) -> None:
        if RunLock._held.get(self.path, 0):
            RunLock._held[self.path] += 1
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.path.read_text().strip() if self.path.exists() else ""
                host, _, pid = holder.rpartition(":")
                if host == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid)):
                    self.took_over_from = holder
                    with contextlib.suppress(FileNotFoundError):
                        self.path.unlink()
                    continue
                if not holder:  # lock being written right now, or emptied: treat as held
                    holder = "unknown"
                raise LockError(
                    f"{self.path.parent}: another run (PID {pid or holder}, {holder}) is using this "
                    f"output directory; wait for it or remove {self.path} if that process is gone"
                ) from None
            with os.fdopen(fd, "w") as fh:
                fh.write(self._owner())
            RunLock._held[self.path] = 1
            return

    def release(self) -> None:
        count = RunLock._held.get(self.path, 0)
        if count > 1:
            RunLock._held[self.path] = count - 1
            return
        RunLock._held.pop(self.path, None)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
