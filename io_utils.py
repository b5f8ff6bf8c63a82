"""File I/O: atomic writes, the per-output-directory run lock, and file work on threads.

Every file the pipeline writes goes through :func:`atomic_write` (or one of its
wrappers) so that a reader, or a run resumed after a crash, never sees a
half-written CSV, JSON or checkpoint: the bytes land in a temporary file in the
same directory and ``os.replace`` moves them into place, which POSIX and Windows
both guarantee to be atomic within one filesystem.

A process killed while writing (SIGKILL, power cut) leaves its temporary file
behind, ``.<name>.<8 random characters>.tmp``; the next run that takes the
directory's lock removes such orphans (:func:`remove_orphan_temps`), since no
other run can be writing there then. A full disk while writing is reported as
:class:`DiskFullError`, one line naming the file; the previous file is kept.
"""
from __future__ import annotations

import argparse
import contextlib
import enum
import errno
import itertools
import json
import math
import os
import re
import signal
import socket
import tempfile
import threading
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd

import columns
from errors import FULL_ERRNOS, DiskFullError, LockError, os_error_in_chain

# Names of temporary files this module (and the driver's torchrun result file) creates:
# tempfile.mkstemp puts 8 characters of [a-z0-9_] between prefix and suffix.
ORPHAN_PATTERNS = (re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$"), re.compile(r"^\.stage\d+_result\.[a-z0-9_]{8}\.json$"))


def default_workers() -> int:
    """The cores this process may run on: threads or processes for image work (OpenCV and
    zlib release the GIL, so threads scale too)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def run_threaded(fn: Callable[[Any], Any], items: Sequence[Any], workers: int,
                 on_result: Callable[[int, Any], None], chunksize: int = 1) -> None:
    """Call ``fn(item)`` for every item on ``workers`` threads and ``on_result(index, result)``
    in the calling thread, in completion order. An exception of ``fn`` propagates.

    Work is handed out a few chunks at a time, and however this returns (an exception, a
    Ctrl-C) the running chunks are finished and the pending ones dropped first: a thread
    still inside OpenCV while the interpreter shuts down aborts the process ("terminate
    called without an active exception", SIGABRT) instead of the Ctrl-C's exit status 130.
    The Ctrl-C itself is only noted while the threads run and raised here once they have
    stopped: a KeyboardInterrupt raised inside ``threading.Condition.wait`` can leave its
    lock released and turn into "RuntimeError: release unlocked lock".
    """
    items = list(items)
    if workers <= 1 or len(items) <= 1:
        for i, item in enumerate(items):
            on_result(i, fn(item))
        return
    chunks = iter([range(s, min(s + chunksize, len(items))) for s in range(0, len(items), chunksize)])

    def run_chunk(idx: range) -> list[tuple[int, Any]]:
        return [(i, fn(items[i])) for i in idx]

    interrupted = threading.Event()
    # only the main thread can take signals, and only Python's own Ctrl-C handler is replaced
    own_handler = (threading.current_thread() is threading.main_thread()
                   and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
    if own_handler:
        signal.signal(signal.SIGINT, lambda signum, frame: interrupted.set())
    pool = ThreadPoolExecutor(max_workers=workers)
    pending = {pool.submit(run_chunk, c) for c in itertools.islice(chunks, 2 * workers)}
    try:
        while pending and not interrupted.is_set():
            done, pending = wait(pending, timeout=0.1, return_when=FIRST_COMPLETED)
            for fut in done:
                for i, res in fut.result():
                    on_result(i, res)
                nxt = next(chunks, None)
                if nxt is not None:
                    pending.add(pool.submit(run_chunk, nxt))
    finally:
        for fut in pending:
            fut.cancel()
        pool.shutdown(wait=True)
        if own_handler:
            signal.signal(signal.SIGINT, signal.default_int_handler)
    if interrupted.is_set():
        raise KeyboardInterrupt


def disk_full_cause(exc: BaseException | None) -> OSError | None:
    """The ENOSPC/EDQUOT ``OSError`` behind ``exc``, if any."""
    return os_error_in_chain(exc, FULL_ERRNOS)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it onto ``path`` on success.

    On any exception the temporary file is removed and ``path`` is untouched; a full
    disk becomes :class:`DiskFullError`. ``fsync=False`` skips flushing to disk before
    the rename: still atomic for readers, but a power cut may leave an empty file. Only
    for files that can be re-derived (cache entries), where the fsync would dominate the cost.
    """
    with atomic_paths([path], fsync=fsync) as (tmp,):
        yield tmp


@contextlib.contextmanager
def atomic_paths(paths: Sequence[str | os.PathLike], fsync: bool = True) -> Iterator[list[Path]]:
    """:func:`atomic_path` for files that belong together: yield one temporary path per
    file; only when the body has written them all (and they are flushed) are they moved
    into place. A failure, a full disk included, leaves every old file as it was."""
    targets = [Path(p) for p in paths]
    tmps: list[Path] = []
    try:
        for path in targets:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            tmps.append(Path(tmp))
        yield list(tmps)
        if fsync:
            for tmp in tmps:
                with open(tmp, "rb+") as fh:  # data on disk before the rename makes it visible
                    os.fsync(fh.fileno())
        for tmp, path in zip(tmps, targets):
            os.replace(tmp, path)
    except BaseException as exc:
        if disk_full_cause(exc) is None:
            raise
        what = (f"{targets[0]}: no space left on device while writing it" if len(targets) == 1 else
                f"{targets[0].parent}: no space left on device while writing {', '.join(p.name for p in targets)}")
        raise DiskFullError(f"{what} (the previous version, if any, is kept); free space on that disk and "
                            "re-run") from None
    finally:
        for tmp in tmps:
            if tmp.exists():
                tmp.unlink()


def is_orphan_temp(name: str) -> bool:
    """Whether a file name is one of this pipeline's temporary files."""
    return any(p.match(name) for p in ORPHAN_PATTERNS)


def remove_orphan_temps(root: str | os.PathLike,
                        subdirs: Iterable[str] = columns.RUN_SUBDIRS) -> list[tuple[Path, int]]:
    """Delete this pipeline's temporary files in ``root`` and (recursively) its ``subdirs``.

    Only call it while holding ``root``'s :class:`RunLock`: a temporary file there then
    belongs to a process that died mid-write. Returns ``(path, size in bytes)`` of each
    removed file.
    """
    root = Path(root)
    removed: list[tuple[Path, int]] = []

    def scan(folder: Path, names: Iterable[str]) -> None:
        for name in names:
            if is_orphan_temp(name):
                p = folder / name
                with contextlib.suppress(FileNotFoundError, IsADirectoryError, PermissionError):
                    if p.is_file() and not p.is_symlink():
                        size = p.stat().st_size
                        p.unlink()
                        removed.append((p, size))

    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        scan(root, os.listdir(root))
    for sub in subdirs:
        for dirpath, _, filenames in os.walk(root / sub):
            scan(Path(dirpath), filenames)
    return removed


def atomic_write(path: str | os.PathLike, writer: Callable[[Path], Any], fsync: bool = True) -> Path:
    """Call ``writer(tmp_path)`` and atomically move the result onto ``path``."""
    with atomic_path(path, fsync=fsync) as tmp:
        writer(tmp)
    return Path(path)


def write_csv(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a DataFrame as CSV (no index) atomically."""
    return atomic_write(path, lambda tmp: df.to_csv(tmp, index=False))


def to_jsonable(obj: Any, nan_as_none: bool = False) -> Any:
    """``obj`` as JSON-style primitives (dict/list/str/int/float/bool/None).

    Paths and unknown objects become strings, tuples/sets lists, NumPy and 0-d torch values
    Python scalars, arrays and tensors lists, enums their values; so the result survives
    ``torch.load(weights_only=True)`` and ``json.dump`` alike. ``nan_as_none`` turns NaN
    and infinities into None, as JSON has no such numbers (a checkpoint keeps them).
    """
    if isinstance(obj, np.generic):  # before the primitives: np.float64 is a float subclass
        obj = obj.item()
    if isinstance(obj, enum.Enum):
        return to_jsonable(obj.value, nan_as_none)
    if obj is None or type(obj) in (bool, int, str):
        return obj
    if isinstance(obj, float):
        return None if nan_as_none and not math.isfinite(obj) else float(obj)
    for base in (bool, int, str):  # subclasses pickle as their class: keep the base value
        if isinstance(obj, base):
            return base(obj)
    if isinstance(obj, argparse.Namespace):
        obj = vars(obj)
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v, nan_as_none) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = sorted(obj, key=repr) if isinstance(obj, (set, frozenset)) else obj
        return [to_jsonable(v, nan_as_none) for v in items]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if callable(getattr(obj, "tolist", None)):  # NumPy arrays, torch tensors
        return to_jsonable(obj.tolist(), nan_as_none)
    return str(obj)


def write_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write JSON (indented, sorted keys; :func:`to_jsonable`, NaN as null) atomically."""

    def _write(tmp: Path) -> None:
        tmp.write_text(json.dumps(to_jsonable(obj, nan_as_none=True), indent=2, sort_keys=True) + "\n")

    return atomic_write(path, _write)


def write_text(text: str, path: str | os.PathLike) -> Path:
    """Write a text file atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM
    return True


class RunLock:
    """One run per output directory, via an exclusive-create lock file.

    The file holds ``host:pid``. A lock whose process is dead (on this host) is
    stale: it is taken over, and the takeover is reported in one line. Taking the
    lock (not re-entering it) also removes orphan temporary files of interrupted
    runs under the directory (:func:`remove_orphan_temps`) and says so. Use as a
    context manager; re-entrant within one process (the driver holds it while
    calling stage ``main`` functions, which take it too).
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
            try:
                with os.fdopen(fd, "w") as fh:
                    fh.write(self._owner())
            except BaseException as exc:
                # an empty lock file would read as "held" to every later run
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                if disk_full_cause(exc) is not None:
                    raise DiskFullError(f"{self.path}: no space left on device for the run's lock file; "
                                        "free space on that disk and re-run") from None
                raise
            RunLock._held[self.path] = 1
            if self.took_over_from:
                print(f"note: {self.path.parent}: took over the lock of {self.took_over_from}, a process that "
                      "is gone (killed or crashed)", flush=True)
            self._remove_orphans()
            return

    def _remove_orphans(self) -> None:
        removed = remove_orphan_temps(self.path.parent)
        if removed:
            mb = sum(size for _, size in removed) / 1e6
            folders = sorted({str(p.parent) for p, _ in removed})
            print(f"note: removed {len(removed)} orphan temporary file(s) ({mb:.1f} MB) left by an interrupted "
                  f"run in {', '.join(folders)}", flush=True)

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
