"""Patient-grouped, stratified splits and their checks and manifests.

A patient's images (several projections, several studies, sometimes at
different ages) always land in one split: otherwise a model could recognise
the patient rather than the wrist, and test scores would be inflated. Within
that constraint, sklearn's ``StratifiedGroupKFold`` balances the image-level
strata ``age_group x fracture`` across folds; one fold, the one whose share of
patients is nearest the requested fraction, becomes the held-out split.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

import columns as C
from io_utils import write_csv
from unified_dataset import DataError


def strata(df: pd.DataFrame) -> np.ndarray:
    """Image-level stratum: ``2 * age_group + fracture``."""
    return (df["age_group"].to_numpy(dtype=np.int64) * 2 + df["fracture"].to_numpy(dtype=np.int64))


def _stratum_shares(y: np.ndarray, n_strata: int) -> np.ndarray:
    return np.bincount(y, minlength=n_strata) / max(1, len(y))


def split_patients(df: pd.DataFrame, frac: float, seed: int, source: Any = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split ``df`` into (held-out, rest) by patient, stratified by age group x fracture.

    ``StratifiedGroupKFold(n_splits=round(1/frac), shuffle=True,
    random_state=seed)`` proposes folds; the chosen one is, in order of
    priority, one that leaves every age group of ``df`` present on both sides,
    whose patient share is nearest ``frac``, and whose strata shares are
    closest to the whole. Deterministic for a given ``df`` and ``seed``.
    Both parts keep ``df``'s index (the CSV row numbers) and row order.
    """
    source = source if source is not None else df.attrs.get("source", "<DataFrame>")
    if not 0.0 < frac <= 0.5:
        raise ValueError(f"split fraction must be in (0, 0.5], got {frac}")
    groups = df["patient_id"].astype(str).to_numpy()
    n_patients = len(np.unique(groups))
    n_splits = max(2, int(round(1.0 / frac)))
    if n_patients < n_splits:
        raise DataError.at(source, None, f"only {n_patients} patient(s): a {frac:.0%} patient-level split "
                           f"needs at least {n_splits}")
    y = strata(df)
    n_strata = int(y.max()) + 1 if len(y) else 1
    whole = _stratum_shares(y, n_strata)
    age_groups = set(df["age_group"].tolist())
    ag = df["age_group"].to_numpy()
    sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    best: tuple | None = None
    best_idx: np.ndarray | None = None
    with warnings.catch_warnings():
        # Tiny data: "least populated class has only N members" is expected, not news.
        warnings.simplefilter("ignore", UserWarning)
        folds = [idx for _, idx in sgkf.split(np.zeros(len(df)), y, groups)]
    for k, idx in enumerate(folds):
        held = np.zeros(len(df), dtype=bool)
        held[idx] = True
        missing = len(age_groups - set(ag[held].tolist())) + len(age_groups - set(ag[~held].tolist()))
        share = len(np.unique(groups[held])) / n_patients
        dev = float(np.abs(_stratum_shares(y[held], n_strata) - whole).max())
        key = (missing, round(abs(share - frac), 9), round(dev, 9), k)
        if best is None or key < best:
            best, best_idx = key, idx
    mask = np.zeros(len(df), dtype=bool)
    mask[best_idx] = True
    held_df, rest_df = df.loc[mask].copy(), df.loc[~mask].copy()
    for part in (held_df, rest_df):
        part.attrs["source"] = str(source)
    return held_df, rest_df


def check_disjoint(frames: Mapping[str, pd.DataFrame]) -> None:
    """Raise ``DataError`` if any patient appears in two of ``frames`` (name -> frame).

    The error names the second file, the row of one shared patient there, and
    the first file and row where that patient also is.
    """
    items = list(frames.items())
    for i, (name_a, a) in enumerate(items):
        ids_a = a["patient_id"].astype(str)
        set_a = set(ids_a)
        for name_b, b in items[i + 1:]:
            ids_b = b["patient_id"].astype(str)
            shared = ids_b[ids_b.isin(set_a)]
            if len(shared):
                row_b = shared.index[0]
                pid = shared.iloc[0]
                row_a = ids_a.index[ids_a == pid][0]
                n = shared.nunique()
                raise DataError.at(name_b, row_b, f"patient {pid} is also in {name_a} (row {row_a}); "
                                   f"{n} patient(s) shared: splits must be patient-disjoint")


def check_coverage(df: pd.DataFrame, name: Any, n_groups: int, groups: Sequence[int] | None = None,
                   bounds: Sequence[float] = C.AGE_BOUNDS) -> None:
    """Raise ``DataError`` if ``df`` is empty or lacks one of the age ``groups`` (default: all)."""
    if df.empty:
        raise DataError.at(name, None, "empty split: no images")
    names = C.age_group_names(bounds) if len(bounds) + 1 == n_groups else tuple(map(str, range(n_groups)))
    present = set(df["age_group"].astype(int).tolist())
    for g in (groups if groups is not None else range(n_groups)):
        if g not in present:
            raise DataError.at(name, None, f"age group {g} ({names[g]}) has no images; every split needs "
                               "each age group (use more data, another --split-seed or fraction, or other --age-bounds)")


def split_counts(frames: Mapping[str, pd.DataFrame], n_groups: int) -> dict[str, Any]:
    """Images and patients per split, and images per split x age group x fracture."""
    out: dict[str, Any] = {}
    for name, df in frames.items():
        ag = df["age_group"].astype(int)
        fr = df["fracture"].astype(int)
        by = {str(g): {str(f): int(((ag == g) & (fr == f)).sum()) for f in (0, 1)} for g in range(n_groups)}
        out[name] = {
            "images": int(len(df)),
            "patients": int(df["patient_id"].astype(str).nunique()),
            "fracture_rate": round(float(fr.mean()), 4) if len(df) else None,
            "images_by_age_group_fracture": by,
            "patients_by_age_group": {str(g): int(df.loc[ag == g, "patient_id"].astype(str).nunique())
                                      for g in range(n_groups)},
        }
    return out


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_split_csv(df: pd.DataFrame, path: str | os.PathLike, split: str) -> Path:
    """Write one split with a ``split`` column, columns in contract order, atomically."""
    out = df.copy()
    out["split"] = split
    out = out[C.ordered_columns(out.columns)]
    return write_csv(out, path)


def describe(counts: Mapping[str, Any]) -> str:
    """Human-readable lines for the counts of :func:`split_counts`."""
    lines = []
    for name, c in counts.items():
        per = ", ".join(f"g{g}: {v['0'] + v['1']} ({v['1']} fx)" for g, v in c["images_by_age_group_fracture"].items())
        lines.append(f"  {name:<6} {c['images']:>6} images {c['patients']:>5} patients  fracture rate "
                     f"{c['fracture_rate']}  [{per}]")
    return "\n".join(lines)
