"""Stages 3-4 and the driver, end to end on the tiny phantom (CPU, a couple of epochs)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import columns
import engine
import presets
import run_all_training
import train_fracture_per_agegroup
from columns import PREDICTION_COLUMNS, SPLIT_CSV_COLUMNS
from models import build_from_checkpoint, load_checkpoint

CSVS = (columns.TRAIN_CSV, columns.VAL_CSV, columns.TEST_CSV)
FAST = ["--preset", "demo", "--img-size", "32", "--epochs", "2", "--batch-size", "16", "--quiet"]



def _driver(argv: list[str]) -> dict:
    return run_all_training.main(run_all_training.get_args_parser().parse_args(argv))


def test_driver_end_to_end_on_tiny_phantom(tiny_phantom: Path, tmp_path: Path, capsys):
    out = tmp_path / "run"
    base = ["--data-csv", str(tiny_phantom / columns.DATASET_CSV), "--out-dir", str(out), *FAST,
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

    models = out / columns.MODELS_DIR
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
    result = train_fracture_per_agegroup.main(train_fracture_per_agegroup.get_args_parser().parse_args(
        ["--out-dir", str(fresh_splits), "--model", "swin_demo", "--img-size", "32", "--epochs", "1",
         "--groups", "1", "--group-column", "age_group", "--quiet"]))
    info = result["models"]["agegroup1"]
    ckpt = load_checkpoint(info["checkpoint"], expect={"model_name": "swin_demo", "kind": "fracture"})
    model = build_from_checkpoint(ckpt)
    assert type(model).__name__ == "SwinTransformer"
    assert info["best_metrics"]["val_n"] == int((pd.read_csv(fresh_splits / columns.VAL_CSV)["age_group"] == 1).sum())
    assert "[Epoch 1] Train Loss" in capsys.readouterr().out


def test_small_group_is_skipped_and_missing_predictions_are_explained(fresh_splits: Path, capsys):
    from errors import DataError

    result = train_fracture_per_agegroup.main(train_fracture_per_agegroup.get_args_parser().parse_args(
        ["--out-dir", str(fresh_splits), "--groups", "2", "--group-column", "age_group",
         "--min-rows", "1000", "--quiet"]))
    assert "only" in result["models"]["agegroup2"]["skipped"]
    assert "age group 2 (15-19 y): SKIPPED" in capsys.readouterr().out
    assert not list((fresh_splits / columns.MODELS_DIR).glob("*.pt"))
    with pytest.raises(DataError, match="age_train_tmp.csv:1: no column 'age_group_label'; run train_age_classifier"):
        train_fracture_per_agegroup.main(train_fracture_per_agegroup.get_args_parser().parse_args(["--out-dir", str(fresh_splits), "--quiet"]))


def test_failing_stage_stops_the_run_with_its_error(tiny_phantom: Path, tmp_path: Path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_phantom, data)
    csv = data / columns.DATASET_CSV
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
    state = json.loads((out / columns.RUN_STATE).read_text())
    assert state["stages"]["1"]["status"] == "failed" and "2" not in state["stages"]
    assert not (out / ".run.lock").exists()


def test_group_models_start_from_the_pooled_model(fresh_splits: Path, capsys):
    base = ["--out-dir", str(fresh_splits), "--img-size", "32", "--epochs", "1", "--quiet"]
    # Without a pooled model, stage 4 trains it first (at a real learning rate).
    first = train_fracture_per_agegroup.main(train_fracture_per_agegroup.get_args_parser().parse_args(
        [*base, "--groups", "0", "--group-column", "age_group", "--init-from-pooled"]))
    assert "training it first" in capsys.readouterr().out
    pooled = load_checkpoint(first["models"]["pooled"]["checkpoint"])
    assert pooled["finished"]
    name = next(k for k in pooled["model"] if k.endswith("weight") and pooled["model"][k].dim() == 4)

    # lr ~0 keeps a model at its starting weights, so they reveal where it started.
    frozen = [*base, "--lr", "1e-12", "--groups", "1", "--group-column", "age_group"]
    routed = train_fracture_per_agegroup.main(train_fracture_per_agegroup.get_args_parser().parse_args([*frozen, "--init-from-pooled"]))
    assert "pooled" not in routed["models"]  # finished already: not retrained
    group = load_checkpoint(routed["models"]["agegroup1"]["checkpoint"])["model"][name]
    torch.testing.assert_close(group, pooled["model"][name], rtol=0, atol=1e-6)

    scratch = train_fracture_per_agegroup.main(train_fracture_per_agegroup.get_args_parser().parse_args(
        [*frozen, "--no-init-from-pooled", "--models-dir", str(fresh_splits / "scratch")]))
    other = load_checkpoint(scratch["models"]["agegroup1"]["checkpoint"])["model"][name]
    assert not torch.allclose(other, pooled["model"][name], atol=1e-4)


def test_control_continues_the_pooled_model_on_the_group_models_budget(fresh_splits: Path):
    import evidence
    import inference

    base = ["--out-dir", str(fresh_splits), "--img-size", "32", "--epochs", "2", "--continue-epochs", "1",
            "--warmup-epochs", "1", "--batch-size", "4", "--quiet", "--group-column", "age_group",
            "--init-from-pooled", "--min-rows", "3"]
    res = train_fracture_per_agegroup.main(train_fracture_per_agegroup.get_args_parser().parse_args(base))
    assert list(res["models"]) == ["pooled", "agegroup0", "agegroup1", "agegroup2", "pooled_continued"]
    models = fresh_splits / columns.MODELS_DIR
    pooled = load_checkpoint(models / "fracture_classifier_pooled.pt")
    control = load_checkpoint(models / "fracture_classifier_pooled_continued.pt")
    assert pooled["init"] == {"kind": "random", "seed": 42}
    assert control["init"]["kind"] == "checkpoint" and control["init"]["checkpoint"] == "fracture_classifier_pooled.pt"
    assert control["init"]["images_seen"] == pooled["images_seen"] > 0
    hist = pd.read_csv(models / "fracture_classifier_pooled_continued_metrics.csv")
    assert control["images_seen"] == hist["train_images"].sum()
    # the pooled model ran --epochs with warm-up; the models continuing it, --continue-epochs without
    assert pooled["epochs_max"] == 2 and pooled["config"]["warmup_epochs"] == 1
    for stem in ("fracture_classifier_pooled_continued", "fracture_classifier_agegroup1"):
        ckpt = load_checkpoint(models / f"{stem}.pt")
        assert ckpt["epochs_max"] == 1 and ckpt["config"]["warmup_epochs"] == 0, stem
    n_train = len(pd.read_csv(fresh_splits / columns.TRAIN_CSV))
    assert n_train - 4 < hist["train_images"].iloc[0] <= n_train  # one epoch of rows, bar a dropped last batch

    def load(stem: str) -> inference.LoadedModel:
        return inference.load_model(models / f"{stem}.pt", stem, torch.device("cpu"), "fracture")

    routed = inference.RoutedModels(age=None, groups={g: load(f"fracture_classifier_agegroup{g}") for g in range(3)},
                                    pooled=load("fracture_classifier_pooled"),
                                    pooled_continued=load("fracture_classifier_pooled_continued"),
                                    age_bounds=(8.0, 15.0))
    budgets = evidence.system_budgets(routed)
    assert budgets["routed"]["images_seen"] == sum(
        load_checkpoint(models / f"fracture_classifier_agegroup{g}.pt")["images_seen"] for g in range(3))
    reference, why = evidence.equal_budget_reference(budgets)
    assert reference == "pooled_continued", why
    assert any("different weights" in w for w in why["pooled"])  # the plain pooled model is not comparable

    # the same run with another learning rate for the control is no longer an equal budget
    routed.pooled_continued.meta["config"]["lr"] = 1.0
    reference, why = evidence.equal_budget_reference(evidence.system_budgets(routed))
    assert reference is None
    # one reason for the three group models that differ alike, not one each
    assert [w for w in why["pooled_continued"] if "other settings" in w] == [
        f"the group models trained with other settings (lr {presets.PRESETS['demo']['lr']} vs 1.0)"]


def test_no_control_and_group_subsets_leave_the_control_out(fresh_splits: Path):
    base = ["--out-dir", str(fresh_splits), "--img-size", "32", "--epochs", "1", "--quiet",
            "--group-column", "age_group", "--init-from-pooled", "--min-rows", "3"]
    assert "pooled_continued" not in train_fracture_per_agegroup.main(train_fracture_per_agegroup.get_args_parser().parse_args(base + ["--no-control"]))["models"]
    assert "pooled_continued" not in train_fracture_per_agegroup.main(train_fracture_per_agegroup.get_args_parser().parse_args(base + ["--groups", "1"]))["models"]


def test_resume_refused_when_the_training_rows_changed(fresh_splits: Path):
    base = ["--out-dir", str(fresh_splits), "--pooled", "--img-size", "32", "--epochs", "1", "--quiet"]
    train_fracture_per_agegroup.main(train_fracture_per_agegroup.get_args_parser().parse_args(base))
    train = pd.read_csv(fresh_splits / columns.TRAIN_CSV, dtype=str, keep_default_na=False)
    train.iloc[1:].to_csv(fresh_splits / columns.TRAIN_CSV, index=False)  # one row fewer
    with pytest.raises(engine.ResumeError) as err:
        train_fracture_per_agegroup.main(train_fracture_per_agegroup.get_args_parser().parse_args(base + ["--resume"]))
    msg = str(err.value)
    assert f"train data: saved '{len(train)} rows, sha256 " in msg and f"now '{len(train) - 1} rows, sha256 " in msg
    with pytest.raises(engine.ResumeError, match="model: saved 'cnn_demo', now 'swin_demo'"):
        train_fracture_per_agegroup.main(train_fracture_per_agegroup.get_args_parser().parse_args(base + ["--resume", "--model", "swin_demo"]))


# --------------------------------------------------------------------------- messy data through the driver
TINY_RUN = ["--preset", "demo", "--img-size", "32", "--epochs", "1", "--batch-size", "16", "--quiet",
            "--n-boot", "20"]


def _messy_copy(tiny_phantom: Path, tmp_path: Path) -> tuple[Path, pd.DataFrame]:
    data = tmp_path / "data"
    shutil.copytree(tiny_phantom, data)
    return data, pd.read_csv(data / columns.DATASET_CSV, encoding="utf-8-sig", dtype=str, keep_default_na=False)


def _image_of(data: Path, meta: pd.DataFrame, row: int) -> Path:
    """The image of CSV row ``row`` (header = row 1)."""
    return data / "images" / f"{meta['filestem'][row - 2]}.png"


def test_driver_takes_a_messy_folder_to_the_report(tiny_phantom: Path, tmp_path: Path, capfd):
    from conftest import damage_idat

    import age_split_testset

    data, meta = _messy_copy(tiny_phantom, tmp_path)
    _image_of(data, meta, 6).write_bytes(b"")  # a zero-byte file
    trunc = _image_of(data, meta, 9)
    trunc.write_bytes(trunc.read_bytes()[:300])  # a partly extracted zip
    # the split is deterministic: draw it once to know which images the test set will hold
    age_split_testset.main(age_split_testset.get_args_parser().parse_args(
        ["--data-csv", str(data / columns.DATASET_CSV), "--out-dir", str(tmp_path / "probe"), "--skip-bad"]))
    test_paths = pd.read_csv(tmp_path / "probe" / columns.TEST_CSV)["image_path"].tolist()
    pool_paths = pd.read_csv(tmp_path / "probe" / columns.POOL_CSV)["image_path"].tolist()
    damaged = [damage_idat(Path(test_paths[1])), damage_idat(Path(pool_paths[4]))]  # IEND intact
    out = tmp_path / "run"
    cmd = ["--data-csv", str(data / columns.DATASET_CSV), "--image-root", str(data), "--out-dir", str(out), *TINY_RUN]
    capfd.readouterr()

    with pytest.raises(SystemExit) as exc:
        _driver(cmd)
    assert exc.value.code == 1
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    zero = _image_of(data, meta, 6)
    assert err[0] == (f"stage 1 (split test set) failed: {data / 'dataset.csv'}:6: zero-byte image file: {zero} "
                      "(+1 more bad rows; --skip-bad sets them aside in rejected_rows.csv)")

    _driver(cmd + ["--skip-bad"])  # the suggested re-run
    printed = capfd.readouterr()
    assert (out / "report" / "report.md").is_file() and (out / columns.METRICS_JSON).is_file()
    assert "libpng" not in printed.err
    rejected = pd.read_csv(out / columns.REJECTED_CSV)
    assert sorted(rejected["image_path"]) == sorted(map(str, [zero, trunc, *damaged]))  # each once
    reasons = dict(zip(rejected["image_path"], rejected["reason"]))
    assert "zero-byte" in reasons[str(zero)] and "truncated PNG" in reasons[str(trunc)]
    assert all("corrupt PNG (CRC error in the 'IDAT' chunk" in reasons[str(p)] for p in damaged)
    # the split CSVs keep every row; stage 3 leaves the undecodable image's predictions empty
    test_csv = pd.read_csv(out / columns.TEST_CSV, dtype=str, keep_default_na=False)
    assert test_csv["image_path"].tolist() == test_paths
    row = test_csv.loc[test_csv["image_path"] == str(damaged[0])].iloc[0]
    assert all(row[c] == "" for c in PREDICTION_COLUMNS)
    assert (test_csv.drop(index=row.name)[list(PREDICTION_COLUMNS)] != "").all().all()
    # stage 5 leaves it out and says so
    metrics = json.loads((out / columns.METRICS_JSON).read_text())
    assert metrics["undecodable_left_out"] == {"test": 1, "val": 0}
    assert metrics["n_test_images"] == len(test_paths) - 1
    assert str(damaged[0]) not in set(pd.read_csv(out / columns.PREDICTIONS_CSV)["image_path"])
    assert "test: 1 of" in (out / "report" / "report.md").read_text()


def test_undecodable_image_stops_training_in_one_line_and_keeps_the_last_state(tiny_phantom: Path, tmp_path: Path,
                                                                                capfd):
    from conftest import damage_idat

    import train_age_classifier
    from errors import DataError

    data, meta = _messy_copy(tiny_phantom, tmp_path)
    damaged = damage_idat(_image_of(data, meta, 11))
    out = tmp_path / "run"
    last = out / columns.MODELS_DIR / "age_classifier_last.pt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"state of an interrupted run")
    capfd.readouterr()
    with pytest.raises(SystemExit):
        _driver(["--data-csv", str(data / columns.DATASET_CSV), "--out-dir", str(out), *TINY_RUN])
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("stage 3 (age classifier) failed: ")
    assert f": {damaged}: cannot decode image: corrupt PNG" in err[0]
    assert err[0].endswith("(--skip-bad sets it aside in rejected_rows.csv)")
    assert last.read_bytes() == b"state of an interrupted run"
    # without a cache the same up-front decode pass finds it, before any DataLoader worker
    with pytest.raises(DataError, match=f"csv:[0-9]+: {damaged}: cannot decode image") as exc:
        train_age_classifier.main(train_age_classifier.get_args_parser().parse_args(
            ["--out-dir", str(out), *FAST, "--no-cache", "--workers", "1"]))
    assert str(exc.value).endswith("(--skip-bad sets it aside in rejected_rows.csv)")  # not a worker's error
    assert last.read_bytes() == b"state of an interrupted run"


def test_from_stage_takes_a_stage_run_by_hand(tiny_phantom: Path, tmp_path: Path, capsys):
    import age_split_testset

    out = tmp_path / "run"
    age_split_testset.main(age_split_testset.get_args_parser().parse_args(
        ["--data-csv", str(tiny_phantom / columns.DATASET_CSV), "--out-dir", str(out), "--no-image-check"]))
    test_before = (out / columns.TEST_CSV).read_bytes()
    capsys.readouterr()
    _driver(["--data-csv", str(tiny_phantom / columns.DATASET_CSV), "--out-dir", str(out), "--from-stage", "2",
             "--to-stage", "2", *FAST])
    printed = capsys.readouterr().out
    assert "-- stage 1 (split test set): not run (--from-stage 2)" in printed
    # stage 2 follows stage 1's metadata-only choice, recorded in its manifest
    assert "age_test_split.json: stage 1 split without looking at the images" in printed
    assert (out / columns.TRAIN_CSV).is_file() and (out / columns.TEST_CSV).read_bytes() == test_before
