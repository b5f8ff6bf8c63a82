"""distributed.py: the sharded class-balanced sampler, de-duplicated gathering, and a real
torchrun job of two gloo processes on the CPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

import columns
import distributed
from models import load_checkpoint

REPO = Path(__file__).resolve().parents[1]


def test_balanced_sampler_shards_one_balanced_epoch():
    labels = [0] * 90 + [1] * 10
    shards = [list(distributed.DistributedBalancedSampler(labels, num_replicas=2, rank=r, seed=3)) for r in (0, 1)]
    assert [len(s) for s in shards] == [50, 50]
    again = list(distributed.DistributedBalancedSampler(labels, num_replicas=2, rank=0, seed=3))
    assert again == shards[0]  # every rank draws the same epoch, so the shards fit together
    counts = Counter(labels[i] for s in shards for i in s)
    assert 35 <= counts[1] <= 65  # the 10 % class drawn about half the time
    sampler = distributed.DistributedBalancedSampler(labels, num_replicas=2, rank=0, seed=3)
    sampler.set_epoch(1)
    assert list(sampler) != shards[0]


def test_gather_rows_drops_padding_duplicates_and_orders_by_index():
    # DistributedSampler(shuffle=False) with 5 rows on 2 ranks: rank 0 gets 0,2,4 and rank 1
    # gets 1,3 plus index 0 again as padding; the concatenation must count row 0 once
    idx = np.array([0, 2, 4, 1, 3, 0])
    vals = np.array([10, 12, 14, 11, 13, 10])
    got_idx, got_vals = distributed.gather_rows(idx, vals)
    assert got_idx.tolist() == [0, 1, 2, 3, 4] and got_vals.tolist() == [10, 11, 12, 13, 14]


def test_torchrun_two_gloo_processes_train_one_model_and_stop_early(fresh_splits: Path, tmp_path: Path):
    result_json = tmp_path / "result.json"
    # --min-delta 10: no epoch can improve on the first, so with --patience 1 rank 0 decides to
    # stop after epoch 2 of 3, and both ranks must leave the loop on that broadcast (a rank that
    # missed it would wait in epoch 3's first collective until the timeout)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "train_fracture_per_agegroup.py"), "--out-dir", str(fresh_splits), "--pooled",
           "--img-size", "32", "--batch-size", "8", "--epochs", "3", "--patience", "1", "--min-delta", "10",
           "--quiet", "--device", "cpu", "--result-json", str(result_json)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    # 51 s measured at load 15 on 2 cores; 600 s (12x) only stops a hang
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]

    models = fresh_splits / columns.MODELS_DIR
    assert sorted(p.name for p in models.glob("*.pt")) == ["fracture_classifier_pooled.pt"]
    result = json.loads(result_json.read_text())["models"]["pooled"]
    n_val = len(pd.read_csv(fresh_splits / columns.VAL_CSV))
    assert n_val % 2 == 1  # odd: DistributedSampler pads one rank, which the gather must undo
    assert result["best_metrics"]["val_n"] == n_val  # the whole val set, each row once
    assert sum(map(sum, result["best_metrics"]["val_confusion_matrix"])) == n_val
    ckpt = load_checkpoint(models / "fracture_classifier_pooled.pt", expect={"kind": "fracture"})
    assert ckpt["finished"] and ckpt["metrics"]["val_n"] == n_val
    assert ckpt["stopped_early"] and ckpt["epochs_run"] == 2 and ckpt["epoch"] == 1
    assert result["stopped_early"] and result["epochs_run"] == 2
    assert len(pd.read_csv(models / "fracture_classifier_pooled_metrics.csv")) == 2
    assert log.count("Early stopping at epoch 2") == 1 and "[Epoch 3]" not in log
    assert log.count("[Epoch 1] Train Loss") == 1  # rank 0 alone logs
    assert not (fresh_splits / ".run.lock").exists()
