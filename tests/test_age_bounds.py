"""Age bounds other than the default, end to end on the tiny phantom: the bounds stage 1 was
given reach every checkpoint, the number of group models, the evaluation's true groups (and
so the oracle system), the report, the export and predict.py; a stage-3 flag that
contradicts stage 1 is refused."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import columns
import evaluate
import predict
import splits
import train_age_classifier
import train_fracture_per_agegroup
from errors import CheckpointError, DataError
from models import load_checkpoint
from test_training import TINY_RUN, _driver

# each setting gives every age group patients in every split of the 40-patient phantom
BOUNDS = {"two bounds": ("10", "16"), "three bounds": ("6", "10", "15")}


@pytest.fixture(scope="module", params=list(BOUNDS.values()), ids=list(BOUNDS))
def bounds_run(request: pytest.FixtureRequest, tiny_phantom: Path,
               tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, tuple[float, ...]]:
    out = tmp_path_factory.mktemp("bounds_run")
    _driver(["--data-csv", str(tiny_phantom / columns.DATASET_CSV), "--out-dir", str(out), *TINY_RUN,
             "--continue-epochs", "1", "--seeds", "1", "--group-column", "age_group", "--min-rows", "3",
             "--age-bounds", *request.param])
    return out, tuple(float(b) for b in request.param)


def _groups_of(ages: pd.Series, bounds: tuple[float, ...]) -> list[int]:
    """Group g holds bounds[g-1] <= age < bounds[g], counted here without the pipeline's helper."""
    return [sum(age >= b for b in bounds) for age in ages.astype(float)]


def _names(bounds: tuple[float, ...]) -> list[str]:
    edges = [f"{b:g}" for b in bounds]
    return [f"<{edges[0]} y", *(f"{lo}-<{hi} y" for lo, hi in zip(edges, edges[1:])), f">={edges[-1]} y"]


def test_checkpoints_record_the_bounds_of_stage_1(bounds_run):
    out, bounds = bounds_run
    n = len(bounds) + 1
    models = out / columns.MODELS_DIR
    age = load_checkpoint(models / "age_classifier.pt", expect={"kind": "age", "num_classes": n})
    assert tuple(age["age_bounds"]) == bounds and list(age["class_names"]) == _names(bounds)
    groups = sorted(models.glob("fracture_classifier_agegroup*.pt"))
    assert [p.name for p in groups] == [f"fracture_classifier_agegroup{g}.pt" for g in range(n)]
    for g, path in enumerate(groups):
        ckpt = load_checkpoint(path)
        assert tuple(ckpt["age_bounds"]) == bounds and ckpt["age_group"] == g
    assert tuple(load_checkpoint(models / "fracture_classifier_pooled.pt")["age_bounds"]) == bounds
    test = pd.read_csv(out / columns.TEST_CSV)
    assert list(test.columns[-n - 1:]) == list(columns.prediction_columns(n))


def test_evaluation_and_report_follow_the_bounds(bounds_run):
    out, bounds = bounds_run
    names = _names(bounds)
    test = pd.read_csv(out / columns.TEST_CSV)
    true = _groups_of(test["age"], bounds)
    assert sorted(set(true)) == list(range(len(names)))  # every group is in the test set

    pred = pd.read_csv(out / columns.PREDICTIONS_CSV)
    assert pred["image_path"].tolist() == test["image_path"].tolist()
    assert pred["age_group"].tolist() == true  # the groups the oracle routes by
    # the oracle sends an image to its true group's model: where the age classifier picked
    # that group too, the oracle's and the routed system's probabilities are the same model's
    agree = pred["age_group_label"] == pred["age_group"]
    np.testing.assert_array_equal(pred.loc[agree, "prob_oracle"], pred.loc[agree, "prob_hard"])

    metrics = json.loads((out / columns.METRICS_JSON).read_text())
    assert tuple(metrics["age_bounds"]) == bounds and metrics["age_group_names"] == names
    report = (out / columns.REPORT_DIR / columns.REPORT_MD).read_text()
    row = next(line for line in report.splitlines() if line.startswith("| age group (images) |"))
    test_cell = row.strip("|").split("|")[-1]  # columns: train, val, test
    for g, name in enumerate(names):
        assert f"{name} {true.count(g)} (" in test_cell, (name, test_cell)
    assert "0-7 y" not in report and "8-14 y" not in report

    system = json.loads((out / columns.EXPORT_DIR / columns.SYSTEM_JSON).read_text())
    assert tuple(system["age_bounds"]) == bounds and system["age_group_names"] == names
    assert sorted(system["served_by"]) == [str(g) for g in range(len(names))]


