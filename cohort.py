"""Who is in the evaluation: patient flow (STARD), the characteristics of each partition
(Table 1) and where the errors fall. Plain tables from the split files and manifests; no
rendering here (report.py draws and writes them).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

import columns

PARTITIONS = ("train", "val", "test")
# Columns by which errors and Table 1 are broken down, where the CSV has them.
INITIAL_NAMES = {1: "initial exam", 0: "follow-up"}
ERROR_COLUMNS = ("ao_first_code", "projection", "cast", "age_group")


def _read_json(path: Any) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _count(df: pd.DataFrame | None) -> dict[str, int]:
    if df is None:
        return {"images": 0, "patients": 0}
    return {"images": int(len(df)), "patients": int(columns.patient_ids(df["patient_id"]).nunique())}


def patient_flow(run: columns.RunDir, frames: Mapping[str, pd.DataFrame],
                 left_out: Mapping[str, int] | None = None) -> dict[str, Any]:
    """From the source CSV's rows to the images of each partition, from stage 1's and 2's
    manifests and the split CSVs (``frames``: train, val, test). ``not_accounted`` is what
    the steps do not explain (images of test patients added to the dataset after the test set
    was drawn, say): the counts add up to ``source_rows`` with it."""
    m1, m2 = _read_json(run.test_manifest), _read_json(run.trainval_manifest)
    excl = m1.get("exclusions", {})
    source_rows = int(m1.get("source", {}).get("rows", 0))
    rejected = int(m1.get("rejected_rows", 0))
    rejected_pool = int(m2.get("rejected_rows", 0))
    parts = {name: _count(frames.get(name)) for name in PARTITIONS}
    explained = (rejected + int(excl.get("rows_excluded", 0)) + rejected_pool
                 + sum(p["images"] for p in parts.values()))
    csv = m1.get("source", {}).get("csv")
    phantom = csv is not None and run.phantom_dir.resolve() in Path(csv).resolve().parents
    return {
        "source_csv": csv, "phantom": phantom, "source_rows": source_rows,
        "set_aside_unreadable": rejected,
        "excluded_by_flag": dict(excl.get("excluded", {})), "excluded": int(excl.get("rows_excluded", 0)),
        "after_exclusions": int(excl.get("rows_out", source_rows - rejected)),
        "set_aside_unreadable_pool": rejected_pool,
        **parts, "not_accounted": source_rows - explained,
        "left_out_at_evaluation": dict(left_out or {}),
        "note": "an image may carry several exclusion flags: the per-flag counts can add up to more than the "
                "images excluded",
    }


def first_ao_code(values: pd.Series) -> pd.Series:
    """The first AO/OTA code of each ``ao_classification`` ("23r-M/3.1; 23u-E/7" -> "23r-M/3.1")."""
    text = values.fillna("").astype(str).str.split(";").str[0].str.strip()
    return text.replace("", "(none)")


def _share(mask: pd.Series | np.ndarray) -> float:
    m = np.asarray(mask, bool)
    return float(m.mean()) if m.size else float("nan")


def _flag(df: pd.DataFrame, name: str) -> pd.Series:
    return pd.to_numeric(df[name], errors="coerce").fillna(0).astype(int)


def _counts(values: pd.Series) -> dict[str, int]:
    return {str(k): int(v) for k, v in values.astype(str).value_counts().sort_index().items()}


def characteristics(df: pd.DataFrame, group_names: Sequence[str]) -> dict[str, Any]:
    """Table 1 for one partition: patients, images, age (median, IQR, per image), sex (per
    patient), age group, fracture rate, cast, projection, device, initial exam vs follow-up."""
    out: dict[str, Any] = _count(df)
    age = pd.to_numeric(df["age"], errors="coerce")
    out["age_median"], out["age_q1"], out["age_q3"] = (float(age.median()), float(age.quantile(0.25)),
                                                        float(age.quantile(0.75)))
    if "gender" in df.columns:
        first = df.assign(pid=columns.patient_ids(df["patient_id"])).drop_duplicates("pid")
        out["sex_patients"] = _counts(first["gender"].fillna("(missing)"))
    groups = pd.to_numeric(df["age_group"], errors="coerce")
    out["age_group_images"] = {name: int((groups == g).sum()) for g, name in enumerate(group_names)}
    out["fracture_rate"] = _share(df["fracture"].astype(int) == 1)
    if "cast" in df.columns:
        out["cast_share"] = _share(_flag(df, "cast") == 1)
    if "initial_exam" in df.columns:
        out["initial_exam_share"] = _share(_flag(df, "initial_exam") == 1)
    for col in ("projection", "device_manufacturer"):
        if col in df.columns:
            out[col] = _counts(df[col].fillna("(missing)"))
    return out


def table_one(frames: Mapping[str, pd.DataFrame], group_names: Sequence[str]) -> dict[str, Any]:
    """:func:`characteristics` per partition (train, val, test)."""
    return {name: characteristics(frames[name], group_names) for name in PARTITIONS if name in frames}


def subgroup_values(df: pd.DataFrame, column: str) -> np.ndarray | None:
    """The value of each row for a subgroup column ("initial exam"/"follow-up" for
    ``initial_exam``, whose empty cells mean follow-up), or None if the CSV lacks it."""
    if column not in df.columns:
        return None
    if column == "initial_exam":
        return _flag(df, column).map(lambda v: INITIAL_NAMES.get(v, "follow-up")).to_numpy()
    return df[column].astype(str).str.strip().replace({"": "(missing)", "nan": "(missing)"}).to_numpy()


def error_breakdown(df: pd.DataFrame, y: np.ndarray, pred: np.ndarray, group_names: Sequence[str]) -> dict[str, Any]:
    """False negatives and false positives of one system by AO/OTA first code, projection,
    cast and true age group: per value its images, positives, FN (and FN rate among
    positives), negatives, FP (and FP rate among negatives)."""
    frame = pd.DataFrame({"y": np.asarray(y, int), "pred": np.asarray(pred, int)})
    if "ao_classification" in df.columns:
        frame["ao_first_code"] = first_ao_code(df["ao_classification"].reset_index(drop=True))
    for col in ("projection", "cast"):
        if col in df.columns:
            frame[col] = subgroup_values(df.reset_index(drop=True), col)
    frame["age_group"] = [group_names[int(g)] for g in pd.to_numeric(df["age_group"]).to_numpy()]
    frame["fn"] = (frame.y == 1) & (frame.pred == 0)
    frame["fp"] = (frame.y == 0) & (frame.pred == 1)
    out: dict[str, Any] = {}
    for col in ERROR_COLUMNS:
        if col not in frame.columns:
            continue
        rows = {}
        for value, sub in frame.groupby(col, sort=True):
            pos, neg = int(sub.y.sum()), int((sub.y == 0).sum())
            rows[str(value)] = {"images": int(len(sub)), "positives": pos, "fn": int(sub.fn.sum()),
                                "fn_rate": float(sub.fn.sum() / pos) if pos else float("nan"),
                                "negatives": neg, "fp": int(sub.fp.sum()),
                                "fp_rate": float(sub.fp.sum() / neg) if neg else float("nan")}
        out[col] = rows
    return out


def most_confident_errors(df: pd.DataFrame, y: np.ndarray, prob: np.ndarray, pred: np.ndarray,
                          k: int = 10) -> list[dict[str, Any]]:
    """The ``k`` errors farthest from their label: false positives with the highest and false
    negatives with the lowest probability, ranked by |label - probability|."""
    y, prob, pred = np.asarray(y, int), np.asarray(prob, float), np.asarray(pred, int)
    wrong = np.flatnonzero(pred != y)
    order = wrong[np.argsort(-np.abs(y[wrong] - prob[wrong]), kind="stable")][:k]
    study = df["study_number"].astype(str).to_numpy() if "study_number" in df.columns else None
    return [{"row": int(i), "image": str(df["image_path"].iloc[i]), "patient_id": str(df["patient_id"].iloc[i]),
             "study": None if study is None else study[i], "label": int(y[i]), "probability": float(prob[i]),
             "kind": "FN" if y[i] == 1 else "FP"} for i in order]
