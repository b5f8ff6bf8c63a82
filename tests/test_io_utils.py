"""Atomic writes and the run lock, exercised with real files and real processes."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from io_utils import LockError, RunLock, atomic_write, write_csv

REPO = Path(__file__).resolve().parents[1]


def test_failure_while_writing_csv_keeps_previous_file(tmp_path: Path):
    path = tmp_path / "age_test.csv"
    old = pd.DataFrame({"image_path": ["a.png", "b.png"], "fracture": [0, 1]})
    write_csv(old, path)
    before = path.read_bytes()

    def crash_halfway(tmp: Path) -> None:
        tmp.write_text("image_path,fracture\nc.png,")  # a partial row, then the writer dies
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, crash_halfway)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["age_test.csv"]  # no temp file left


def test_second_live_run_is_refused_with_holder_pid(tmp_path: Path):
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; sys.path.insert(0, sys.argv[1]); from io_utils import RunLock\n"
         "with RunLock(sys.argv[2]):\n    print('held', flush=True); time.sleep(60)",
         str(REPO), str(tmp_path)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockError, match=rf"PID {holder.pid}\b"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing: the next run takes the stale lock over.
    lock = RunLock(tmp_path)
    with lock:
        assert lock.took_over_from is not None and lock.took_over_from.endswith(f":{holder.pid}")
    assert not (tmp_path / ".run.lock").exists()


def test_lock_is_reentrant_within_one_process(tmp_path: Path):
    with RunLock(tmp_path):
        with RunLock(tmp_path):  # the driver holds it while a stage's main() takes it again
            assert (tmp_path / ".run.lock").exists()
        assert (tmp_path / ".run.lock").exists()
    assert not (tmp_path / ".run.lock").exists()
