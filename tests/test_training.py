"""Stages 3-4 and the driver, end to end on the tiny phantom (CPU, a couple of epochs)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import engine
import run_all_training
import train_fracture_per_agegroup as stage4
from columns import PREDICTION_COLUMNS, SPLIT_CSV_COLUMNS
from models import build_from_checkpoint, load_checkpoint

CSVS = ("age_train_tmp.csv", "age_val_tmp.csv", "age_test.csv")
FAST = ["--preset", "demo", "--img-size", "32", "--epochs", "2", "--batch-size", "16", "--quiet"]



def _driver(argv: list[str]) -> dict:
    return run_all_training.main(run_all_training.get_args_parser().parse_args(argv))


def test_driver_end_to_end_on_tiny_phantom(tiny_phantom: Path, tmp_path: Path, capsys):
    out = tmp_path / "run"
    base = ["--data-csv", str(tiny_phantom / "dataset.csv"), "--out-dir", str(out), *FAST,
            "--group-column", "age_group", "--min-rows", "3"]
    _driver(base + ["--to-stage", "2"])
    before = {n: pd.read_csv(out / n, dtype=str, keep_default_na=False) for n in CSVS}

    _driver(base + ["--to-stage", "4"])
    printed = capsys.readouterr().out
    assert "stage 1 (split test set): up to date, skipped" in printed
    assert "== Pipeline outputs in" in printed and "fracture, agegroup2" in printed

    for name in CSVS:  # predictions in all three CSVs; every original row and column kept as it was
        df = pd.read_csv(out / name, dtype=str, keep_default_na=False)
        assert set(SPLIT_CSV_COLUMNS) <= set(df.columns)
        assert list(df.columns) == list(before[name].columns) + list(PREDICTION_COLUMNS)
        pd.testing.assert_frame_equal(df[before[name].columns], before[name])
        labels = df["age_group_label"].astype(int)
        probs = df[list(PREDICTION_COLUMNS[1:])].astype(float).to_numpy()
        assert labels.between(0, 2).all() and np.allclose(probs.sum(1), 1, atol=1e-5)
        assert (probs.argmax(1) == labels).all()

    models = out / "saved_agegroup_models"
    age = load_checkpoint(models / "age_classifier.pt", expect={"kind": "age", "num_classes": 3})
    assert age["finished"] and age["img_size"] == 32
    for stem in [f"fracture_classifier_agegroup{g}" for g in range(3)] + ["fracture_classifier_pooled",
                                                                           "fracture_classifier_pooled_continued"]:
        ckpt = load_checkpoint(models / f"{stem}.pt", expect={"kind": "fracture", "num_classes": 2})
        model = build_from_checkpoint(ckpt)
        assert torch.isfinite(model(torch.zeros(2, 1, 32, 32))).all()
        hist = pd.read_csv(models / f"{stem}_metrics.csv")
        assert list(hist.columns) == list(engine.HISTORY_COLUMNS) and len(hist) >= 1
        assert json.loads((models / f"{stem}_config.json").read_text())["config"]["img_size"] == 32
        assert not (models / f"{stem}_last.pt").exists()
    assert load_checkpoint(models / "fracture_classifier_agegroup2.pt")["age_group"] == 2

    mtimes = {p: p.stat().st_mtime_ns for p in models.glob("*.pt")}
    _driver(base + ["--to-stage", "4"])
    printed = capsys.readouterr().out
    assert all(f"stage {s} (" in printed and "up to date, skipped" in printed for s in (1, 2, 3, 4))
    assert {p: p.stat().st_mtime_ns for p in models.glob("*.pt")} == mtimes

    # one group checkpoint deleted: only that model is trained again
    gone = models / "fracture_classifier_agegroup1.pt"
    gone.unlink()
    _driver(base + ["--to-stage", "4"])
    printed = capsys.readouterr().out
    assert "stage 4 (fracture classifiers): re-running, saved_agegroup_models/fracture_classifier_agegroup1.pt " \
           "changed or missing" in printed
    # the other two groups, the pooled model and the equal-budget control are kept
    assert printed.count("already trained") == 4 and printed.count("[Epoch 1] Train Loss") == 1
    assert load_checkpoint(gone)["finished"]
    after = {p: p.stat().st_mtime_ns for p in models.glob("*.pt")}
    assert after.keys() == mtimes.keys() and after[gone] != mtimes[gone]
    assert {p: t for p, t in after.items() if p != gone} == {p: t for p, t in mtimes.items() if p != gone}


def test_tiny_swin_trains_through_the_same_path(fresh_splits: Path, capsys):
    result = stage4.main(stage4.get_args_parser().parse_args(
        ["--out-dir", str(fresh_splits), "--model", "swin_demo", "--img-size", "32", "--epochs", "1",
         "--groups", "1", "--group-column", "age_group", "--quiet"]))
    info = result["models"]["agegroup1"]
    ckpt = load_checkpoint(info["checkpoint"], expect={"model_name": "swin_demo", "kind": "fracture"})
    model = build_from_checkpoint(ckpt)
    assert type(model).__name__ == "SwinTransformer"
    assert info["best_metrics"]["val_n"] == int((pd.read_csv(fresh_splits / "age_val_tmp.csv")["age_group"] == 1).sum())
    assert "[Epoch 1] Train Loss" in capsys.readouterr().out


def test_small_group_is_skipped_and_missing_predictions_are_explained(fresh_splits: Path, capsys):
    from unified_dataset import DataError

    result = stage4.main(stage4.get_args_parser().parse_args(
        ["--out-dir", str(fresh_splits), "--groups", "2", "--group-column", "age_group",
         "--min-rows", "1000", "--quiet"]))
    assert "only" in result["models"]["agegroup2"]["skipped"]
    assert "age group 2 (15-19 y): SKIPPED" in capsys.readouterr().out
    assert not list((fresh_splits / "saved_agegroup_models").glob("*.pt"))
    with pytest.raises(DataError, match="age_train_tmp.csv:1: no column 'age_group_label'; run train_age_classifier"):
        stage4.main(stage4.get_args_parser().parse_args(["--out-dir", str(fresh_splits), "--quiet"]))


def test_failing_stage_stops_the_run_with_its_error(tiny_phantom: Path, tmp_path: Path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_phantom, data)
    csv = data / "dataset.csv"
    lines = csv.read_text(encoding="utf-8-sig").splitlines()
    header = lines[0].split(",")
    row = lines[3].split(",")  # line 4 of the file (header = line 1)
    row[header.index("age")] = "abc"
    lines[3] = ",".join(row)
    csv.write_text("\n".join(lines) + "\n", encoding="utf-8-sig")
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        _driver(["--data-csv", str(csv), "--out-dir", str(out), *FAST])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "stage 1 (split test set) failed:" in err and "dataset.csv:4: age" in err and "Traceback" not in err
    state = json.loads((out / "run_state.json").read_text())
    assert state["stages"]["1"]["status"] == "failed" and "2" not in state["stages"]
    assert not (out / ".run.lock").exists()


def test_group_models_start_from_the_pooled_model(fresh_splits: Path, capsys):
    base = ["--out-dir", str(fresh_splits), "--img-size", "32", "--epochs", "1", "--quiet"]
    # Without a pooled model, stage 4 trains it first (at a real learning rate).
    first = stage4.main(stage4.get_args_parser().parse_args(
        [*base, "--groups", "0", "--group-column", "age_group", "--init-from-pooled"]))
    assert "training it first" in capsys.readouterr().out
    pooled = load_checkpoint(first["models"]["pooled"]["checkpoint"])
    assert pooled["finished"]
    name = next(k for k in pooled["model"] if k.endswith("weight") and pooled["model"][k].dim() == 4)

    # lr ~0 keeps a model at its starting weights, so they reveal where it started.
    frozen = [*base, "--lr", "1e-12", "--groups", "1", "--group-column", "age_group"]
    routed = stage4.main(stage4.get_args_parser().parse_args([*frozen, "--init-from-pooled"]))
    assert "pooled" not in routed["models"]  # finished already: not retrained
    group = load_checkpoint(routed["models"]["agegroup1"]["checkpoint"])["model"][name]
    torch.testing.assert_close(group, pooled["model"][name], rtol=0, atol=1e-6)

    scratch = stage4.main(stage4.get_args_parser().parse_args(
        [*frozen, "--no-init-from-pooled", "--models-dir", str(fresh_splits / "scratch")]))
    other = load_checkpoint(scratch["models"]["agegroup1"]["checkpoint"])["model"][name]
    assert not torch.allclose(other, pooled["model"][name], atol=1e-4)


def test_control_continues_the_pooled_model_on_the_group_models_budget(fresh_splits: Path):
    import evaluate
    import inference

    base = ["--out-dir", str(fresh_splits), "--img-size", "32", "--epochs", "2", "--batch-size", "4", "--quiet",
            "--group-column", "age_group", "--init-from-pooled", "--min-rows", "3"]
    res = stage4.main(stage4.get_args_parser().parse_args(base))
    assert list(res["models"]) == ["pooled", "agegroup0", "agegroup1", "agegroup2", "pooled_continued"]
    models = fresh_splits / "saved_agegroup_models"
    pooled = load_checkpoint(models / "fracture_classifier_pooled.pt")
    control = load_checkpoint(models / "fracture_classifier_pooled_continued.pt")
    assert pooled["init"] == {"kind": "random", "seed": 42}
    assert control["init"]["kind"] == "checkpoint" and control["init"]["checkpoint"] == "fracture_classifier_pooled.pt"
    assert control["init"]["images_seen"] == pooled["images_seen"] > 0
    hist = pd.read_csv(models / "fracture_classifier_pooled_continued_metrics.csv")
    assert control["images_seen"] == hist["train_images"].sum() and control["epochs_max"] == 2
    n_train = len(pd.read_csv(fresh_splits / "age_train_tmp.csv"))
    assert n_train - 4 < hist["train_images"].iloc[0] <= n_train  # one epoch of rows, bar a dropped last batch

    def load(stem: str) -> inference.LoadedModel:
        return inference.load_model(models / f"{stem}.pt", stem, torch.device("cpu"), "fracture")

    routed = inference.RoutedModels(age=None, groups={g: load(f"fracture_classifier_agegroup{g}") for g in range(3)},
                                    pooled=load("fracture_classifier_pooled"),
                                    pooled_continued=load("fracture_classifier_pooled_continued"))
    budgets = evaluate.system_budgets(routed)
    assert budgets["routed"]["images_seen"] == sum(
        load_checkpoint(models / f"fracture_classifier_agegroup{g}.pt")["images_seen"] for g in range(3))
    reference, why = evaluate.equal_budget_reference(budgets)
    assert reference == "pooled_continued", why
    assert any("different weights" in w for w in why["pooled"])  # the plain pooled model is not comparable

    # the same run with another learning rate for the control is no longer an equal budget
    routed.pooled_continued.meta["config"]["lr"] = 1.0
    reference, why = evaluate.equal_budget_reference(evaluate.system_budgets(routed))
    assert reference is None and any("lr" in w for w in why["pooled_continued"])


def test_no_control_and_group_subsets_leave_the_control_out(fresh_splits: Path):
    base = ["--out-dir", str(fresh_splits), "--img-size", "32", "--epochs", "1", "--quiet",
            "--group-column", "age_group", "--init-from-pooled", "--min-rows", "3"]
    assert "pooled_continued" not in stage4.main(stage4.get_args_parser().parse_args(base + ["--no-control"]))["models"]
    assert "pooled_continued" not in stage4.main(stage4.get_args_parser().parse_args(base + ["--groups", "1"]))["models"]


def test_resume_refused_when_the_training_rows_changed(fresh_splits: Path):
    base = ["--out-dir", str(fresh_splits), "--pooled", "--img-size", "32", "--epochs", "1", "--quiet"]
    stage4.main(stage4.get_args_parser().parse_args(base))
    train = pd.read_csv(fresh_splits / "age_train_tmp.csv", dtype=str, keep_default_na=False)
    train.iloc[1:].to_csv(fresh_splits / "age_train_tmp.csv", index=False)  # one row fewer
    with pytest.raises(engine.ResumeError) as err:
        stage4.main(stage4.get_args_parser().parse_args(base + ["--resume"]))
    msg = str(err.value)
    assert f"train data: saved '{len(train)} rows, sha256 " in msg and f"now '{len(train) - 1} rows, sha256 " in msg
    with pytest.raises(engine.ResumeError, match="model: saved 'cnn_demo', now 'swin_demo'"):
        stage4.main(stage4.get_args_parser().parse_args(base + ["--resume", "--model", "swin_demo"]))
