"""splits.py and the stage 1 / stage 2 scripts: leak-free, stratified, reproducible splits."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import age_split_testset
import columns
import generate_age_trainval_split
import io_utils
import splits
import tables
from errors import DataError

SPLIT_FILES = {"test": columns.TEST_CSV, "train": columns.TRAIN_CSV, "val": columns.VAL_CSV}
# Stated tolerances: each age group x fracture stratum's share of a held-out split is within
# STRATUM_TOL of its share in the data split from; the held-out share of patients within
# FRAC_TOL of the requested fraction (one of round(1/frac) folds is taken).
STRATUM_TOL = 0.03
FRAC_TOL = 0.02


def synthetic(n_patients: int, seed: int = 0) -> pd.DataFrame:
    """A metadata-only frame shaped like GRAZPEDWRI-DX (1-5 images per patient)."""
    rng = np.random.default_rng(seed)
    rows = []
    for pid in range(n_patients):
        age = float(rng.choice([3.0, 6.0, 9.0, 11.0, 13.0, 16.0], p=[0.1, 0.12, 0.2, 0.25, 0.18, 0.15]))
        p_fx = {0: 0.8, 1: 0.65, 2: 0.45}[columns.age_to_group(age)]
        fx = int(rng.random() < p_fx)
        for k in range(int(rng.integers(1, 6))):
            rows.append({"image_path": f"/x/{pid}_{k}.png", "patient_id": str(pid), "age": age,
                         "fracture": fx if rng.random() < 0.9 else 1 - fx})
    df = pd.DataFrame(rows)
    df["age_group"] = columns.age_to_group(df["age"].to_numpy())
    df.index = pd.RangeIndex(2, len(df) + 2, name=columns.ROW_INDEX_NAME)
    return df


def assert_stratified(held: pd.DataFrame, whole: pd.DataFrame, frac: float) -> None:
    share = held["patient_id"].nunique() / whole["patient_id"].nunique()
    assert abs(share - frac) <= FRAC_TOL, share
    a = np.bincount(splits.strata(held), minlength=6) / len(held)
    b = np.bincount(splits.strata(whole), minlength=6) / len(whole)
    assert np.abs(a - b).max() <= STRATUM_TOL, (a, b)


def read_splits(out: Path) -> dict[str, pd.DataFrame]:
    return {k: tables.read_split_csv(out / v) for k, v in SPLIT_FILES.items()}


# --------------------------------------------------------------------------- splits.py

def test_split_patients_stratified_and_deterministic() -> None:
    df = synthetic(700)
    held, rest = splits.split_patients(df, 0.15, seed=42)
    assert len(held) + len(rest) == len(df)
    assert not set(held["patient_id"]) & set(rest["patient_id"])
    assert held.index.is_monotonic_increasing and held.index.isin(df.index).all()
    assert_stratified(held, df, 0.15)
    val, train = splits.split_patients(rest, 0.2, seed=42)
    assert_stratified(val, rest, 0.2)
    again, _ = splits.split_patients(df, 0.15, seed=42)
    assert again.index.equals(held.index)
    other, _ = splits.split_patients(df, 0.15, seed=7)
    assert not other.index.equals(held.index)


def test_split_keeps_every_age_group_on_both_sides() -> None:
    df = synthetic(30, seed=3)
    for seed in range(5):
        held, rest = splits.split_patients(df, 0.15, seed)
        assert set(held["age_group"]) == set(rest["age_group"]) == set(df["age_group"])


def test_split_errors() -> None:
    with pytest.raises(DataError, match="only 3 patient"):
        splits.split_patients(synthetic(3), 0.15, seed=0)
    with pytest.raises(ValueError):
        splits.split_patients(synthetic(50), 0.7, seed=0)
    a, b = synthetic(10), synthetic(10)
    b.attrs["source"] = "b.csv"
    with pytest.raises(DataError) as err:
        splits.check_disjoint({"a.csv": a.iloc[:5], "b.csv": a.iloc[3:]})
    assert str(err.value).startswith(f"b.csv:{a.index[3]}: patient ")
    splits.check_disjoint({"a.csv": a[a.patient_id.astype(int) < 5], "b.csv": b[b.patient_id.astype(int) >= 5]})
    with pytest.raises(DataError, match="empty split"):
        splits.check_coverage(a.iloc[:0], "val.csv", (8, 15))
    with pytest.raises(DataError, match=r"^val.csv: age group 2 \(15-19 y\) has no images"):
        splits.check_coverage(a[a.age_group < 2], "val.csv", (8, 15))


def test_real_metadata_split(real_metadata: pd.DataFrame) -> None:
    df = real_metadata
    test, pool = splits.split_patients(df, 0.15, seed=42)
    assert_stratified(test, df, 0.15)
    val, train = splits.split_patients(pool, 0.2, seed=42)
    assert_stratified(val, pool, 0.2)
    splits.check_disjoint({"test": test, "train": train, "val": val})
    assert len(test) + len(train) + len(val) == 20327


# --------------------------------------------------------------------------- stages 1 + 2

def test_tiny_splits_leak_free_and_complete(tiny_splits: Path, tiny_phantom: Path) -> None:
    frames = read_splits(tiny_splits)
    splits.check_disjoint(frames)
    for a in frames:
        for b in frames:
            if a < b:
                assert not set(frames[a]["patient_id"]) & set(frames[b]["patient_id"])
    loaded = tables.validate_frame(tables.load_dataset(tiny_phantom / columns.DATASET_CSV))
    kept, _ = tables.apply_exclusions(loaded)
    together = pd.concat(frames.values())
    assert sorted(together["image_path"]) == sorted(kept["image_path"])  # no row lost or doubled
    for name, df in frames.items():
        assert set(df["split"]) == {name}
        assert set(df["age_group"]) == {0, 1, 2}
        assert list(df.columns[:6]) == list(columns.CANONICAL) + ["split"]
    pool = tables.read_split_csv(tiny_splits / columns.POOL_CSV)
    assert sorted(pool["image_path"]) == sorted(pd.concat([frames["train"], frames["val"]])["image_path"])


def test_manifests(tiny_splits: Path, tiny_phantom: Path) -> None:
    m1 = json.loads((tiny_splits / columns.TEST_MANIFEST).read_text())
    assert m1["seed"] == 42 and m1["test_set"] == "drawn"
    assert m1["source"]["sha256"] == splits.file_sha256(tiny_phantom / columns.DATASET_CSV)
    assert m1["outputs"][columns.TEST_CSV] == splits.file_sha256(tiny_splits / columns.TEST_CSV)
    test = pd.read_csv(tiny_splits / columns.TEST_CSV)
    by = m1["counts"]["test"]["images_by_age_group_fracture"]
    for g in range(3):
        for f in (0, 1):
            assert by[str(g)][str(f)] == int(((test.age_group == g) & (test.fracture == f)).sum())
    metal = int(tables.load_dataset(tiny_phantom / columns.DATASET_CSV)["metal"].sum())
    assert m1["exclusions"]["excluded"]["metal"] == metal
    assert m1["counts"]["test"]["images"] + m1["counts"]["pool"]["images"] == m1["source"]["rows"] - metal
    m2 = json.loads((tiny_splits / columns.TRAINVAL_MANIFEST).read_text())
    assert m2["seed"] == 42 and m2["source"]["sha256"] == splits.file_sha256(tiny_splits / columns.POOL_CSV)
    assert m2["counts"]["train"]["images"] == len(pd.read_csv(tiny_splits / columns.TRAIN_CSV))
    assert columns.RunDir(tiny_splits).config(age_split_testset.SCRIPT).is_file()
    assert columns.RunDir(tiny_splits).config(generate_age_trainval_split.SCRIPT).is_file()


def test_stage1_deterministic(tiny_phantom: Path, tiny_splits: Path, tmp_path: Path) -> None:
    args = ["--data-csv", str(tiny_phantom / columns.DATASET_CSV), "--seed", "42", "--out-dir", str(tmp_path / "again")]
    age_split_testset.main(age_split_testset.get_args_parser().parse_args(args))
    for name in (columns.TEST_CSV, columns.POOL_CSV):
        assert (tmp_path / "again" / name).read_bytes() == (tiny_splits / name).read_bytes()


def test_test_set_kept_unless_force(fresh_splits: Path, tiny_phantom: Path, capsys: pytest.CaptureFixture) -> None:
    test_csv = fresh_splits / columns.TEST_CSV
    before = test_csv.read_bytes()
    train_before = (fresh_splits / columns.TRAIN_CSV).read_bytes()
    base = ["--data-csv", str(tiny_phantom / columns.DATASET_CSV), "--out-dir", str(fresh_splits)]
    res = age_split_testset.main(age_split_testset.get_args_parser().parse_args(base + ["--seed", "7"]))
    assert "exists, reusing it" in capsys.readouterr().out
    assert res["test_kept"] and "test_csv" not in res and test_csv.read_bytes() == before
    assert (fresh_splits / columns.TRAIN_CSV).read_bytes() == train_before
    assert json.loads((fresh_splits / columns.TEST_MANIFEST).read_text())["test_drawn"]["seed"] == 42

    res = age_split_testset.main(age_split_testset.get_args_parser().parse_args(base + ["--seed", "7", "--force"]))
    out = capsys.readouterr().out
    assert "re-drawing it because of --force" in out
    assert not res["test_kept"] and test_csv.read_bytes() != before
    # Train/val from the old test set now share patients with the new one: removed, then redrawn.
    assert "removed" in out and not (fresh_splits / columns.TRAIN_CSV).exists()
    generate_age_trainval_split.main(generate_age_trainval_split.get_args_parser().parse_args(["--out-dir", str(fresh_splits)]))
    splits.check_disjoint(read_splits(fresh_splits))


def test_stage2_keeps_matching_and_redraws(fresh_splits: Path, capsys: pytest.CaptureFixture) -> None:
    train = fresh_splits / columns.TRAIN_CSV
    # Stand-in for stage 3 adding a column: keeping must not lose it.
    df = pd.read_csv(train)
    df["age_group_label"] = df["age_group"]
    df.to_csv(train, index=False)
    res = generate_age_trainval_split.main(generate_age_trainval_split.get_args_parser().parse_args(["--out-dir", str(fresh_splits)]))
    assert res["trainval_kept"] and "keeping them" in capsys.readouterr().out
    assert "age_group_label" in pd.read_csv(train).columns
    res = generate_age_trainval_split.main(generate_age_trainval_split.get_args_parser().parse_args(["--out-dir", str(fresh_splits), "--seed", "3"]))
    assert not res["trainval_kept"] and "re-drawing" in capsys.readouterr().out
    splits.check_disjoint(read_splits(fresh_splits))


def test_stage2_refuses_overlapping_inputs(fresh_splits: Path) -> None:
    pool_csv = fresh_splits / columns.POOL_CSV
    pool = pd.read_csv(pool_csv, dtype=str, keep_default_na=False)
    test = pd.read_csv(fresh_splits / columns.TEST_CSV, dtype=str, keep_default_na=False)
    leak = test.iloc[[0]].assign(split="pool")
    pd.concat([pool, leak]).to_csv(pool_csv, index=False)
    with pytest.raises(DataError) as err:
        generate_age_trainval_split.main(generate_age_trainval_split.get_args_parser().parse_args(["--out-dir", str(fresh_splits)]))
    msg = str(err.value)
    assert msg.startswith(f"{pool_csv}:{len(pool) + 2}: patient {test.patient_id[0]} is also in "), msg
    assert "\n" not in msg


def test_stage2_age_bounds_must_match(fresh_splits: Path) -> None:
    with pytest.raises(DataError, match="stage 1 used --age-bounds"):
        generate_age_trainval_split.main(generate_age_trainval_split.get_args_parser().parse_args(["--out-dir", str(fresh_splits), "--age-bounds", "6", "12"]))


def test_empty_age_group_refused(tiny_phantom: Path, tmp_path: Path) -> None:
    meta = pd.read_csv(tiny_phantom / columns.DATASET_CSV, encoding="utf-8-sig", dtype=str, keep_default_na=False)
    meta["age"] = meta["age"].astype(float).clip(upper=14.0).map(lambda a: f"{a:g}")
    meta.to_csv(tmp_path / columns.DATASET_CSV, index=False, encoding="utf-8-sig")
    args = ["--data-csv", str(tmp_path / columns.DATASET_CSV), "--image-root", str(tiny_phantom),
            "--out-dir", str(tmp_path / "out")]
    with pytest.raises(DataError) as err:
        age_split_testset.main(age_split_testset.get_args_parser().parse_args(args))
    assert str(err.value).startswith(f"{tmp_path / 'dataset.csv'}: age group 2 (15-19 y) has no images")


def test_stage1_generates_default_phantom(tmp_path: Path) -> None:
    res = age_split_testset.main(age_split_testset.get_args_parser().parse_args(
        ["--out-dir", str(tmp_path), "--phantom-patients", "40", "--phantom-img-size", "32"]))
    assert res["phantom_csv"] == tmp_path / "phantom" / columns.DATASET_CSV
    assert (tmp_path / "phantom" / "images").is_dir() and (tmp_path / columns.TEST_CSV).is_file()
    res2 = age_split_testset.main(age_split_testset.get_args_parser().parse_args(
        ["--out-dir", str(tmp_path), "--phantom-patients", "40", "--phantom-img-size", "32"]))
    assert "phantom_csv" not in res2 and res2["test_kept"]  # phantom and test set both reused


@pytest.mark.parametrize("module", [age_split_testset, generate_age_trainval_split])
def test_stage_scripts_help(module, capsys: pytest.CaptureFixture) -> None:
    # In-process: a subprocess would re-import torch for nothing but the parser.
    with pytest.raises(SystemExit) as exc:
        module.get_args_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and "--out-dir" in out and "--seed" in out and "--force" in out
    assert module.__doc__ and "Example" in module.__doc__ and "Outputs" in module.__doc__


# --------------------------------------------------------------------------- the fixed test set is tamper-evident

def _csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")


def _test_patient(out: Path, min_images: int = 2) -> str:
    counts = _csv(out / columns.TEST_CSV).groupby("patient_id").size()
    return str(counts[counts >= min_images].index[0])


def _tamper(out: Path, how: str) -> str:
    """Change age_test.csv by hand as a user or a sync tool might; return the patient involved."""
    path = out / columns.TEST_CSV
    df = _csv(path)
    pid = _test_patient(out, 2)
    if how == "patient dropped":  # e.g. the only image of a patient deleted
        df = df[df.patient_id != pid]
    elif how == "row dropped":
        df = df.drop(index=df.index[df.patient_id == pid][0])
    elif how == "row added":
        pool = _csv(out / columns.POOL_CSV)
        df = pd.concat([df, pool.iloc[[0]].assign(split="test")])
        pid = pool.patient_id.iloc[0]
    elif how == "age edited":
        i = df.index[df.patient_id == pid][0]
        df.loc[i, "age"] = f"{float(df.loc[i, 'age']) + 0.25:g}"  # same age group, other age
    df.to_csv(path, index=False)
    return pid


def _stage_mains(out: Path) -> dict:
    """Every stage's main on ``out`` (training stages with a tiny recipe; they must stop first)."""
    import evaluate
    import train_age_classifier
    import train_fracture_per_agegroup
    fast = ["--out-dir", str(out), "--img-size", "32", "--epochs", "1", "--quiet", "--device", "cpu"]
    return {
        "stage 2": lambda: generate_age_trainval_split.main(generate_age_trainval_split.get_args_parser().parse_args(["--out-dir", str(out)])),
        "stage 3": lambda: train_age_classifier.main(train_age_classifier.get_args_parser().parse_args(fast)),
        "stage 4": lambda: train_fracture_per_agegroup.main(train_fracture_per_agegroup.get_args_parser().parse_args(fast + ["--group-column", "age_group"])),
        "stage 5": lambda: evaluate.main(evaluate.get_args_parser().parse_args(["--out-dir", str(out)])),
    }


