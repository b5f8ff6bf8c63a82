"""Stage 1: draw the fixed, patient-level test set.

Patients, not images, are split: every image of a test patient is in the test set
and no other patient's image is. The split is stratified by age group x fracture
(sklearn ``StratifiedGroupKFold``) and deterministic for a given ``--split-seed``
(``--seed``). Once
``age_test.csv`` exists it is kept and reused (the remaining patients are derived
from it again); drawing a new one needs ``--force``, and the run says which happened.
A kept test set must be the one that was drawn (its identity, recorded in the
manifest, is checked: a removed, added or edited row stops the run, so a test
patient can never move into the pool) and must still match the dataset.

Inputs
    ``--data-csv``: GRAZPEDWRI-DX's ``dataset.csv`` as distributed, or a generic CSV
    (``--format generic`` and the ``--*-col`` mapping); ``--image-root``: its images,
    searched in all sub-folders (default: the CSV's folder). With neither flag, a
    phantom dataset is generated into ``<out-dir>/phantom`` (reused if present).
Outputs (in ``--out-dir``)
    ``age_test.csv`` (the test set), ``age_pool.csv`` (every other patient; input of
    stage 2), ``age_test_split.json`` (seed, source file and its SHA-256, the test set's
    identity (``splits.identity_of_test_set``), exclusion counts, images per split x age
    group x fracture), ``age_split_testset_config.json``
    and, with ``--skip-bad``, ``rejected_rows.csv``.

Example::

    python age_split_testset.py --out-dir runs/demo                      # phantom data
    python age_split_testset.py --data-csv /data/GRAZPEDWRI-DX/dataset.csv \\
        --image-root /data/GRAZPEDWRI-DX --out-dir runs/real --split-seed 42
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import pandas as pd

import columns
import environment
import errors
import io_utils
import phantom
import presets
import splits
import tables
from config import print_config, save_config, to_dict
from errors import DataError
from io_utils import RunLock, write_json
from splits import check_coverage, check_disjoint, describe, file_sha256, split_counts, split_patients, write_split_csv

SCRIPT = "age_split_testset"
# What the phantom in <out-dir>/phantom was generated with (regenerated when the flags differ).
PHANTOM_PARAMS = "phantom_params.json"


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Stage 1: the fixed patient-level test set (age_test.csv).",
                                add_help=add_help, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out-dir", type=Path, default=Path("."), help="where the split files go")
    p.add_argument("--force", action="store_true", help="re-draw age_test.csv even if it exists")
    presets.add_split_args(p, "testset")
    return p


def _resolve_source(args: argparse.Namespace, run: columns.RunDir) -> tuple[Path, Path | None, bool]:
    """(dataset CSV, image root, generated?) from the flags; generates the phantom if needed."""
    if args.data_csv is not None:
        return Path(args.data_csv), args.image_root, False
    if args.image_root is not None:
        csv = Path(args.image_root) / columns.DATASET_CSV
        if not csv.is_file():
            raise DataError.at(csv, None, f"no --data-csv given and no {columns.DATASET_CSV} in --image-root")
        return csv, Path(args.image_root), False
    pdir = run.phantom_dir
    csv = pdir / columns.DATASET_CSV
    marker = pdir / PHANTOM_PARAMS
    params = {"n_patients": args.phantom_patients, "img_size": args.phantom_img_size, "seed": args.phantom_seed}
    if csv.is_file() and marker.is_file() and json.loads(marker.read_text()) == params:
        print(f"phantom: reusing {csv} ({params})")
        return csv, pdir, False
    print(f"phantom: no dataset given, generating one into {pdir} ({params})")
    start = time.perf_counter()
    phantom.generate_phantom(pdir, n_patients=args.phantom_patients, img_size=args.phantom_img_size,
                             seed=args.phantom_seed, progress=True)
    secs = time.perf_counter() - start
    n = len(pd.read_csv(csv, encoding="utf-8-sig", usecols=[0]))
    print(f"phantom: {n} images in {secs:.1f} s ({n / max(secs, 1e-9):.0f} images/s)")
    write_json(params, marker)
    return csv, pdir, True


def _check_kept_test(test: pd.DataFrame, loaded: pd.DataFrame, test_csv: Path, data_csv: Path,
                     bounds: tuple[float, ...]) -> list[str]:
    """A kept test set must still describe the current dataset, or the pool could leak.

    Raises ``DataError`` for a test image the dataset no longer has, or has under another
    patient (it would then go to the pool as well), or with another label or age; the
    age group must follow from the age with ``bounds``. Returns notes (images of test
    patients that the dataset has but the test set does not: they stay out of every split).
    """
    by_image = {p: (pid, fx, age) for p, pid, fx, age in zip(
        loaded["image_path"].astype(str), columns.patient_ids(loaded["patient_id"]), loaded["fracture"],
        loaded["age"])}
    redraw = "; re-draw the test set with --force"
    for row, path, pid, age, group, fx in zip(test.index, test["image_path"].astype(str),
                                              columns.patient_ids(test["patient_id"]), test["age"],
                                              test["age_group"], test["fracture"]):
        if path not in by_image:
            raise DataError.at(test_csv, row, f"image {path} is not in {data_csv}: the dataset changed "
                               f"since the test set was drawn{redraw}")
        if by_image[path][0] != pid:
            raise DataError.at(test_csv, row, f"image {path} belongs to patient {by_image[path][0]} in {data_csv} "
                               f"but to patient {pid} here{redraw}")
        if columns.age_to_group(float(age), bounds) != int(group):
            raise DataError.at(test_csv, row, f"age_group {group} does not match age {age:g} with --age-bounds "
                               f"{list(bounds)}: the test set was drawn with other bounds{redraw}")
        _, label, src_age = by_image[path]
        if pd.isna(label) or float(label) != float(fx):
            raise DataError.at(test_csv, row, f"image {path} has fracture label {label} in {data_csv} "
                               f"but {fx} here: the dataset changed since the test set was drawn{redraw}")
        if pd.isna(src_age) or float(src_age) != float(age):
            raise DataError.at(test_csv, row, f"image {path} has age {src_age:g} in {data_csv} but {age:g} "
                               f"here: the dataset changed since the test set was drawn{redraw}")
    test_ids = set(columns.patient_ids(test["patient_id"]))
    in_test = set(test["image_path"].astype(str))
    extra = [p for p, (pid, _, _) in by_image.items() if pid in test_ids and p not in in_test]
    if extra:
        return [f"{len(extra)} image(s) of test patients are in {data_csv} but not in {test_csv} (added since it "
                f"was drawn, e.g. {extra[0]}); they are left out of every split (--force re-draws the test set)"]
    return []


def _stale_splits(run: columns.RunDir, test: pd.DataFrame) -> dict[Path, int]:
    """Train/val files (stage 2's) from an earlier test set that share patients with it (a
    leak, to be removed): path -> number of their images that belong to test patients."""
    test_ids = set(columns.patient_ids(test["patient_id"]))
    stale = {}
    for path in (run.train_csv, run.val_csv):
        if not path.is_file():
            continue
        ids = columns.patient_ids(pd.read_csv(path, usecols=["patient_id"], dtype=str)["patient_id"])
        shared = int(ids.isin(test_ids).sum())
        if shared:
            stale[path] = shared
    return stale


def load_checked(args: argparse.Namespace, run: columns.RunDir, bounds: tuple[float, ...],
                 wrote: dict[str, Any]) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """The dataset as loaded, the rows that pass validation and exclusions, and the source
    record for the manifest."""
    data_csv, image_root, generated = _resolve_source(args, run)
    if generated:
        wrote["phantom_csv"] = data_csv
    column_map = tables.ColumnMap(image=args.image_col, patient=args.patient_col, age=args.age_col,
                                  label=args.label_col)
    loaded = tables.load_dataset(data_csv, image_root, fmt=args.format, column_map=column_map, age_bounds=bounds)
    # stage 1 starts the rejected rows afresh; later stages add theirs
    df = tables.validate_frame(loaded, data_csv,
                               tables.Checks(images=not args.no_image_check, decode=args.decode_check),
                               tables.BadRows(skip=args.skip_bad, rejected_csv=run.rejected_csv, append=False),
                               age_bounds=bounds)
    n_rejected = int(df.attrs.get("n_rejected", 0))
    if n_rejected:
        wrote["rejected_csv"] = run.rejected_csv
    image_check = df.attrs.get("image_check", {"mode": "none"})
    df, excl = tables.apply_exclusions(df, args.exclude)
    print(f"{data_csv}: {len(loaded)} rows, {n_rejected} rejected, excluded {excl['excluded']} "
          f"-> {len(df)} images of {df['patient_id'].nunique()} patients")
    check_coverage(df, data_csv, bounds)
    lookalikes = columns.lookalike_patient_ids(df["patient_id"])
    if lookalikes:
        shown = "; ".join(" / ".join(repr(i) for i in g) for g in lookalikes[:3])
        print(f"note: {data_csv}: {len(lookalikes)} group(s) of patient ids differ only in case or leading "
              f"zeros ({shown}); they are different patients here, as ids are compared as text")
    source = {"csv": str(Path(data_csv).resolve()), "sha256": file_sha256(data_csv), "format": args.format,
              "image_root": str(image_root) if image_root is not None else None, "rows": int(len(loaded)),
              "phantom_generated": generated, "rejected_rows": n_rejected, "exclusions": excl,
              # stage 2 follows a metadata-only split (mode "none"); the seconds say what the check cost
              "image_check": image_check, "path": Path(data_csv)}
    return loaded, df, source


def _check_unrecorded_test(test: pd.DataFrame, usable: pd.DataFrame, test_csv: Path, pool_csv: Path) -> None:
    """Without a recorded identity, the pool written with the test set still tells which
    patients were not test: a dataset patient in neither may have been removed from the test
    set by hand, and would now leak into training. Raises ``DataError`` (one line)."""
    if not pool_csv.is_file():
        return
    known = set(columns.patient_ids(test["patient_id"])) | set(
        columns.patient_ids(tables.read_split_csv(pool_csv, validate=False)["patient_id"]))
    missing = sorted(set(columns.patient_ids(usable["patient_id"])) - known)
    if missing:
        shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        raise DataError.at(test_csv, None, f"patient(s) {shown} of the dataset are in neither this test set nor "
                           f"{pool_csv}, and no identity of the test set is recorded: removed from the test set, "
                           "or added to the dataset since? Restore the test set, or re-draw it with --force")


def fixed_test_set(args: argparse.Namespace, run: columns.RunDir, df: pd.DataFrame, loaded: pd.DataFrame,
                   source: dict[str, Any], bounds: tuple[float, ...]) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The kept test set, verified against its recorded identity and the dataset, or a newly
    drawn one; and what the manifest says about it (``kept``, ``drawn``, ``identity``)."""
    test_csv, data_csv = run.test_csv, source["path"]
    if test_csv.is_file() and not args.force:
        print(f"{test_csv}: exists, reusing it as the fixed test set (pass --force to re-draw it)")
        test = tables.read_split_csv(test_csv)
        identity = splits.recorded_test_identity(run.test_manifest) if run.test_manifest.is_file() else None
        if identity is not None:
            splits.verify_test_set(test, test_csv, identity,
                                   remedy="restore it, or pass --force to re-draw the test set")
        else:
            print(f"note: {run.test_manifest} records no identity of the kept test set (written by an older "
                  f"version, or missing): recording it now from {test_csv} as it is")
            _check_unrecorded_test(test, df, test_csv, run.pool_csv)
        for note in _check_kept_test(test, loaded, test_csv, data_csv, bounds):
            print(f"note: {note}")
        old = json.loads(run.test_manifest.read_text()) if run.test_manifest.is_file() else {}
        drawn = old.get("test_drawn") or {"note": "drawn before this manifest existed"}
        return test, {"kept": True, "drawn": drawn, "identity": identity}
    if test_csv.is_file():
        print(f"{test_csv}: exists, re-drawing it because of --force")
    test, _ = split_patients(df, args.test_frac, args.split_seed, source=data_csv)
    drawn = {"seed": args.split_seed, "test_frac": args.test_frac, "source_sha256": source["sha256"]}
    return test, {"kept": False, "drawn": drawn, "identity": None}


