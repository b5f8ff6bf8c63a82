"""Failures an adversarial sweep found, each reproduced: a foreign or stale file taken for
this run's, a file system that behaves unusually, an option combination that does nothing.
Each must be refused in one line, set aside, or reported as what it is."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import columns
import evaluate
import evidence
import inference
import models
import predict
import run_all_training
import splits
import train_fracture_per_agegroup
from errors import CheckpointError, DataError
from test_evaluate import _predict_args, _save_ckpt, _wrist_like, run_dir  # noqa: F401  (fixture)

# --------------------------------------------------------------------------- foreign checkpoint
def _fake_models(mdir: Path, test_sha: str | None) -> None:
    """Demo checkpoints (48 px) for every role; the group-0 model records ``test_sha``."""
    path = _save_ckpt(mdir / "fracture_classifier_agegroup0.pt", "fracture", 1, 1)
    if test_sha is not None:
        ckpt = models.load_checkpoint(path)
        ckpt[splits.TEST_SET_KEY] = test_sha
        models.save_checkpoint(path, ckpt)
    _save_ckpt(mdir / "age_classifier.pt", "age", 3, 0)
    _save_ckpt(mdir / "fracture_classifier_agegroup1.pt", "fracture", 1, 2)
    _save_ckpt(mdir / "fracture_classifier_pooled.pt", "fracture", 1, 3)


def test_a_checkpoint_from_a_run_with_another_test_set_is_refused(fresh_splits: Path):
    mdir = fresh_splits / columns.MODELS_DIR
    _fake_models(mdir, "f" * 64)
    args = evaluate.get_args_parser().parse_args(["--out-dir", str(fresh_splits), "--n-boot", "0", "--n-cam", "0"])
    with pytest.raises(CheckpointError) as err:
        evaluate.main(args)
    msg = str(err.value)
    assert msg.startswith(str(mdir / "fracture_classifier_agegroup0.pt") + ": trained in a run with another test set")
    assert "\n" not in msg
    # one that records this run's test set passes the check; one recording none gets a note
    now = splits.recorded_test_sha256(fresh_splits / columns.TEST_CSV)
    assert now and len(now) == 64
    ours = {mdir / "a.pt": {splits.TEST_SET_KEY: now}, mdir / "b.pt": {}}
    notes = splits.check_trained_apart(ours, fresh_splits / columns.TEST_CSV)
    assert len(notes) == 1 and "b.pt records no test set" in notes[0]


def test_trained_checkpoints_record_their_test_set(fresh_splits: Path):
    res = train_fracture_per_agegroup.main(train_fracture_per_agegroup.get_args_parser().parse_args(
        ["--out-dir", str(fresh_splits), "--pooled", "--img-size", "32", "--epochs", "1", "--quiet"]))
    ckpt = models.load_checkpoint(res["models"]["pooled"]["checkpoint"])
    assert ckpt[splits.TEST_SET_KEY] == splits.recorded_test_sha256(fresh_splits / columns.TEST_CSV)


# --------------------------------------------------------------------------- stale control
def test_a_control_continued_from_an_earlier_pooled_model_is_not_equal_budget(fresh_splits: Path):
    base = ["--out-dir", str(fresh_splits), "--img-size", "32", "--epochs", "1", "--quiet", "--batch-size", "8",
            "--group-column", "age_group", "--init-from-pooled", "--min-rows", "3"]
    train_fracture_per_agegroup.main(train_fracture_per_agegroup.get_args_parser().parse_args(base))
    mdir = fresh_splits / columns.MODELS_DIR

    def budgets() -> tuple:
        def load(role: str) -> inference.LoadedModel:
            return inference.load_model(mdir / f"fracture_classifier_{role}.pt", role, torch.device("cpu"), "fracture")

        routed = inference.RoutedModels(age=None, groups={g: load(f"agegroup{g}") for g in range(3)},
                                        pooled=load("pooled"), pooled_continued=load("pooled_continued"),
                                        age_bounds=(8.0, 15.0))
        return evidence.equal_budget_reference(evidence.system_budgets(routed))

    reference, _ = budgets()
    assert reference == "pooled_continued"
    # the pooled and group models retrained with another seed, without the control: the old
    # control continued a pooled model that no longer exists
    for path in mdir.glob("fracture_classifier_*"):
        if "pooled_continued" not in path.name:
            path.unlink()
    train_fracture_per_agegroup.main(train_fracture_per_agegroup.get_args_parser().parse_args(
        base + ["--seed", "7", "--no-control"]))
    reference, why = budgets()
    assert reference is None
    assert any("other weights under that name (retrained in between)" in w for w in why["pooled_continued"]), why


# --------------------------------------------------------------------------- stale thresholds
def test_predict_refuses_thresholds_chosen_for_other_models(run_dir, tmp_path: Path):  # noqa: F811
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns(columns.CACHE_DIR, ".run.lock", "report"))
    evaluate.main(evaluate.get_args_parser().parse_args(
        ["--out-dir", str(run), "--n-boot", "0", "--n-cam", "0", "--device", "cpu"]))
    mdir = run / columns.MODELS_DIR
    recorded = json.loads((mdir / columns.THRESHOLDS_JSON).read_text())["models"]
    assert set(recorded) == {"age_classifier.pt", "fracture_classifier_agegroup0.pt",
                             "fracture_classifier_agegroup1.pt", "fracture_classifier_pooled.pt"}
    import cv2

    image = tmp_path / "scan.png"
    cv2.imwrite(str(image), _wrist_like(__import__("numpy").random.default_rng(0)))
    predict.main(_predict_args([image], mdir, tmp_path / "ok"))  # the models it was chosen for: accepted
    _save_ckpt(mdir / "fracture_classifier_agegroup1.pt", "fracture", 1, 9)  # retrained since
    with pytest.raises(DataError) as err:
        predict.main(_predict_args([image], mdir, tmp_path / "stale"))
    msg = str(err.value)
    assert msg.startswith(str(mdir / columns.THRESHOLDS_JSON) + ": chosen for other models")
    assert "fracture_classifier_agegroup1.pt" in msg and "agegroup0" not in msg and "\n" not in msg
    done = predict.main(_predict_args([image], mdir, tmp_path / "override", threshold=0.3))
    assert done["threshold"] == 0.3


# --------------------------------------------------------------------------- driver options
def test_a_stage_range_that_runs_nothing_is_refused_while_parsing(capsys):
    with pytest.raises(SystemExit) as exit_:
        run_all_training.get_args_parser().parse_args(["--from-stage", "4", "--to-stage", "2"])
    assert exit_.value.code == 2
    assert "argument --from-stage: 4 is after --to-stage 2" in capsys.readouterr().err
    assert run_all_training.get_args_parser().parse_args(["--from-stage", "3", "--to-stage", "3"]).from_stage == 3


# --------------------------------------------------------------------------- data
def test_a_hard_linked_image_under_another_patient_is_refused(tiny_phantom: Path, tmp_path: Path):
    import os

    import pandas as pd

    import age_split_testset

    data = tmp_path / "data"
    shutil.copytree(tiny_phantom, data)
    meta = pd.read_csv(data / columns.DATASET_CSV, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    first = meta.iloc[0]
    other = meta.patient_id[meta.patient_id != first.patient_id].iloc[0]
    os.link(data / "images" / f"{first.filestem}.png", data / "images" / "alias.png")
    meta = pd.concat([meta, meta.iloc[[1]].assign(filestem="alias", patient_id=other)], ignore_index=True)
    meta.to_csv(data / columns.DATASET_CSV, index=False, encoding="utf-8-sig")
    with pytest.raises(DataError) as err:  # without --decode-check: no pixels compared
        age_split_testset.main(age_split_testset.get_args_parser().parse_args(
            ["--data-csv", str(data / columns.DATASET_CSV), "--out-dir", str(tmp_path / "out")]))
    msg = str(err.value)
    assert msg.startswith(f"{data / columns.DATASET_CSV}:2: ") and f"row {len(meta) + 1}" in msg, msg
    assert "one image cannot belong to two patients" in msg and "alias.png" in msg


def test_two_columns_of_one_name_are_refused(tmp_path: Path):
    import tables

    csv = tmp_path / "labels.csv"
    csv.write_text("image_path,patient_id,age,fx,fx\na.png,P1,5,0,1\n")
    with pytest.raises(DataError) as err:
        tables.load_generic(csv, tables.ColumnMap(label="fx"))
    assert str(err.value) == f"{csv}:1: column 'fx' appears twice (columns 4 and 5); keep one of them"
    csv.write_text("image_path,patient_id,age,fracture , fracture\na.png,P1,5,0,1\n")  # the same once stripped
    with pytest.raises(DataError, match="column 'fracture' appears twice"):
        tables.read_split_csv(csv)


def test_a_test_patient_dropped_with_the_manifest_deleted_is_refused(fresh_splits: Path, tiny_phantom: Path):
    import pandas as pd

    import age_split_testset

    path = fresh_splits / columns.TEST_CSV
    test = pd.read_csv(path, dtype=str, keep_default_na=False)
    dropped = test.patient_id.iloc[0]
    test[test.patient_id != dropped].to_csv(path, index=False)
    (fresh_splits / columns.TEST_MANIFEST).unlink()
    pool_before = (fresh_splits / columns.POOL_CSV).read_bytes()
    with pytest.raises(DataError) as err:
        age_split_testset.main(age_split_testset.get_args_parser().parse_args(
            ["--data-csv", str(tiny_phantom / columns.DATASET_CSV), "--out-dir", str(fresh_splits)]))
    msg = str(err.value)
    assert msg.startswith(f"{path}: patient(s) {dropped} of the dataset are in neither this test set nor")
    assert "--force" in msg and "\n" not in msg
    assert (fresh_splits / columns.POOL_CSV).read_bytes() == pool_before  # the patient did not move to the pool


def test_an_image_replaced_with_the_same_size_and_mtime_is_decoded_afresh(tmp_path: Path):
    import os
    import time

    import cv2
    import numpy as np

    import image_io

    path = tmp_path / "scan.png"
    level0 = [cv2.IMWRITE_PNG_COMPRESSION, 0]  # stored blocks: the file size depends on the shape only
    first = np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1))
    cv2.imwrite(str(path), first, level0)
    st = path.stat()
    cached = image_io.ImageCache(tmp_path / "cache", 32).get(path)
    # file times tick in jiffies (1-10 ms): the rewrite lands on a later one; a lower bound,
    # which a loaded machine can only lengthen
    time.sleep(0.05)
    cv2.imwrite(str(path), first[:, ::-1].copy(), level0)  # as cp -p would: same size, mtime restored
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    again = image_io.ImageCache(tmp_path / "cache", 32).get(path)
    np.testing.assert_array_equal(again, image_io.load_resized(path, 32))
    assert not np.array_equal(again, cached)
