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
import json
import time
from pathlib import Path
from typing import Any

import pandas as pd

import errors
import columns
import io_utils
import phantom
import presets
import splits
from config import print_config, save_config, to_dict
from io_utils import RunLock, write_json
from splits import check_coverage, check_disjoint, describe, file_sha256, split_counts, split_patients, write_split_csv
from errors import DataError
from unified_dataset import apply_exclusions, load_dataset, read_split_csv, validate_frame

TEST_CSV = "age_test.csv"
POOL_CSV = "age_pool.csv"
MANIFEST = splits.TEST_MANIFEST
CONFIG = "age_split_testset_config.json"
REJECTED_CSV = "rejected_rows.csv"
# Written by stage 2; removed here if a newly drawn test set shares patients with them.
LATER_SPLITS = ("age_train_tmp.csv", "age_val_tmp.csv")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Stage 1: the fixed patient-level test set (age_test.csv).",
                                add_help=add_help, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out-dir", type=Path, default=Path("."), help="where the split files go")
    p.add_argument("--force", action="store_true", help="re-draw age_test.csv even if it exists")
    presets.add_split_args(p, "testset")
    return p


def _resolve_source(args: argparse.Namespace, out: Path) -> tuple[Path, Path | None, bool]:
    """(dataset CSV, image root, generated?) from the flags; generates the phantom if needed."""
    if args.data_csv is not None:
        return Path(args.data_csv), args.image_root, False
    if args.image_root is not None:
        csv = Path(args.image_root) / "dataset.csv"
        if not csv.is_file():
            raise DataError.at(csv, None, "no --data-csv given and no dataset.csv in --image-root")
        return csv, Path(args.image_root), False
    pdir = out / "phantom"
    csv = pdir / "dataset.csv"
    marker = pdir / "phantom_params.json"
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


def _stale_splits(out: Path, test: pd.DataFrame) -> dict[Path, int]:
    """Train/val files from an earlier test set that share patients with it (a leak, to be
    removed): path -> number of their images that belong to test patients."""
    test_ids = set(columns.patient_ids(test["patient_id"]))
    stale = {}
    for name in LATER_SPLITS:
        path = out / name
        if not path.is_file():
            continue
        ids = columns.patient_ids(pd.read_csv(path, usecols=["patient_id"], dtype=str)["patient_id"])
        shared = int(ids.isin(test_ids).sum())
        if shared:
            stale[path] = shared
    return stale


