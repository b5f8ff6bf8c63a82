"""Fault tolerance with real processes: the driver killed (SIGKILL) or interrupted (SIGINT, or
SIGTERM as a cluster's preemption sends it) after a training stage's first epoch, then re-run with the same command."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

import columns
from conftest import default_sigint
from columns import PREDICTION_COLUMNS
from models import build_from_checkpoint, load_checkpoint

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 8


def _command(tiny_phantom: Path, out: Path) -> list[str]:
    return [sys.executable, str(REPO / "run_all_training.py"), "--data-csv", str(tiny_phantom / columns.DATASET_CSV),
            "--out-dir", str(out), "--preset", "demo", "--img-size", "32", "--batch-size", "16",
            "--epochs", str(EPOCHS), "--patience", str(EPOCHS), "--to-stage", "3", "--quiet"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _start_and_signal(cmd: list[str], out: Path, sig: int, log: Path) -> tuple[int, str]:
    """Start the driver, send ``sig`` once stage 3 has saved its first epoch; return (rc, log)."""
    last = out / columns.MODELS_DIR / "age_classifier_last.pt"
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=_env(), cwd=REPO,
                                preexec_fn=default_sigint)
        # the first epoch's checkpoint appears within seconds idle; the whole SIGKILL test
        # (start, signal, rerun) took 66 s at load 15 on 2 cores: 600 s only stops a hang
        deadline = time.monotonic() + 600
        while not last.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"no epoch checkpoint appeared (rc {proc.returncode}):\n{log.read_text()[-3000:]}")
            time.sleep(0.02)
        proc.send_signal(sig)
        rc = proc.wait(timeout=300)  # saving the state and leaving: seconds, even loaded
    return rc, log.read_text()


def _rerun(cmd: list[str]) -> str:
    # well under a minute at load 15; 600 s only stops a hang
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _check_outputs(out: Path) -> None:
    models = out / columns.MODELS_DIR
    ckpt = load_checkpoint(models / "age_classifier.pt", expect={"kind": "age", "num_classes": 3})
    build_from_checkpoint(ckpt)
    assert ckpt["finished"] and not (models / "age_classifier_last.pt").exists()
    epochs = pd.read_csv(models / "age_classifier_metrics.csv")["epoch"].tolist()
    assert epochs == list(range(1, EPOCHS + 1))  # each epoch once: none lost, none repeated in the record
    for name in (columns.TRAIN_CSV, columns.VAL_CSV, columns.TEST_CSV):
        assert set(PREDICTION_COLUMNS) <= set(pd.read_csv(out / name).columns)


def _resumed_from(log: str) -> int:
    found = re.search(r"Resuming from epoch (\d+)", log)
    assert found, log[-3000:]
    return int(found.group(1))


def test_sigkill_mid_training_then_rerun_resumes(tiny_phantom: Path, tmp_path: Path):
    out = tmp_path / "run"
    cmd = _command(tiny_phantom, out)
    rc, _ = _start_and_signal(cmd, out, signal.SIGKILL, tmp_path / "killed.log")
    assert rc == -signal.SIGKILL
    assert (out / ".run.lock").exists()  # left behind by the dead process: must be taken over
    state = load_checkpoint(out / columns.MODELS_DIR / "age_classifier_last.pt")
    saved = state["epoch"]
    assert saved >= 1 and "optimizer" in state

    log = _rerun(cmd)
    assert "stage 2 (split train/val): up to date, skipped" in log
    assert "stage 3 (age classifier): resuming" in log
    assert _resumed_from(log) == saved + 1
    _check_outputs(out)


# SIGTERM is how a cluster preempts a job: handled exactly like Ctrl-C, with the shell's
# conventional status 128 + the signal's number.
@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_saves_state_and_rerun_resumes(sig: int, status: int, tiny_phantom: Path, tmp_path: Path):
    out = tmp_path / "run"
    cmd = _command(tiny_phantom, out)
    rc, log = _start_and_signal(cmd, out, sig, tmp_path / "interrupted.log")
    assert rc == status, log[-3000:]
    assert "Interrupted during epoch" in log and "Traceback" not in log
    assert "re-run the same command to resume" in log
    state = json.loads((out / columns.RUN_STATE).read_text())
    assert state["stages"]["3"]["status"] == "interrupted"
    assert not (out / ".run.lock").exists()  # released on the way out
    last = load_checkpoint(out / columns.MODELS_DIR / "age_classifier_last.pt")
    assert {"optimizer", "scheduler", "early_stopping", "rng", "history"} <= set(last)
    assert [h["epoch"] for h in last["history"]] == list(range(1, last["epoch"] + 1))

    log = _rerun(cmd)
    assert _resumed_from(log) == last["epoch"] + 1
    _check_outputs(out)