@dataclasses.dataclass(frozen=True)
class Drawn:
    """What stage 1 writes: the test set and what the manifest says about it
    (:func:`fixed_test_set`), the pool, their counts, and the split files that a re-drawn
    test set made stale (path -> images of test patients in it)."""
    test: pd.DataFrame
    pool: pd.DataFrame
    test_set: dict[str, Any]
    counts: dict[str, Any]
    stale: dict[Path, int]


def write_splits(args: argparse.Namespace, run: columns.RunDir, drawn: Drawn, source: dict[str, Any],
                 bounds: tuple[float, ...]) -> None:
    """The test set (when drawn), the pool and the manifest. They describe each other: all
    three are written before any replaces its old version, so a failure (a full disk) leaves
    the old ones."""
    test, pool, test_set, counts, stale = drawn.test, drawn.pool, drawn.test_set, drawn.counts, drawn.stale
    kept = test_set["kept"]
    targets = ([] if kept else [run.test_csv]) + [run.pool_csv, run.test_manifest]
    with io_utils.atomic_paths(targets) as tmps:
        tmp = dict(zip(targets, tmps))
        if not kept:
            write_split_csv(test, tmp[run.test_csv], "test")
        written_test = tmp.get(run.test_csv, run.test_csv)
        identity = test_set["identity"]
        if identity is None:  # from the file as written, exactly what later stages read back
            identity = splits.identity_of_test_set(tables.read_split_csv(written_test))
        write_split_csv(pool, tmp[run.pool_csv], "pool")
        manifest = {
            "stage": SCRIPT, "seed": args.split_seed, "test_frac": args.test_frac,
            "test_set": "kept" if kept else "drawn", "test_drawn": test_set["drawn"], splits.IDENTITY_KEY: identity,
            "source": {k: v for k, v in source.items() if k not in ("path", "rejected_rows", "exclusions",
                                                                     "image_check")},
            "age_bounds": list(bounds), "age_group_names": list(columns.age_group_names(bounds)),
            "exclusions": source["exclusions"], "rejected_rows": source["rejected_rows"],
            "image_check": source["image_check"], "removed_stale": [str(p) for p in stale], "counts": counts,
            "outputs": {columns.TEST_CSV: file_sha256(written_test), columns.POOL_CSV: file_sha256(tmp[run.pool_csv])},
            "environment": environment.describe(),
        }
        write_json(manifest, tmp[run.test_manifest])


