"""Patient flow, Table 1 and the error breakdown on the tiny phantom's real splits."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import cohort
import columns
import tables
from conftest import run_stages_1_2


@pytest.fixture(scope="module")
def flagged_splits(tiny_phantom, tmp_path_factory):
    """Stages 1 and 2 on the tiny phantom, excluding two flags (an image may carry both)."""
    out = tmp_path_factory.mktemp("flow")
    run_stages_1_2(tiny_phantom, out, "--exclude", "metal", "cast")
    return out


def _frames(out):
    run = columns.RunDir(out)
    return {"train": tables.read_split_csv(run.train_csv),
            "val": tables.read_split_csv(run.val_csv),
            "test": tables.read_split_csv(run.test_csv)}


def test_flow_counts_add_up_to_the_source_rows(flagged_splits, tiny_phantom):
    source = pd.read_csv(tiny_phantom / columns.DATASET_CSV, encoding="utf-8-sig")
    flow = cohort.patient_flow(columns.RunDir(flagged_splits), _frames(flagged_splits))
    assert flow["source_rows"] == len(source)
    flags = source[["metal", "cast"]].apply(pd.to_numeric, errors="coerce").fillna(0).astype(int)
    assert flow["excluded"] == int((flags.max(axis=1) == 1).sum()) > 0
    assert flow["excluded_by_flag"] == {"metal": int(flags.metal.sum()), "cast": int(flags.cast.sum())}
    total = (flow["set_aside_unreadable"] + flow["excluded"] + flow["set_aside_unreadable_pool"]
             + sum(flow[p]["images"] for p in cohort.PARTITIONS))
    assert flow["not_accounted"] == 0 and total == len(source)
    patients = sum(flow[p]["patients"] for p in cohort.PARTITIONS)
    kept = source[flags.max(axis=1) == 0]
    assert patients == kept["patient_id"].nunique()  # patient-disjoint partitions


def test_table_one_per_partition(flagged_splits):
    frames = _frames(flagged_splits)
    names = columns.age_group_names()
    table = cohort.table_one(frames, names)
    test = frames["test"]
    row = table["test"]
    assert row["images"] == len(test)
    assert row["age_median"] == pytest.approx(float(np.median(test["age"])))
    assert sum(row["age_group_images"].values()) == len(test)
    assert sum(row["sex_patients"].values()) == test["patient_id"].nunique()
    assert row["fracture_rate"] == pytest.approx(test["fracture"].mean())
    assert row["cast_share"] == 0.0  # cast was excluded
    assert 0 < row["initial_exam_share"] <= 1


def test_error_breakdown_and_most_confident_errors():
    df = pd.DataFrame({"image_path": [f"i{k}.png" for k in range(6)], "patient_id": list("aabbcc"),
                       "study_number": [1, 1, 1, 2, 1, 1], "age_group": [0, 0, 1, 1, 2, 2],
                       "projection": [1, 2, 1, 2, 1, 2], "cast": [0, 0, 1, 0, 0, 0],
                       "ao_classification": ["23r-M/3.1; 23u-E/7", "23r-M/3.1", "", "23r-E/2.1", "", None]})
    y = np.array([1, 1, 0, 1, 0, 0])
    prob = np.array([0.1, 0.8, 0.9, 0.4, 0.2, 0.6])
    pred = (prob >= 0.5).astype(int)
    got = cohort.error_breakdown(df, y, pred, ("0-7 y", "8-14 y", "15-19 y"))
    # by hand: FN rows 0 (23r-M/3.1) and 3 (23r-E/2.1); FP rows 2 and 5 (no code)
    assert got["ao_first_code"]["23r-M/3.1"] == {"images": 2, "positives": 2, "fn": 1, "fn_rate": 0.5,
                                                 "negatives": 0, "fp": 0, "fp_rate": pytest.approx(np.nan,
                                                                                                  nan_ok=True)}
    assert got["ao_first_code"]["(none)"]["fp"] == 2
    assert got["cast"]["1"]["fp"] == 1 and got["age_group"]["8-14 y"]["fn"] == 1
    top = cohort.most_confident_errors(df, y, prob, pred, k=3)
    # |y - p|: row 0 0.9, row 2 0.9, row 3 0.6, row 5 0.6 -> rows 0, 2 then 3
    assert [e["row"] for e in top] == [0, 2, 3]
    assert [e["kind"] for e in top] == ["FN", "FP", "FN"]