def test_tampered_test_csv_stops_every_stage(fresh_splits: Path, tiny_phantom: Path) -> None:
    pool_before = (fresh_splits / columns.POOL_CSV).read_bytes()
    pid = _tamper(fresh_splits, "patient dropped")
    s1 = ["--data-csv", str(tiny_phantom / columns.DATASET_CSV), "--out-dir", str(fresh_splits)]
    with pytest.raises(DataError) as err:
        age_split_testset.main(age_split_testset.get_args_parser().parse_args(s1))
    msg = str(err.value)
    assert msg.startswith(f"{fresh_splits / 'age_test.csv'}: the fixed test set changed since stage 1 drew it")
    assert f"patient(s) {pid} no longer in it" in msg and "row(s) removed" in msg and "--force" in msg
    assert "\n" not in msg
    # the patient did not move into the pool: nothing was rewritten
    assert (fresh_splits / columns.POOL_CSV).read_bytes() == pool_before
    for stage, run in _stage_mains(fresh_splits).items():
        with pytest.raises(DataError, match="the fixed test set changed since stage 1 drew it") as err:
            run()
        assert str(err.value).startswith(str(fresh_splits / columns.TEST_CSV)), stage
    assert not (fresh_splits / columns.MODELS_DIR).exists()  # stopped before any training

    # --force re-draws: a new identity, and the later stages accept the new test set
    age_split_testset.main(age_split_testset.get_args_parser().parse_args(s1 + ["--force"]))
    generate_age_trainval_split.main(generate_age_trainval_split.get_args_parser().parse_args(["--out-dir", str(fresh_splits)]))
    splits.check_disjoint(read_splits(fresh_splits))