def main(args: argparse.Namespace) -> dict[str, Any]:
    cfg = to_dict(args)
    print_config(cfg, "age_split_testset (stage 1)")
    run = columns.RunDir(args.out_dir)
    run.root.mkdir(parents=True, exist_ok=True)
    bounds = tuple(float(b) for b in args.age_bounds)
    n_groups = columns.num_age_groups(bounds)
    wrote: dict[str, Any] = {}
    with RunLock(run.root):
        wrote["config"] = save_config(cfg, run.config(SCRIPT))
        loaded, df, source = load_checked(args, run, bounds, wrote)
        test, test_set = fixed_test_set(args, run, df, loaded, source, bounds)
        test_ids = set(columns.patient_ids(test["patient_id"]))
        pool = df.loc[~columns.patient_ids(df["patient_id"]).isin(test_ids).to_numpy()]
        frames = {str(run.test_csv): test, str(run.pool_csv): pool}
        check_disjoint(frames)
        splits.check_images_disjoint(frames)
        for name, frame in frames.items():
            check_coverage(frame, name, bounds)
        stale = _stale_splits(run, test)
        counts = split_counts({"test": test, "pool": pool}, n_groups)
        print(describe(counts))
        write_splits(args, run, Drawn(test, pool, test_set, counts, stale), source, bounds)
        if not test_set["kept"]:
            wrote["test_csv"] = run.test_csv
        wrote["pool_csv"], wrote["manifest"] = run.pool_csv, run.test_manifest
        for path, shared in stale.items():
            path.unlink()
            print(f"{path}: removed: {shared} of its images belong to test patients (stale since the test set "
                  "was re-drawn); generate_age_trainval_split.py writes it again")
        wrote["test_kept"] = test_set["kept"]
    print(f"stage 1 done: {columns.TEST_CSV} ({'kept' if test_set['kept'] else 'drawn'}: {len(test)} images, "
          f"{len(test_ids)} patients), {columns.POOL_CSV} ({len(pool)} images) in {run.root}")
    return wrote


if __name__ == "__main__":
    errors.run(main, get_args_parser())