@pytest.mark.parametrize("models", [columns.MODELS_DIR, columns.EXPORT_DIR])
def test_predict_names_the_groups_of_the_bounds(bounds_run, models: str, tmp_path: Path):
    out, bounds = bounds_run
    images = pd.read_csv(out / columns.TEST_CSV)["image_path"].tolist()[:6]
    csv = tmp_path / "predictions.csv"
    predict.main(predict.get_args_parser().parse_args([*images, "--models", str(out / models),
                                                       "--output", str(csv), "--device", "cpu"]))
    res = pd.read_csv(csv)
    names = _names(bounds)
    assert res["age_group_name"].tolist() == [names[g] for g in res["age_group_label"]]
    probs = res[[f"age_group_prob_{g}" for g in range(len(names))]].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)


def test_stage_3_refuses_bounds_that_contradict_stage_1(tiny_splits: Path):
    manifest = tiny_splits / columns.TEST_MANIFEST
    recorded = json.loads(manifest.read_text())["age_bounds"]
    assert recorded == [8.0, 15.0]
    with pytest.raises(DataError) as err:
        train_age_classifier.main(train_age_classifier.get_args_parser().parse_args(
            ["--out-dir", str(tiny_splits), "--age-bounds", "10", "16", "--quiet"]))
    msg = str(err.value)
    assert msg.startswith(f"{manifest}: stage 1 used --age-bounds 8 15, not --age-bounds 10 16: ")
    assert "\n" not in msg
    assert not (tiny_splits / columns.MODELS_DIR / "age_classifier.pt").exists()  # refused before training


def test_recorded_age_groups_reads_stage_1s_manifest(tiny_splits: Path, tmp_path: Path):
    test_csv = tiny_splits / columns.TEST_CSV
    assert splits.recorded_age_groups(test_csv) == ((8.0, 15.0), ("0-7 y", "8-14 y", "15-19 y"))
    assert splits.recorded_age_groups(test_csv, [8, 15])[0] == (8.0, 15.0)  # agreeing flag accepted
    alone = tmp_path / columns.TEST_CSV  # no manifest beside it: the flag, or a one-line refusal
    assert splits.recorded_age_groups(alone, [6, 12]) == ((6.0, 12.0), tuple(_names((6.0, 12.0))))
    with pytest.raises(DataError, match="no age bounds recorded .* pass --age-bounds$"):
        splits.recorded_age_groups(alone)


def test_evaluation_refuses_checkpoints_trained_with_other_bounds(bounds_run, tmp_path: Path):
    out, bounds = bounds_run
    run = tmp_path / "run"
    shutil.copytree(out, run, ignore=shutil.ignore_patterns(columns.CACHE_DIR, columns.EXPORT_DIR, ".run.lock"))
    manifest = run / columns.TEST_MANIFEST
    record = json.loads(manifest.read_text())
    other = [b + 1 for b in bounds]  # as many groups, other bounds: only the bounds tell them apart
    record["age_bounds"], record["age_group_names"] = other, _names(tuple(other))
    manifest.write_text(json.dumps(record))
    with pytest.raises(DataError) as err:
        evaluate.main(evaluate.get_args_parser().parse_args(["--out-dir", str(run), "--n-boot", "20"]))
    shown = " ".join(f"{b:g}" for b in bounds)
    assert str(err.value).startswith(f"{manifest}: stage 1 used --age-bounds {' '.join(f'{b:g}' for b in other)}, "
                                     f"not age_classifier.pt's {shown}: ")


def test_predict_refuses_an_export_whose_models_disagree_with_system_json(bounds_run, tmp_path: Path):
    out, bounds = bounds_run
    export = tmp_path / "export"
    shutil.copytree(out / columns.EXPORT_DIR, export)
    system = json.loads((export / columns.SYSTEM_JSON).read_text())
    system["age_bounds"] = [b + 1 for b in bounds]
    (export / columns.SYSTEM_JSON).write_text(json.dumps(system))
    image = pd.read_csv(out / columns.TEST_CSV)["image_path"].iloc[0]
    with pytest.raises(CheckpointError, match="trained with age bounds .*, but system.json says"):
        predict.main(predict.get_args_parser().parse_args([image, "--models", str(export), "--device", "cpu",
                                                           "--output", str(tmp_path / "p.csv")]))


def test_stage_4_groups_follow_the_number_of_groups(tiny_splits: Path):
    with pytest.raises(DataError) as err:
        train_fracture_per_agegroup.main(train_fracture_per_agegroup.get_args_parser().parse_args(
            ["--out-dir", str(tiny_splits), "--groups", "1", "3", "--quiet"]))
    assert str(err.value) == ("--groups 3: there are 3 age groups, 0..2 (0-7 y, 8-14 y, 15-19 y), with stage 1's "
                              "--age-bounds 8 15")