@pytest.mark.parametrize("how, words", [
    ("row dropped", ["1 row(s) removed"]),
    ("row added", ["1 row(s) added", "not in it when drawn"]),
    ("age edited", ["rows edited"]),
])
def test_tampered_test_csv_says_what_changed(fresh_splits: Path, how: str, words: list[str]) -> None:
    pid = _tamper(fresh_splits, how)
    with pytest.raises(DataError) as err:
        generate_age_trainval_split.main(generate_age_trainval_split.get_args_parser().parse_args(["--out-dir", str(fresh_splits)]))
    msg = str(err.value)
    assert "the fixed test set changed since stage 1 drew it" in msg and "\n" not in msg
    for w in words:
        assert w in msg, msg
    if how == "row added":
        assert pid in msg  # the pool patient that moved in is named
    assert "age_split_testset.py --force" in msg


def test_test_set_identity_ignores_added_columns_and_row_order(fresh_splits: Path, tiny_phantom: Path) -> None:
    path = fresh_splits / columns.TEST_CSV
    df = _csv(path)
    df["age_group_label"] = df["age_group"]  # what stage 3 adds
    df["age_group_prob_0"] = "0.5"
    df.iloc[::-1].to_csv(path, index=False)
    generate_age_trainval_split.main(generate_age_trainval_split.get_args_parser().parse_args(["--out-dir", str(fresh_splits)]))
    res = age_split_testset.main(age_split_testset.get_args_parser().parse_args(
        ["--data-csv", str(tiny_phantom / columns.DATASET_CSV), "--out-dir", str(fresh_splits)]))
    assert res["test_kept"]
    ident = splits.identity_of_test_set(tables.read_split_csv(path))
    assert json.loads((fresh_splits / columns.TEST_MANIFEST).read_text())[splits.IDENTITY_KEY] == ident
    assert sum(ident["images_per_patient"].values()) == ident["images"] == len(df)


