"""Stage 2: split the non-test patients into training and validation sets.

The patients of ``age_pool.csv`` (written by stage 1) are split by patient,
stratified by age group x fracture (sklearn ``StratifiedGroupKFold``), seeded.
Before anything is written, ``age_test.csv`` is checked to be the test set stage 1
drew (its recorded identity), and all three splits to be patient-disjoint (also
against ``age_test.csv``), non-empty and to hold every age group. Existing
train/val files made from the same pool, seed and fraction are kept (stage 3 adds
its predictions to them); ``--force`` re-draws them.

Inputs
    ``<out-dir>/age_pool.csv`` and ``<out-dir>/age_test.csv`` (stage 1), and
    ``<out-dir>/age_test_split.json`` for the age bounds stage 1 used.
Outputs (in ``--out-dir``)
    ``age_train_tmp.csv``, ``age_val_tmp.csv``, ``age_trainval_split.json`` (seed,
    source file and its SHA-256, counts per split x age group x fracture),
    ``generate_age_trainval_split_config.json`` and, with ``--skip-bad``, rows
    appended to ``rejected_rows.csv``.

Example::

    python generate_age_trainval_split.py --out-dir runs/demo --val-frac 0.2 --split-seed 42
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pandas as pd

import columns
import environment
import errors
import presets
import splits
import tables
from config import print_config, save_config, to_dict
from errors import DataError
from io_utils import RunLock, write_json
from splits import check_coverage, check_disjoint, describe, file_sha256, split_counts, split_patients, write_split_csv

SCRIPT = "generate_age_trainval_split"


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Stage 2: patient-level train/val split of age_pool.csv.",
                                add_help=add_help, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out-dir", type=Path, default=Path("."), help="folder with stage 1's files; outputs go here")
    p.add_argument("--pool-csv", type=Path, default=None, help="default: <out-dir>/age_pool.csv")
    p.add_argument("--test-csv", type=Path, default=None, help="default: <out-dir>/age_test.csv")
    p.add_argument("--force", action="store_true", help="re-draw train/val even if they match the pool")
    presets.add_split_args(p, "trainval")
    return p


def _stage1_manifest(run: columns.RunDir) -> dict[str, Any]:
    path = run.test_manifest
    return json.loads(path.read_text()) if path.is_file() else {}


def _check_groups(df, path: Path, bounds: tuple[float, ...]) -> None:
    """age_group must follow from age; a mismatch means a CSV from other bounds was mixed in."""
    expect = columns.age_to_group(df["age"].to_numpy(), bounds)
    bad = df["age_group"].to_numpy() != expect
    if bad.any():
        i = int(bad.nonzero()[0][0])
        raise DataError.at(path, df.index[i], f"age_group {df['age_group'].iloc[i]} does not match age "
                           f"{df['age'].iloc[i]:g} with age bounds {list(bounds)}")


def checked_pool(args: argparse.Namespace, run: columns.RunDir, pool_csv: Path, test_csv: Path,
                 bounds: tuple[float, ...], wrote: dict[str, Any]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The test set and the validated pool, checked against each other and the age bounds."""
    test = tables.read_split_csv(test_csv)
    pool = tables.read_split_csv(pool_csv, validate=False)
    check_images = not args.no_image_check
    if check_images and _stage1_manifest(run).get("image_check", {}).get("mode") == "none":
        print(f"{run.test_manifest}: stage 1 split without looking at the images (--no-image-check): so does "
              "this stage")
        check_images = False
    pool = tables.validate_frame(pool, pool_csv, tables.Checks(images=check_images),
                                 tables.BadRows(skip=args.skip_bad, rejected_csv=run.rejected_csv))
    if pool.attrs.get("n_rejected"):
        wrote["rejected_csv"] = run.rejected_csv
    for note in splits.check_splits({str(test_csv): test, str(pool_csv): pool}, test_csv):
        print(f"note: {note}")
    _check_groups(test, test_csv, bounds)
    _check_groups(pool, pool_csv, bounds)
    return test, pool


