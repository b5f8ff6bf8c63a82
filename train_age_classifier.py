"""Stage 3: train the age-group classifier and write predicted groups into all CSVs.

Trains on ``age_train_tmp.csv`` with the true ``age_group``, one class per age group of the
bounds stage 1 used (recorded in ``age_test_split.json``; by default 0: < 8 y, 1: 8-14 y,
2: >= 15 y), early-stops on validation macro-F1 (``--metric``), keeps the best epoch, then
predicts every row of the train, val AND test CSVs and writes ``age_group_label`` (argmax)
and ``age_group_prob_0..G-1`` back into them atomically, keeping every other row and column.
Stage 4 routes training data by ``age_group_label``; stage 5 routes test images by it.
Every image of the three CSVs is decoded first (the cache warm-up): one that cannot be
decoded stops the run in one line before training, or with ``--skip-bad`` is listed in
``<out-dir>/rejected_rows.csv`` and gets empty prediction cells.

Inputs (defaults under ``--out-dir``): age_train_tmp.csv, age_val_tmp.csv, age_test.csv, and
age_test_split.json beside age_test.csv for the age bounds (``--age-bounds``, if given, must match).
Outputs (``--models-dir``, default ``<out-dir>/saved_agegroup_models``):
    age_classifier.pt            best checkpoint (torch.load(weights_only=True) readable)
    age_classifier_last.pt       resumable state while training (removed when finished)
    age_classifier_metrics.csv   one row per epoch
    age_classifier_config.json   the effective configuration + library versions
and the three CSVs, rewritten with the prediction columns.

Example:
    python train_age_classifier.py --out-dir runs/demo --preset demo
    torchrun --nproc_per_node 4 train_age_classifier.py --out-dir runs/real --preset paper
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

import columns
import config
import distributed
import engine
import errors
import inference
import presets
import recipe
import splits
import tables
from errors import DataError
from io_utils import write_csv, write_json
from presets import add_data_args, add_training_args


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=add_help,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    add_data_args(parser, test_csv=True)
    presets.add_split_args(parser, "train")
    add_training_args(parser)
    return parser


def write_predictions(csv_path: Path, probs: np.ndarray, rows: Sequence[int], n_rows: int) -> Path:
    """Add/replace the prediction columns of ``csv_path`` for the CSV rows ``rows`` (header =
    row 1); other rows (images that could not be decoded, --skip-bad) get empty cells.
    Every other column stays as it was. ``n_rows``: the rows the file had when it was read."""
    raw = pd.read_csv(csv_path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    if len(raw) != n_rows or len(rows) != len(probs):
        raise DataError(f"{csv_path}: has {len(raw)} rows, {n_rows} when it was read; the file changed "
                        f"during the run")
    at = np.asarray(rows, dtype=int) - 2
    label = pd.array([pd.NA] * len(raw), dtype="Int64")
    label[at] = probs.argmax(1)
    label_col, *prob_cols = columns.prediction_columns(probs.shape[1])
    raw[label_col] = label
    for k, col in enumerate(prob_cols):
        values = np.full(len(raw), np.nan)
        values[at] = probs[:, k]
        raw[col] = values
    return write_csv(raw, csv_path)


def main(args: argparse.Namespace) -> dict[str, Any]:
    args = presets.resolve_paths(args)
    cfg = presets.resolve_config(args, "age")
    csvs = {"train": args.train_csv, "val": args.val_csv, "test": args.test_csv}
    files = engine.RunFiles.from_stem(args.models_dir, columns.AGE_MODEL)
    bounds, names = splits.recorded_age_groups(args.test_csv, args.age_bounds)
    with distributed.session(cfg.device, cfg.out_dir) as info:
        if info.is_main:
            config.print_config(config.to_dict(cfg.record()), "train_age_classifier.py")
        read = {split: tables.read_split_csv(path) for split, path in csvs.items()}
        for note in splits.check_splits({str(csvs[k]): df for k, df in read.items()}, csvs["test"]):
            engine.log(f"note: {note}")
        # all three decoded before training: an undecodable test image stops the run now, not
        # after the last epoch; with --skip-bad its prediction cells stay empty
        frames = {split: tables.decode_pass(
            df, cfg.img_size, cache_dir=cfg.cache_dir, skip_bad=cfg.skip_bad,
            rejected_csv=Path(cfg.out_dir) / columns.REJECTED_CSV,
            progress=not cfg.quiet and sys.stderr.isatty()) for split, df in read.items()}
        task = recipe.Task("age", "age_group", class_names=names, age_bounds=bounds, title="age-group classifier")
        result = recipe.train_classifier(cfg, task, recipe.Frames(frames["train"], frames["val"], checked=True),
                                         files, info.device)

        age_model = inference.load_model(files.best, columns.AGE_MODEL, info.device, "age",
                                         num_classes=len(names))
        amp = engine.resolve_amp(cfg.amp, info.device)
        counts = {}
        for split, path in csvs.items():
            probs = inference.model_probs(age_model, frames[split], info.device, amp=amp,
                                          batch_size=cfg.batch_size, workers=cfg.workers,
                                          cache_dir=cfg.cache_dir)
            if info.is_main:
                write_predictions(path, probs, frames[split].index, len(read[split]))
            counts[split] = np.bincount(probs.argmax(1), minlength=len(names)).tolist()
            left = len(read[split]) - len(frames[split])
            engine.log(f"{path}: wrote {', '.join(columns.prediction_columns(len(names)))} for {len(probs)} rows "
                       f"(predicted groups {counts[split]})"
                       + (f"; {left} undecodable image(s) left empty (--skip-bad)" if left else ""))
        distributed.barrier()
        out = {
            "checkpoint": result["checkpoint"], "metrics_csv": result["metrics_csv"],
            "config": str(files.config_json), "csvs": {k: str(v) for k, v in csvs.items()},
            "best_epoch": result["best_epoch"], "best_metrics": result["best_metrics"],
            "epochs_run": result["epochs_run"], "predicted_group_counts": counts,
        }
        if info.is_main and args.result_json:
            write_json(out, args.result_json)
    return out


if __name__ == "__main__":
    errors.run(main, get_args_parser())