def test_manifest_without_identity_is_recorded_on_rerun(fresh_splits: Path, tiny_phantom: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    manifest = fresh_splits / columns.TEST_MANIFEST
    old = json.loads(manifest.read_text())
    recorded = old.pop(splits.IDENTITY_KEY)
    manifest.write_text(json.dumps(old))  # as an older version wrote it
    generate_age_trainval_split.main(generate_age_trainval_split.get_args_parser().parse_args(["--out-dir", str(fresh_splits)]))
    assert "records no identity of the test set" in capsys.readouterr().out
    age_split_testset.main(age_split_testset.get_args_parser().parse_args(
        ["--data-csv", str(tiny_phantom / columns.DATASET_CSV), "--out-dir", str(fresh_splits)]))
    assert "recording it now" in capsys.readouterr().out
    assert json.loads(manifest.read_text())[splits.IDENTITY_KEY] == recorded
    _tamper(fresh_splits, "row dropped")  # from now on a change is caught
    with pytest.raises(DataError, match="changed since stage 1 drew it"):
        generate_age_trainval_split.main(generate_age_trainval_split.get_args_parser().parse_args(["--out-dir", str(fresh_splits)]))


def _changed_dataset(tiny_phantom: Path, tiny_splits: Path, tmp_path: Path, how: str) -> Path:
    """A copy of the phantom's dataset.csv with one test image's row changed as ``how`` says."""
    meta = _csv(tiny_phantom / columns.DATASET_CSV)
    test = _csv(tiny_splits / columns.TEST_CSV)
    pool = _csv(tiny_splits / columns.POOL_CSV)
    stem = Path(test.image_path[0]).stem
    i = meta.index[meta.filestem == stem][0]
    if how == "image removed":
        meta = meta.drop(index=i)
    elif how == "image moved to a pool patient":
        meta.loc[i, "patient_id"] = pool.patient_id[0]
    elif how == "label changed":
        meta.loc[i, "fracture_visible"] = "" if meta.loc[i, "fracture_visible"] == "1" else "1"
    elif how == "age changed":
        meta.loc[i, "age"] = f"{float(meta.loc[i, 'age']) + 0.5:g}"
    meta.to_csv(tmp_path / columns.DATASET_CSV, index=False, encoding="utf-8-sig")
    return tmp_path / columns.DATASET_CSV


@pytest.mark.parametrize("how, words", [
    ("image removed", "is not in"),
    ("image moved to a pool patient", "belongs to patient"),
    ("label changed", "has fracture label"),
    ("age changed", "has age"),
])
def test_kept_test_set_checked_against_changed_dataset(fresh_splits: Path, tiny_phantom: Path, tiny_splits: Path,
                                                       tmp_path: Path, how: str, words: str) -> None:
    data_csv = _changed_dataset(tiny_phantom, tiny_splits, tmp_path, how)
    pool_before = (fresh_splits / columns.POOL_CSV).read_bytes()
    with pytest.raises(DataError) as err:
        age_split_testset.main(age_split_testset.get_args_parser().parse_args(
            ["--data-csv", str(data_csv), "--image-root", str(tiny_phantom), "--out-dir", str(fresh_splits)]))
    msg = str(err.value)
    assert msg.startswith(f"{fresh_splits / 'age_test.csv'}:2: ") and words in msg and "--force" in msg, msg
    assert (fresh_splits / columns.POOL_CSV).read_bytes() == pool_before


def test_whitespace_in_patient_ids_does_not_split_a_patient(tiny_phantom: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    meta = _csv(tiny_phantom / columns.DATASET_CSV)
    n_patients = meta.patient_id.nunique()
    # every patient with several images gets a stray space on one of them, before or after
    for k, (pid, rows) in enumerate(meta.groupby("patient_id").groups.items()):
        if len(rows) > 1:
            meta.loc[rows[-1], "patient_id"] = f"{pid} " if k % 2 else f"\t{pid}"
    meta.to_csv(tmp_path / columns.DATASET_CSV, index=False, encoding="utf-8-sig")
    age_split_testset.main(age_split_testset.get_args_parser().parse_args(["--data-csv", str(tmp_path / columns.DATASET_CSV), "--image-root",
                                             str(tiny_phantom), "--out-dir", str(tmp_path / "out")]))
    generate_age_trainval_split.main(generate_age_trainval_split.get_args_parser().parse_args(["--out-dir", str(tmp_path / "out")]))
    frames = read_splits(tmp_path / "out")
    splits.check_disjoint(frames)
    ids = pd.concat([df.patient_id for df in frames.values()])
    assert ids.map(lambda s: s == s.strip()).all()
    assert ids.nunique() == n_patients
    # written ids are the stripped ones, so a later stage reading them agrees
    raw = pd.concat([_csv(tmp_path / "out" / f) for f in SPLIT_FILES.values()])
    assert raw.patient_id.map(lambda s: s == s.strip()).all()
    assert "differ only in case or leading zeros" not in capsys.readouterr().out


def test_patient_ids_case_and_leading_zeros_count(tiny_phantom: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    a, b = columns.patient_ids(["007", "7 "]), columns.patient_ids(["A1", "a1"])
    assert a.tolist() == ["007", "7"] and b.nunique() == 2
    with pytest.raises(DataError, match="patient 7 is also in"):
        splits.check_disjoint({"a.csv": pd.DataFrame({"patient_id": ["7 "]}), "b.csv": pd.DataFrame({"patient_id": ["7"]})})
    splits.check_disjoint({"a.csv": pd.DataFrame({"patient_id": ["007"]}), "b.csv": pd.DataFrame({"patient_id": ["7"]})})
    meta = _csv(tiny_phantom / columns.DATASET_CSV)
    meta.loc[meta.patient_id == "1", "patient_id"] = ["1", "01"][: int((meta.patient_id == "1").sum())]
    meta.to_csv(tmp_path / columns.DATASET_CSV, index=False, encoding="utf-8-sig")
    age_split_testset.main(age_split_testset.get_args_parser().parse_args(["--data-csv", str(tmp_path / columns.DATASET_CSV), "--image-root",
                                             str(tiny_phantom), "--out-dir", str(tmp_path / "o")]))
    assert "'01' / '1'" in capsys.readouterr().out


def test_symlinked_image_under_another_patient_is_refused(tiny_phantom: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_phantom, data, symlinks=True)
    meta = _csv(data / columns.DATASET_CSV)
    first = meta.iloc[0]
    other = meta.patient_id[meta.patient_id != first.patient_id].iloc[0]
    (data / "images" / "alias.png").symlink_to(data / "images" / f"{first.filestem}.png")
    meta = pd.concat([meta, meta.iloc[[1]].assign(filestem="alias", patient_id=other)], ignore_index=True)
    meta.to_csv(data / columns.DATASET_CSV, index=False, encoding="utf-8-sig")
    args = ["--data-csv", str(data / columns.DATASET_CSV), "--out-dir", str(tmp_path / "out")]
    with pytest.raises(DataError) as err:
        age_split_testset.main(age_split_testset.get_args_parser().parse_args(args))
    last = len(meta) + 1
    msg = str(err.value)
    assert msg.startswith(f"{data / 'dataset.csv'}:2: ") and f"row {last}" in msg, msg
    assert "one image cannot belong to two patients" in msg and f"patient {other}" in msg

    res = age_split_testset.main(age_split_testset.get_args_parser().parse_args(args + ["--skip-bad"]))
    rejected = pd.read_csv(res["rejected_csv"])
    assert rejected.source_row.tolist() == [2, last]  # we cannot know which patient is right: both go
    kept = pd.concat([pd.read_csv(res["test_csv"]), pd.read_csv(res["pool_csv"])])
    real = kept.image_path.map(os.path.realpath)
    assert not real.duplicated().any()
    assert os.path.realpath(data / "images" / f"{first.filestem}.png") not in set(real)


@pytest.mark.parametrize("decode", [False, True])
def test_stage1_says_how_long_its_image_check_took(tiny_phantom: Path, tmp_path: Path, capsys, decode: bool) -> None:
    args = ["--data-csv", str(tiny_phantom / columns.DATASET_CSV), "--out-dir", str(tmp_path)]
    age_split_testset.main(age_split_testset.get_args_parser().parse_args(args + (["--decode-check"] if decode else [])))
    n = len(tables.load_dataset(tiny_phantom / columns.DATASET_CSV))
    check = json.loads((tmp_path / columns.TEST_MANIFEST).read_text())["image_check"]
    mode = "decode" if decode else "cheap"
    threads = io_utils.default_workers() if decode else 1  # the cheap check: one thread per 256 files
    assert check["mode"] == mode and check["files"] == n and check["threads"] == threads
    assert isinstance(check["seconds"], float) and check["seconds"] >= 0
    assert (f"image check ({mode}, {threads} thread(s)): {n} files in {check['seconds']:.1f} s"
            in capsys.readouterr().out)


def test_stage2_follows_a_metadata_only_stage1(tiny_phantom: Path, tmp_path: Path, capsys) -> None:
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_phantom, data)
    out = tmp_path / "out"
    age_split_testset.main(age_split_testset.get_args_parser().parse_args(["--data-csv", str(data / columns.DATASET_CSV), "--out-dir", str(out),
                                             "--no-image-check"]))
    assert json.loads((out / columns.TEST_MANIFEST).read_text())["image_check"] == {"mode": "none"}
    missing = Path(pd.read_csv(out / columns.POOL_CSV)["image_path"][3])
    missing.unlink()  # metadata only: the images need not be there
    generate_age_trainval_split.main(generate_age_trainval_split.get_args_parser().parse_args(["--out-dir", str(out)]))
    assert "stage 1 split without looking at the images (--no-image-check): so does this stage" \
        in capsys.readouterr().out
    # without that record stage 2 looks at the images, and stops at the missing one
    manifest = json.loads((out / columns.TEST_MANIFEST).read_text())
    manifest["image_check"] = {"mode": "cheap"}
    (out / columns.TEST_MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=f"image file not found: {missing}"):
        generate_age_trainval_split.main(generate_age_trainval_split.get_args_parser().parse_args(["--out-dir", str(out), "--force"]))
