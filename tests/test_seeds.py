"""Training seeds end to end on the tiny phantom: every seed's compared models under their
own names, the Answer across seeds, and resume per seed."""
from __future__ import annotations

import json
from pathlib import Path

import columns
import evidence
from models import load_checkpoint
from test_training import _driver

FAST = ["--preset", "demo", "--img-size", "32", "--epochs", "1", "--batch-size", "16", "--quiet"]


def test_seeds_train_compare_and_resume_per_seed(tiny_phantom: Path, tmp_path: Path, capsys):
    out = tmp_path / "run"
    base = ["--data-csv", str(tiny_phantom / columns.DATASET_CSV), "--out-dir", str(out), *FAST,
            "--group-column", "age_group", "--min-rows", "3", "--seeds", "2", "--n-boot", "30"]
    _driver(base)
    models = out / columns.MODELS_DIR
    # the first seed keeps the plain (user-facing) names; the second seed's compared models
    # are its own files, continued from the one pooled start
    for role in ("agegroup0", "agegroup1", "agegroup2", "pooled_continued"):
        first = load_checkpoint(models / f"fracture_classifier_{role}.pt")
        second = load_checkpoint(models / f"fracture_classifier_{role}_seed43.pt")
        assert first["config"]["seed"] == 42 and second["config"]["seed"] == 43
        assert second["init"]["checkpoint"] == "fracture_classifier_pooled.pt" and second["finished"]
    assert not (models / "fracture_classifier_pooled_seed43.pt").exists()

    res = json.loads((out / columns.METRICS_JSON).read_text())
    seeds = res["seeds"]
    assert [s["seed"] for s in seeds["per_seed"]] == [42, 43]
    assert seeds["per_seed"][0]["diff"] == res["comparisons"]["hard_minus_pooled_continued"]["auroc"]["diff"]
    assert seeds["verdict"] in (evidence.HELPED, evidence.HURT, evidence.NO_EVIDENCE, evidence.INCONSISTENT)
    assert seeds["lo"] <= seeds["mean"] <= seeds["hi"]
    assert "(seed 43)" in res["conclusion"]
    report = (out / columns.REPORT_DIR / columns.REPORT_MD).read_text()
    assert report.startswith("# Evaluation") and "## Training seeds" in report

    # one seed's model deleted: only that model is trained again
    capsys.readouterr()
    (models / "fracture_classifier_agegroup1_seed43.pt").unlink()
    _driver(base + ["--to-stage", "4"])
    printed = capsys.readouterr().out
    assert printed.count("[Epoch 1] Train Loss") == 1 and printed.count("already trained") == 8
    assert load_checkpoint(models / "fracture_classifier_agegroup1_seed43.pt")["config"]["seed"] == 43
