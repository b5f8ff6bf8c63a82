"""Stage 1: draw the fixed, patient-level test set.

Patients, not images, are split: every image of a test patient is in the test set
and no other patient's image is. The split is stratified by age group x fracture
(sklearn ``StratifiedGroupKFold``) and deterministic for a given ``--split-seed``
(``--seed``). Once
``age_test.csv`` exists it is kept and reused (the remaining patients are derived
from it again); drawing a new one needs ``--force``, and the run says which happened.

Inputs
    ``--data-csv``: GRAZPEDWRI-DX's ``dataset.csv`` as distributed, or a generic CSV
    (``--format generic`` and the ``--*-col`` mapping); ``--image-root``: its images,
    searched in all sub-folders (default: the CSV's folder). With neither flag, a
    phantom dataset is generated into ``<out-dir>/phantom`` (reused if present).
Outputs (in ``--out-dir``)
    ``age_test.csv`` (the test set), ``age_pool.csv`` (every other patient; input of
    stage 2), ``age_test_split.json`` (seed, source file and its SHA-256, exclusion
    counts, images per split x age group x fracture), ``age_split_testset_config.json``
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
import columns as C
import phantom
import presets
from config import print_config, save_config, to_dict
from io_utils import RunLock, write_json
from splits import check_coverage, check_disjoint, describe, file_sha256, split_counts, split_patients, write_split_csv
from unified_dataset import DataError, apply_exclusions, load_dataset, read_split_csv, validate_frame

TEST_CSV = "age_test.csv"
POOL_CSV = "age_pool.csv"
MANIFEST = "age_test_split.json"
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
                     bounds: tuple[float, ...]) -> None:
    """A kept test set must still describe the current dataset, or the pool could leak."""
    by_image = dict(zip(loaded["image_path"].astype(str), loaded["patient_id"].astype(str)))
    redraw = "; re-draw the test set with --force"
    for row, path, pid, age, group in zip(test.index, test["image_path"].astype(str),
                                          test["patient_id"].astype(str), test["age"], test["age_group"]):
        if path not in by_image:
            raise DataError.at(test_csv, row, f"image {path} is not in {data_csv}: the dataset changed "
                               f"since the test set was drawn{redraw}")
        if by_image[path] != pid:
            raise DataError.at(test_csv, row, f"image {path} belongs to patient {by_image[path]} in {data_csv} "
                               f"but to patient {pid} here{redraw}")
        if C.age_to_group(float(age), bounds) != int(group):
            raise DataError.at(test_csv, row, f"age_group {group} does not match age {age:g} with --age-bounds "
                               f"{list(bounds)}: the test set was drawn with other bounds{redraw}")


def _remove_stale_splits(out: Path, test: pd.DataFrame) -> list[str]:
    """Train/val files from an earlier test set that now share patients with it are a leak: remove them."""
    test_ids = set(test["patient_id"].astype(str))
    removed = []
    for name in LATER_SPLITS:
        path = out / name
        if not path.is_file():
            continue
        ids = pd.read_csv(path, usecols=["patient_id"], dtype=str)["patient_id"]
        shared = int(ids.isin(test_ids).sum())
        if shared:
            path.unlink()
            removed.append(str(path))
            print(f"{path}: removed: {shared} of its images belong to test patients (stale since the test set "
                  "was re-drawn); generate_age_trainval_split.py writes it again")
    return removed


def main(args: argparse.Namespace) -> dict[str, Any]:
    cfg = to_dict(args)
    print_config(cfg, "age_split_testset (stage 1)")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bounds = tuple(float(b) for b in args.age_bounds)
    n_groups = C.num_age_groups(bounds)
    C.age_group_names(bounds)  # fails early on non-increasing bounds
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

        test_csv, pool_csv = out / TEST_CSV, out / POOL_CSV
        old_manifest = json.loads((out / MANIFEST).read_text()) if (out / MANIFEST).is_file() else {}
        if test_csv.is_file() and not args.force:
            print(f"{test_csv}: exists, reusing it as the fixed test set (pass --force to re-draw it)")
            test = read_split_csv(test_csv)
            _check_kept_test(test, loaded, test_csv, data_csv, bounds)
            drawn = old_manifest.get("test_drawn") or {"note": "drawn before this manifest existed"}
            kept = True
        else:
            if test_csv.is_file():
                print(f"{test_csv}: exists, re-drawing it because of --force")
            test, _ = split_patients(df, args.test_frac, args.split_seed, source=data_csv)
            drawn = {"seed": args.split_seed, "test_frac": args.test_frac, "source_sha256": None}
            kept = False
        test_ids = set(test["patient_id"].astype(str))
        pool = df.loc[~df["patient_id"].astype(str).isin(test_ids)]
        check_disjoint({str(test_csv): test, str(pool_csv): pool})
        check_coverage(test, test_csv, n_groups, bounds=bounds)
        check_coverage(pool, pool_csv, n_groups, bounds=bounds)

        source_sha = file_sha256(data_csv)
        if not kept:
            drawn["source_sha256"] = source_sha
            wrote["test_csv"] = write_split_csv(test, test_csv, "test")
        wrote["pool_csv"] = write_split_csv(pool, pool_csv, "pool")
        removed = _remove_stale_splits(out, test)
        counts = split_counts({"test": test, "pool": pool}, n_groups)
        print(describe(counts))
        manifest = {
            "stage": "age_split_testset",
            "seed": args.split_seed,
            "test_frac": args.test_frac,
            "test_set": "kept" if kept else "drawn",
            "test_drawn": drawn,
            "source": {"csv": str(Path(data_csv).resolve()), "sha256": source_sha, "format": args.format,
                       "image_root": str(image_root) if image_root is not None else None,
                       "rows": int(len(loaded)), "phantom_generated": generated},
            "age_bounds": list(bounds),
            "age_group_names": list(C.age_group_names(bounds)),
            "exclusions": excl,
            "rejected_rows": n_rejected,
            # stage 2 follows a metadata-only split (mode "none"); the seconds say what the check cost
            "image_check": df.attrs.get("image_check", {"mode": "none"}),
            "removed_stale": removed,
            "counts": counts,
            "outputs": {TEST_CSV: file_sha256(test_csv), POOL_CSV: file_sha256(pool_csv)},
        }
        wrote["manifest"] = write_json(manifest, out / MANIFEST)
        wrote["test_kept"] = kept
    print(f"stage 1 done: {TEST_CSV} ({'kept' if kept else 'drawn'}: {len(test)} images, "
          f"{len(test_ids)} patients), {POOL_CSV} ({len(pool)} images) in {out}")
    return wrote


if __name__ == "__main__":
    errors.run(main, get_args_parser())
