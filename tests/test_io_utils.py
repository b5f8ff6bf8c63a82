"""Atomic writes and the run lock, exercised with real files and real processes."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import columns
from io_utils import DiskFullError, LockError, RunLock, atomic_write, is_orphan_temp, write_csv

REPO = Path(__file__).resolve().parents[1]


def test_failure_while_writing_csv_keeps_previous_file(tmp_path: Path):
    path = tmp_path / columns.TEST_CSV
    old = pd.DataFrame({"image_path": ["a.png", "b.png"], "fracture": [0, 1]})
    write_csv(old, path)
    before = path.read_bytes()

    def crash_halfway(tmp: Path) -> None:
        tmp.write_text("image_path,fracture\nc.png,")  # a partial row, then the writer dies
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, crash_halfway)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [columns.TEST_CSV]  # no temp file left


def test_second_live_run_is_refused_with_holder_pid(tmp_path: Path):
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; sys.path.insert(0, sys.argv[1]); from io_utils import RunLock\n"
         # the sleep only has to outlast one acquire() after "held" is read (milliseconds);
         # the holder is killed right after, so 60 s costs nothing and survives any load
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


def test_killed_writer_leaves_an_orphan_that_the_next_run_removes(tmp_path: Path, capsys):
    writer = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path; sys.path.insert(0, sys.argv[1])\n"
         "from io_utils import RunLock, atomic_path\n"
         "d = Path(sys.argv[2])\n"
         "with RunLock(d), atomic_path(d / 'saved_agegroup_models' / 'm.pt') as tmp:\n"
         "    tmp.write_bytes(b'x' * 300_000); print('writing', flush=True); time.sleep(60)",
         str(REPO), str(tmp_path)],
        stdout=subprocess.PIPE, text=True)
    try:  # no deadline: readline waits for the writer however slow its start (its sleep(60) is cut short)
        assert writer.stdout.readline().strip() == "writing"
    finally:
        writer.kill()  # SIGKILL mid-write: no cleanup code runs
        writer.wait()
    models = tmp_path / columns.MODELS_DIR
    orphans = list(models.glob(".m.pt.*.tmp"))
    assert len(orphans) == 1 and is_orphan_temp(orphans[0].name)
    decoys = [tmp_path / "notes.tmp", tmp_path / ".m.pt.tmp", models / ".m.pt.ABCDEFGH.tmp",
              tmp_path / "elsewhere" / ".m.pt.abcdefgh.tmp"]  # not ours, or not in a run folder
    for p in decoys:
        p.parent.mkdir(exist_ok=True)
        p.write_text("keep")
    capsys.readouterr()
    with RunLock(tmp_path) as lock:
        assert lock.took_over_from == f"{socket.gethostname()}:{writer.pid}"
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (f"note: {tmp_path}: took over the lock of {socket.gethostname()}:{writer.pid}, "
                        "a process that is gone (killed or crashed)")
    assert lines[1] == f"note: removed 1 orphan temporary file(s) (0.3 MB) left by an interrupted run in {models}"
    assert len(lines) == 2
    assert not orphans[0].exists() and all(p.exists() for p in decoys)
    assert not (models / "m.pt").exists()


# --------------------------------------------------------------------------- a full disk
@pytest.fixture
def small_disk(tmp_path: Path):
    """``make(kb)``: a tmpfs of that size (needs root; skipped otherwise)."""
    mounted: list[Path] = []

    def make(kb: int) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs needs root")
        d = tmp_path / f"disk{len(mounted)}"
        d.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kb}k", "tmpfs", str(d)],
                              capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(d)
        return d

    yield make
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], check=False)


def _fill(disk: Path, leave_kb: int = 0) -> None:
    """Use up what is left on ``disk`` but ``leave_kb``."""
    with open(disk / "filler", "ab", buffering=0) as fh:
        with pytest.raises(OSError):
            while True:
                fh.write(b"\0" * 4096)
    os.truncate(disk / "filler", max(0, (disk / "filler").stat().st_size - 1024 * leave_kb))


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_full_disk_keeps_the_previous_file(small_disk):
    import models

    disk = small_disk(64)
    path = disk / columns.TEST_CSV
    write_csv(pd.DataFrame({"a": [1, 2]}), path)
    before = path.read_bytes()
    _fill(disk)
    with pytest.raises(DiskFullError) as err:
        write_csv(pd.DataFrame({"a": range(20000)}), path)
    assert str(err.value).startswith(f"{path}: no space left on device")
    assert path.read_bytes() == before
    assert sorted(p.name for p in disk.iterdir()) == [columns.TEST_CSV, "filler"]  # no temp file left
    (disk / "filler").unlink()
    _fill(disk)  # again, now with room for the checkpoint's first bytes only
    ckpt = models.make_checkpoint(models.create_model("cnn_demo", num_classes=2), models.ModelSpec(
        model_name="cnn_demo", kind="fracture", class_names=["no", "yes"], img_size=32, mean=0.5, std=0.25,
        age_bounds=[8.0, 15.0]))
    with pytest.raises(DiskFullError, match="m.pt: no space left on device"):
        models.save_checkpoint(disk / "m.pt", ckpt)
    assert sorted(p.name for p in disk.iterdir()) == [columns.TEST_CSV, "filler"]


# Each full-disk test took 43-47 s at load 15 on 2 cores; their 900 s subprocess timeouts
# (20x) only stop a hang.
def test_full_disk_in_stage1_is_one_line_and_loses_nothing(small_disk, tiny_phantom: Path):
    out = small_disk(512)
    cmd = [sys.executable, str(REPO / "age_split_testset.py"), "--data-csv", str(tiny_phantom / columns.DATASET_CSV),
           "--out-dir", str(out)]
    first = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=900)
    assert first.returncode == 0, first.stderr[-2000:]
    before = {n: (out / n).read_bytes() for n in (columns.TEST_CSV, columns.POOL_CSV, columns.TEST_MANIFEST)}
    _fill(out, leave_kb=12)  # room for the lock, the config and a new age_test.csv, not for the pool
    proc = subprocess.run(cmd + ["--force", "--seed", "7"], capture_output=True, text=True, cwd=REPO, timeout=900)
    assert "no space left on device" in _one_line_error(proc)
    assert {n: (out / n).read_bytes() for n in before} == before
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")] and not (out / ".run.lock").exists()


def test_full_disk_in_stage4_is_one_line(small_disk, fresh_splits: Path):
    models_dir = small_disk(1024)  # smaller than one checkpoint of the demo model with its optimizer state
    proc = subprocess.run(
        [sys.executable, str(REPO / "train_fracture_per_agegroup.py"), "--out-dir", str(fresh_splits), "--pooled",
         "--models-dir", str(models_dir), "--img-size", "32", "--epochs", "1", "--quiet", "--device", "cpu"],
        capture_output=True, text=True, cwd=REPO, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    line = _one_line_error(proc)
    assert line.startswith(f"error: {models_dir}/fracture_classifier_pooled") and "no space left on device" in line
    assert not [p for p in models_dir.iterdir() if p.name.endswith(".tmp")]
    assert not (fresh_splits / ".run.lock").exists()


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_outputs_get_the_mode_a_plain_open_gives(umask: int, mode: int, tiny_phantom: Path, tmp_path: Path):
    import train_age_classifier
    from conftest import run_stages_1_2

    out = tmp_path / "run"
    old = os.umask(umask)
    try:
        run_stages_1_2(tiny_phantom, out)
        train_age_classifier.main(train_age_classifier.get_args_parser().parse_args(
            ["--out-dir", str(out), "--preset", "demo", "--img-size", "32", "--epochs", "1", "--quiet"]))
    finally:
        os.umask(old)
    written = {p: p.stat().st_mode & 0o777 for p in out.rglob("*") if p.is_file()}
    assert {p.suffix for p in written} >= {".csv", ".json", ".pt"}
    assert {p: m for p, m in written.items() if m != mode} == {}


@pytest.mark.parametrize("sig, expected", [("SIGINT", KeyboardInterrupt), ("SIGTERM", "Terminated")])
def test_run_threaded_defers_a_signal_until_its_threads_have_stopped(sig: str, expected: object) -> None:
    import signal
    import threading
    import time

    import errors
    import io_utils

    expected = getattr(errors, expected) if isinstance(expected, str) else expected
    signum = getattr(signal, sig)
    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    # as a terminal's Ctrl-C finds it, also when the suite runs as a background job that
    # inherited SIGINT ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)
    errors.handle_sigterm()
    finished, alive_after = [], []

    def work(i: int) -> int:
        if i == 0:
            os.kill(os.getpid(), signum)
        time.sleep(0.05)
        finished.append(i)
        return i

    try:
        with pytest.raises(expected) as info:
            io_utils.run_threaded(work, range(40), workers=2, on_result=lambda i, r: None)
        alive_after.extend(t for t in threading.enumerate() if t.name.startswith("ThreadPoolExecutor"))
        # the handlers are back as run_threaded found them
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])
    assert errors.exit_status(info.value) == (143 if sig == "SIGTERM" else 130)
    # the signal stopped the work early, and no worker thread outlived the call
    assert 0 < len(finished) < 40
    assert alive_after == []