def main(args: argparse.Namespace) -> dict[str, Any]:
    cfg = to_dict(args)
    print_config(cfg, "age_split_testset (stage 1)")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bounds = tuple(float(b) for b in args.age_bounds)
    n_groups = columns.num_age_groups(bounds)
    columns.age_group_names(bounds)  # fails early on non-increasing bounds
    if not 0.0 < args.test_frac <= 0.5:
        raise SystemExit(f"--test-frac must be in (0, 0.5], got {args.test_frac}")
    wrote: dict[str, Any] = {}
    with RunLock(out):
        wrote["config"] = save_config(cfg, out / CONFIG)
        data_csv, image_root, generated = _resolve_source(args, out)
        if generated:
            wrote["phantom_csv"] = data_csv
        loaded = load_dataset(data_csv, image_root, fmt=args.format, image_col=args.image_col,
                              patient_col=args.patient_col, age_col=args.age_col, label_col=args.label_col,
                              age_bounds=bounds)
        rejected_csv = out / REJECTED_CSV
        df = validate_frame(loaded, data_csv, check_images=not args.no_image_check, skip_bad=args.skip_bad,
                            rejected_csv=rejected_csv, age_bounds=bounds, decode=args.decode_check)
        n_rejected = int(df.attrs.get("n_rejected", 0))
        if n_rejected:
            wrote["rejected_csv"] = rejected_csv
        df, excl = apply_exclusions(df, args.exclude)
        print(f"{data_csv}: {len(loaded)} rows, {n_rejected} rejected, excluded {excl['excluded']} "
              f"-> {len(df)} images of {df['patient_id'].nunique()} patients")
        check_coverage(df, data_csv, n_groups, bounds=bounds)
        lookalikes = columns.lookalike_patient_ids(df["patient_id"])
        if lookalikes:
            shown = "; ".join(" / ".join(repr(i) for i in g) for g in lookalikes[:3])
            print(f"note: {data_csv}: {len(lookalikes)} group(s) of patient ids differ only in case or leading "
                  f"zeros ({shown}); they are different patients here, as ids are compared as text")

        test_csv, pool_csv = out / TEST_CSV, out / POOL_CSV
        old_manifest = json.loads((out / MANIFEST).read_text()) if (out / MANIFEST).is_file() else {}
        identity = None
        if test_csv.is_file() and not args.force:
            print(f"{test_csv}: exists, reusing it as the fixed test set (pass --force to re-draw it)")
            test = read_split_csv(test_csv)
            identity = splits.recorded_test_identity(out / MANIFEST) if (out / MANIFEST).is_file() else None
            if identity is not None:
                splits.verify_test_set(test, test_csv, identity,
                                       remedy="restore it, or pass --force to re-draw the test set")
            else:
                print(f"note: {out / MANIFEST} records no identity of the kept test set (written by an older "
                      f"version, or missing): recording it now from {test_csv} as it is")
            for note in _check_kept_test(test, loaded, test_csv, data_csv, bounds):
                print(f"note: {note}")
            drawn = old_manifest.get("test_drawn") or {"note": "drawn before this manifest existed"}
            kept = True
        else:
            if test_csv.is_file():
                print(f"{test_csv}: exists, re-drawing it because of --force")
            test, _ = split_patients(df, args.test_frac, args.split_seed, source=data_csv)
            drawn = {"seed": args.split_seed, "test_frac": args.test_frac, "source_sha256": None}
            kept = False
        test_ids = set(columns.patient_ids(test["patient_id"]))
        pool = df.loc[~columns.patient_ids(df["patient_id"]).isin(test_ids).to_numpy()]
        check_disjoint({str(test_csv): test, str(pool_csv): pool})
        splits.check_images_disjoint({str(test_csv): test, str(pool_csv): pool})
        check_coverage(test, test_csv, n_groups, bounds=bounds)
        check_coverage(pool, pool_csv, n_groups, bounds=bounds)

        source_sha = file_sha256(data_csv)
        stale = _stale_splits(out, test)
        counts = split_counts({"test": test, "pool": pool}, n_groups)
        print(describe(counts))
        # The test set, the pool and the manifest describe each other: all three are written
        # before any replaces its old version, so a failure (a full disk) leaves the old ones.
        targets = ([] if kept else [test_csv]) + [pool_csv, out / MANIFEST]
        with io_utils.atomic_paths(targets) as tmps:
            tmp = dict(zip(targets, tmps))
            if not kept:
                drawn["source_sha256"] = source_sha
                write_split_csv(test, tmp[test_csv], "test")
            written_test = tmp.get(test_csv, test_csv)
            if identity is None:  # from the file as written, exactly what later stages read back
                identity = splits.identity_of_test_set(read_split_csv(written_test))
            write_split_csv(pool, tmp[pool_csv], "pool")
            manifest = {
                "stage": "age_split_testset",
                "seed": args.split_seed,
                "test_frac": args.test_frac,
                "test_set": "kept" if kept else "drawn",
                "test_drawn": drawn,
                splits.IDENTITY_KEY: identity,
                "source": {"csv": str(Path(data_csv).resolve()), "sha256": source_sha, "format": args.format,
                           "image_root": str(image_root) if image_root is not None else None,
                           "rows": int(len(loaded)), "phantom_generated": generated},
                "age_bounds": list(bounds),
                "age_group_names": list(columns.age_group_names(bounds)),
                "exclusions": excl,
                "rejected_rows": n_rejected,
                # stage 2 follows a metadata-only split (mode "none"); the seconds say what the check cost
                "image_check": df.attrs.get("image_check", {"mode": "none"}),
                "removed_stale": [str(p) for p in stale],
                "counts": counts,
                "outputs": {TEST_CSV: file_sha256(written_test), POOL_CSV: file_sha256(tmp[pool_csv])},
            }
            write_json(manifest, tmp[out / MANIFEST])
        if not kept:
            wrote["test_csv"] = test_csv
        wrote["pool_csv"], wrote["manifest"] = pool_csv, out / MANIFEST
        for path, shared in stale.items():
            path.unlink()
            print(f"{path}: removed: {shared} of its images belong to test patients (stale since the test set "
                  "was re-drawn); generate_age_trainval_split.py writes it again")
        wrote["test_kept"] = kept
    print(f"stage 1 done: {TEST_CSV} ({'kept' if kept else 'drawn'}: {len(test)} images, "
          f"{len(test_ids)} patients), {POOL_CSV} ({len(pool)} images) in {out}")
    return wrote


if __name__ == "__main__":
    errors.run(main, get_args_parser())