def train_and_val(args: argparse.Namespace, run: columns.RunDir, pool: pd.DataFrame, pool_csv: Path,
                  recipe: dict[str, Any]) -> tuple[pd.DataFrame, pd.DataFrame, bool]:
    """The kept train/val files when they were drawn from this very pool with this seed and
    fraction (stage 3 has added its predictions to them), else a new split; and whether kept."""
    train_csv, val_csv = run.train_csv, run.val_csv
    old = json.loads(run.trainval_manifest.read_text()) if run.trainval_manifest.is_file() else {}
    if not args.force and train_csv.is_file() and val_csv.is_file() and old.get("recipe") == recipe:
        print(f"{train_csv.name}, {val_csv.name}: exist and match {pool_csv.name} (same content, seed and "
              "fraction): keeping them (pass --force to re-draw)")
        return tables.read_split_csv(train_csv), tables.read_split_csv(val_csv), True
    if train_csv.is_file() or val_csv.is_file():
        why = "--force" if args.force else "the pool, seed or fraction changed"
        print(f"{train_csv.name}, {val_csv.name}: re-drawing them ({why})")
    val, train = split_patients(pool, args.val_frac, args.split_seed, source=pool_csv)
    return train, val, False


def main(args: argparse.Namespace) -> dict[str, Any]:
    cfg = to_dict(args)
    print_config(cfg, "generate_age_trainval_split (stage 2)")
    run = columns.RunDir(args.out_dir)
    pool_csv = Path(args.pool_csv) if args.pool_csv is not None else run.pool_csv
    test_csv = Path(args.test_csv) if args.test_csv is not None else run.test_csv
    for path in (pool_csv, test_csv):
        if not path.is_file():
            raise DataError.at(path, None, "not found: run age_split_testset.py (stage 1) first")
    wrote: dict[str, Any] = {}
    with RunLock(run.root):
        wrote["config"] = save_config(cfg, run.config(SCRIPT))
        bounds, _ = splits.recorded_age_groups(test_csv, args.age_bounds)
        n_groups = columns.num_age_groups(bounds)
        test, pool = checked_pool(args, run, pool_csv, test_csv, bounds, wrote)
        pool_sha = file_sha256(pool_csv)
        recipe = {"pool_sha256": pool_sha, "seed": args.split_seed, "val_frac": args.val_frac,
                  "skip_bad": bool(args.skip_bad)}
        train, val, kept = train_and_val(args, run, pool, pool_csv, recipe)
        frames = {str(run.train_csv): train, str(run.val_csv): val, str(test_csv): test}
        check_disjoint(frames)
        for name, df in frames.items():
            check_coverage(df, name, bounds)
        if not kept:
            wrote["train_csv"] = write_split_csv(train, run.train_csv, "train")
            wrote["val_csv"] = write_split_csv(val, run.val_csv, "val")
        counts = split_counts({"train": train, "val": val, "test": test}, n_groups)
        print(describe(counts))
        manifest = {
            "stage": SCRIPT, "seed": args.split_seed, "val_frac": args.val_frac, "recipe": recipe,
            "trainval": "kept" if kept else "drawn",
            "source": {"csv": str(pool_csv.resolve()), "sha256": pool_sha,
                       "test_csv": str(test_csv.resolve()), "test_sha256": file_sha256(test_csv)},
            "age_bounds": list(bounds), "age_group_names": list(columns.age_group_names(bounds)),
            "rejected_rows": int(pool.attrs.get("n_rejected", 0)), "counts": counts,
            "outputs": {columns.TRAIN_CSV: file_sha256(run.train_csv), columns.VAL_CSV: file_sha256(run.val_csv)},
            "environment": environment.describe(),
        }
        wrote["manifest"] = write_json(manifest, run.trainval_manifest)
        wrote["trainval_kept"] = kept
    print(f"stage 2 done: {columns.TRAIN_CSV} ({len(train)} images, {train['patient_id'].nunique()} patients), "
          f"{columns.VAL_CSV} ({len(val)} images, {val['patient_id'].nunique()} patients) in {run.root}")
    return wrote


if __name__ == "__main__":
    errors.run(main, get_args_parser())
