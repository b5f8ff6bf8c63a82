"""Patient-grouped, stratified splits and their checks and manifests.

A patient's images (several projections, several studies, sometimes at
different ages) always land in one split: otherwise a model could recognise
the patient rather than the wrist, and test scores would be inflated. Within
that constraint, sklearn's ``StratifiedGroupKFold`` balances the image-level
strata ``age_group x fracture`` across folds; one fold, the one whose share of
patients is nearest the requested fraction, becomes the held-out split.

Patient ids are compared as :func:`columns.patient_ids` gives them (text, surrounding
whitespace removed). The fixed test set is tamper-evident: stage 1 records its identity
(:func:`identity_of_test_set`) in ``age_test_split.json``, and every stage checks it, and
that no patient or image is in two split CSVs, before using them (:func:`check_splits`).
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

import columns
import tables
from errors import CheckpointError, DataError
from io_utils import write_csv


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
    groups = columns.patient_ids(df["patient_id"]).to_numpy()
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
        ids_a = columns.patient_ids(a["patient_id"])
        set_a = set(ids_a)
        for name_b, b in items[i + 1:]:
            ids_b = columns.patient_ids(b["patient_id"])
            shared = ids_b[ids_b.isin(set_a)]
            if len(shared):
                row_b = shared.index[0]
                pid = shared.iloc[0]
                row_a = ids_a.index[ids_a == pid][0]
                n = shared.nunique()
                raise DataError.at(name_b, row_b, f"patient {pid} is also in {name_a} (row {row_a}); "
                                   f"{n} patient(s) shared: splits must be patient-disjoint")


def check_coverage(df: pd.DataFrame, name: Any, bounds: Sequence[float], groups: Sequence[int] | None = None) -> None:
    """Raise ``DataError`` if ``df`` is empty or lacks one of the age ``groups`` (default: all
    groups of the age ``bounds``)."""
    if df.empty:
        raise DataError.at(name, None, "empty split: no images")
    names = columns.age_group_names(bounds)
    present = set(df["age_group"].astype(int).tolist())
    for g in (groups if groups is not None else range(columns.num_age_groups(bounds))):
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
            "patients": int(columns.patient_ids(df["patient_id"]).nunique()),
            "fracture_rate": round(float(fr.mean()), 4) if len(df) else None,
            "images_by_age_group_fracture": by,
            "patients_by_age_group": {str(g): int(columns.patient_ids(df.loc[ag == g, "patient_id"]).nunique())
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
    out = out[columns.ordered_columns(out.columns)]
    return write_csv(out, path)


def describe(counts: Mapping[str, Any]) -> str:
    """Human-readable lines for the counts of :func:`split_counts`."""
    lines = []
    for name, c in counts.items():
        per = ", ".join(f"g{g}: {v['0'] + v['1']} ({v['1']} fx)" for g, v in c["images_by_age_group_fracture"].items())
        lines.append(f"  {name:<6} {c['images']:>6} images {c['patients']:>5} patients  fracture rate "
                     f"{c['fracture_rate']}  [{per}]")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the fixed test set's identity
IDENTITY_KEY = "test_identity"


def identity_of_test_set(test: pd.DataFrame) -> dict[str, Any]:
    """What makes the test set the one that was drawn, independent of its file's bytes.

    ``sha256`` of the canonical columns in a normalised text form (one tab-separated line
    per image, rows sorted by ``image_path``; ids as :func:`columns.patient_ids`, ages as
    ``repr(float)``), plus the number of images of each patient. Columns later stages add
    (stage 3's predictions) and the row order do not change it; any added, removed or
    edited row does.
    """
    canon = pd.DataFrame({
        "image_path": test["image_path"].astype(str).to_numpy(),
        "patient_id": columns.patient_ids(test["patient_id"]).to_numpy(),
        "age": [repr(float(a)) for a in test["age"]],
        "age_group": [str(int(g)) for g in test["age_group"]],
        "fracture": [str(int(f)) for f in test["fracture"]],
    }).sort_values(["image_path", "patient_id"], kind="mergesort")
    lines = ["\t".join(columns.CANONICAL)] + ["\t".join(row) for row in canon.itertuples(index=False, name=None)]
    digest = hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()
    per_patient = canon.groupby("patient_id", sort=True).size()
    return {"sha256": digest, "images": int(len(canon)), "columns": list(columns.CANONICAL),
            "images_per_patient": {str(p): int(n) for p, n in per_patient.items()}}


def _few(ids: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(map(str, ids[:n]))
    return shown + (f" (+{len(ids) - n} more)" if len(ids) > n else "")


def describe_identity_change(recorded: Mapping[str, Any], now: Mapping[str, Any]) -> str:
    """What differs between two :func:`identity_of_test_set` results, in a few words."""
    old, new = recorded.get("images_per_patient", {}), now["images_per_patient"]
    removed = sum(max(0, n - new.get(p, 0)) for p, n in old.items())
    added = sum(max(0, n - old.get(p, 0)) for p, n in new.items())
    gone = sorted(set(old) - set(new))
    came = sorted(set(new) - set(old))
    parts = []
    if removed:
        parts.append(f"{removed} row(s) removed")
    if added:
        parts.append(f"{added} row(s) added")
    if gone:
        parts.append(f"patient(s) {_few(gone)} no longer in it")
    if came:
        parts.append(f"patient(s) {_few(came)} not in it when drawn")
    if not (removed or added):
        parts.append("rows edited (image_path, patient_id, age, age_group or fracture)")
    return f"{recorded.get('images', '?')} -> {now['images']} images: " + ", ".join(parts)


def recorded_test_identity(manifest: str | os.PathLike) -> dict[str, Any] | None:
    """The identity stage 1 recorded in ``manifest`` (None when the manifest has none)."""
    manifest = Path(manifest)
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError) as exc:
        raise DataError.at(manifest, None, f"cannot read stage 1's manifest ({exc}); restore it, or re-draw "
                           "the test set with age_split_testset.py --force") from None
    ident = data.get(IDENTITY_KEY) if isinstance(data, dict) else None
    return ident if isinstance(ident, dict) and "sha256" in ident else None


def verify_test_set(test: pd.DataFrame, test_csv: str | os.PathLike, recorded: Mapping[str, Any],
                    remedy: str = "restore it, or re-draw the test set with age_split_testset.py --force "
                                  "(run_all_training.py --force)") -> None:
    """Raise ``DataError`` (one line: what changed, how to proceed) if ``test`` is not the
    test set whose identity stage 1 recorded."""
    now = identity_of_test_set(test)
    if now["sha256"] != recorded["sha256"]:
        raise DataError.at(test_csv, None, "the fixed test set changed since stage 1 drew it ("
                           + describe_identity_change(recorded, now) + f"); {remedy}")


# --------------------------------------------------------------------------- the run's age groups
def _bounds_text(bounds: Sequence[float]) -> str:
    return " ".join(f"{float(b):g}" for b in bounds)


def recorded_age_groups(test_csv: str | os.PathLike, given: Sequence[float] | None = None,
                        given_by: str = "--age-bounds",
                        remedy: str = "leave the option out (stages 2-5 follow stage 1), or re-draw the splits "
                                      "with those bounds (age_split_testset.py --age-bounds ... --force)"
                        ) -> tuple[tuple[float, ...], tuple[str, ...]]:
    """The age bounds and group names of the run whose fixed test set is ``test_csv``: those
    stage 1 recorded in ``age_test_split.json`` beside it, the one source every later stage
    takes them from. ``given`` (a stage's ``--age-bounds``, or what a checkpoint recorded,
    described by ``given_by``) must match them, else ``DataError`` in one line naming both.
    Without a manifest that records them, ``given`` is used; without either, ``DataError``."""
    manifest = Path(test_csv).parent / columns.TEST_MANIFEST
    data: dict[str, Any] = {}
    if manifest.is_file():
        try:
            data = json.loads(manifest.read_text())
        except (OSError, ValueError) as exc:
            raise DataError.at(manifest, None, f"cannot read stage 1's manifest ({exc}); restore it, or re-draw "
                               "the test set with age_split_testset.py --force") from None
    recorded = data.get("age_bounds") if isinstance(data, dict) else None
    if recorded is None:
        if given is None:
            raise DataError.at(manifest, None, "no age bounds recorded (stage 1 writes them): run "
                               "age_split_testset.py first, or pass --age-bounds")
        bounds = tuple(float(b) for b in given)
        return bounds, columns.age_group_names(bounds)
    bounds = tuple(float(b) for b in recorded)
    if given is not None and tuple(float(b) for b in given) != bounds:
        raise DataError.at(manifest, None, f"stage 1 used --age-bounds {_bounds_text(bounds)}, not {given_by} "
                           f"{_bounds_text(given)}: {remedy}")
    names = data.get("age_group_names")
    if not isinstance(names, list) or len(names) != len(bounds) + 1:
        names = columns.age_group_names(bounds)
    return bounds, tuple(str(n) for n in names)


def check_images_disjoint(frames: Mapping[str, pd.DataFrame]) -> None:
    """Raise ``DataError`` if one image path is in two of ``frames`` (name -> frame)."""
    items = list(frames.items())
    for i, (name_a, a) in enumerate(items):
        paths_a = a["image_path"].astype(str).map(os.path.normpath)
        set_a = set(paths_a)
        for name_b, b in items[i + 1:]:
            paths_b = b["image_path"].astype(str).map(os.path.normpath)
            shared = paths_b[paths_b.isin(set_a)]
            if len(shared):
                row_a = paths_a.index[paths_a == shared.iloc[0]][0]
                raise DataError.at(name_b, shared.index[0], f"image {shared.iloc[0]} is also in {name_a} "
                                   f"(row {row_a}); {len(shared)} image(s) shared: splits must not share images")


def check_splits(frames: Mapping[str, pd.DataFrame], test_csv: str | os.PathLike | None = None,
                 also: Sequence[str | os.PathLike] = ()) -> list[str]:
    """What every stage checks before it uses the split CSVs; returns notes to print.

    ``frames``: path -> frame of the split CSVs the stage read; ``also``: further split
    CSVs to include when they exist (read here). Checks, in this order: the test set
    (``frames[str(test_csv)]``) is the one stage 1 drew, by the identity recorded in
    ``age_test_split.json`` beside it (a note when there is none to check against); no
    patient and no image is in two of the CSVs. Raises ``DataError`` otherwise.
    """
    frames = dict(frames)
    for path in also:
        if str(path) not in frames and Path(path).is_file():
            frames[str(path)] = tables.read_split_csv(path, validate=False)
    notes = []
    if test_csv is not None:
        manifest = Path(test_csv).parent / columns.TEST_MANIFEST
        recorded = recorded_test_identity(manifest) if manifest.is_file() else None
        if recorded is not None:
            verify_test_set(frames[str(test_csv)], test_csv, recorded)
        elif manifest.is_file():
            notes.append(f"{manifest} (from an older version) records no identity of the test set, so "
                         f"{test_csv} is not checked against it; re-running age_split_testset.py records it")
        else:
            notes.append(f"no {columns.TEST_MANIFEST} beside {test_csv}: the test set's identity is not checked")
    check_disjoint(frames)
    check_images_disjoint(frames)
    return notes


# --------------------------------------------------------------------------- models and the test set
# The key under which a trained checkpoint records the identity of the test set its run kept
# it away from: a checkpoint from a run with another test set may have trained on this run's
# test patients.
TEST_SET_KEY = "test_set_sha256"


def recorded_test_sha256(test_csv: str | os.PathLike | None) -> str | None:
    """The test set's identity (sha256) stage 1 recorded beside ``test_csv``; None without one."""
    if test_csv is None:
        return None
    manifest = Path(test_csv).parent / columns.TEST_MANIFEST
    ident = recorded_test_identity(manifest) if manifest.is_file() else None
    return ident["sha256"] if ident else None


def check_trained_apart(checkpoints: Mapping[str | os.PathLike, Mapping[str, Any]],
                        test_csv: str | os.PathLike) -> list[str]:
    """Raise ``CheckpointError`` (one line) for the first checkpoint (path -> its metadata)
    trained in a run with another test set than ``test_csv``'s; notes for those that record
    none (older versions) or when this test set has no recorded identity."""
    now = recorded_test_sha256(test_csv)
    if now is None:
        return [f"{test_csv} has no recorded identity: the models are not checked against it"]
    notes = []
    for path, meta in checkpoints.items():
        then = meta.get(TEST_SET_KEY)
        if then is None:
            notes.append(f"{path} records no test set (an older version trained it): not checked against {test_csv}")
        elif then != now:
            raise CheckpointError(
                f"{path}: trained in a run with another test set (sha256 {then[:12]}, this run's {now[:12]}), so it "
                f"may have trained on this run's test patients; retrain it here, or evaluate it in its own run directory")
    return notes
