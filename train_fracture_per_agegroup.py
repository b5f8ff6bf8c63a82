"""Stage 4: train one binary fracture classifier per age group (or one pooled baseline).

The age groups are those of the bounds stage 1 used (recorded in ``age_test_split.json``
beside the test CSV; ``--age-bounds``, if given, must match them). For each group g
(``--groups``, default all), the train and val rows whose
``--group-column`` (default ``age_group_label``, the PREDICTED group written by stage 3;
``age_group`` for the true group) equals g train a fracture classifier: focal loss
(alpha 0.25, gamma 2 by default), class-balanced sampling (torchsampler's
ImbalancedDatasetSampler; a distributed equivalent under torchrun), AdamW, a plateau or
cosine schedule, early stopping on validation F1 (``--metric auroc`` for AUROC).
``--pooled`` trains one model on all rows instead, the baseline that evaluation compares
routing against. With ``--init-from-pooled`` (the demo preset's default) each group model
starts from the pooled model's weights, and the pooled model is trained first if it is
not there yet: small groups then learn what all groups share from all the data. The group
models then get more training than the pooled model, so routed-vs-pooled would mix
specialisation with extra training; the same run therefore also trains the equal-budget
control ``fracture_classifier_pooled_continued``: the pooled model trained further on ALL
training rows with the group models' settings (epochs, schedule, sampler, loss), so that
evaluation can compare routing with a pooled system of the same training budget
(``--no-control`` leaves it out). Both continue for ``--continue-epochs`` epochs (default
``--epochs``) without warm-up. A group with too few rows, or only one class in its
training rows, is skipped with a message, not a crash. Each model's images are decoded before its first
epoch; ``--skip-bad`` leaves those that cannot be decoded out (``rejected_rows.csv``).

Inputs (defaults under ``--out-dir``): age_train_tmp.csv, age_val_tmp.csv (with
``age_group_label`` from stage 3 unless ``--group-column age_group``), and age_test.csv,
only to check that the test set is the one stage 1 drew and shares no patient with them.
Outputs (``--models-dir``, default ``<out-dir>/saved_agegroup_models``), per model
``fracture_classifier_agegroup{g}``, ``fracture_classifier_pooled`` or
``fracture_classifier_pooled_continued``:
    <stem>.pt  <stem>_metrics.csv  <stem>_config.json  (<stem>_last.pt while training)

Example:
    python train_fracture_per_agegroup.py --out-dir runs/demo --groups 0 2
    python train_fracture_per_agegroup.py --out-dir runs/demo --pooled
    torchrun --nproc_per_node 4 train_fracture_per_agegroup.py --out-dir runs/real --preset paper
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any, NamedTuple, Sequence

import pandas as pd

import columns
import config
import distributed
import engine
import errors
import presets
import recipe
import splits
import tables
import train_config
from errors import DataError
from io_utils import write_json
from models import load_checkpoint, weights_sha256
from presets import add_data_args, add_training_args

CLASS_NAMES = ("no fracture", "fracture")
TARGET = "fracture"


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=add_help,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    add_data_args(parser, test_csv=True)  # read only to check the splits are still patient-disjoint
    presets.add_split_args(parser, "train")
    g = parser.add_argument_group("groups")
    g.add_argument("--groups", type=presets.non_negative_int, nargs="+", default=None,
                   help="age groups to train, 0..G-1 for the G groups of stage 1's --age-bounds [default: all]")
    g.add_argument("--group-column", default="age_group_label", choices=("age_group_label", "age_group"),
                   help="route rows by the predicted (age_group_label) or the true (age_group) group "
                        "[default: age_group_label]")
    g.add_argument("--pooled", action="store_true",
                   help="train one model on all groups instead (fracture_classifier_pooled.pt)")
    g.add_argument("--control", action=argparse.BooleanOptionalAction, default=None,
                   help="with --init-from-pooled: also train the equal-budget control "
                        "(fracture_classifier_pooled_continued.pt: the pooled model trained further on all "
                        "rows with the group models' settings) [default: yes when all groups are trained]")
    g.add_argument("--min-rows", type=presets.non_negative_int, default=10,
                   help="skip a group with fewer training rows than this [default: 10]")
    g.add_argument("--seeds", type=presets.positive_int, default=1,
                   help="train the models the evaluation compares (the group models and their control) with "
                        "N training seeds, --seed, --seed+1, ...; the first seed's files keep the plain names, "
                        "seed S's are <stem>_seedS [default: 1]")
    add_training_args(parser)
    return parser


def rows_of_group(df: pd.DataFrame, column: str, group: int) -> pd.DataFrame:
    """Rows whose ``column`` equals ``group`` (a missing value belongs to no group)."""
    return df[df[column].eq(group).fillna(False).to_numpy(dtype=bool)]


def skip_reason(train_df: pd.DataFrame, val_df: pd.DataFrame, min_rows: int) -> str | None:
    """Why a group cannot be trained, or None."""
    if len(train_df) < min_rows:
        return f"only {len(train_df)} training rows (--min-rows {min_rows})"
    classes = sorted(set(train_df[TARGET].astype(int)))
    if len(classes) < 2:
        return f"its {len(train_df)} training rows are all '{CLASS_NAMES[classes[0]]}'; a classifier needs both classes"
    if val_df.empty:
        return "no validation rows"
    return None


def _finished(path) -> bool:
    """A best checkpoint that its run marked finished (an interrupted run's is not)."""
    return path.is_file() and bool(load_checkpoint(path).get("finished"))


def continued_from(ckpt_path, expect: dict[str, Any]) -> recipe.InitialWeights:
    """The weights of a finished checkpoint to continue from, with the ``init`` record that says
    so (with that checkpoint's own budget, so evaluation can add it up)."""
    ckpt = load_checkpoint(ckpt_path, expect=expect)
    origin = {"kind": "checkpoint", "checkpoint": ckpt_path.name, "epochs_run": ckpt.get("epochs_run"),
              "best_epoch": ckpt.get("epoch"), "images_seen": ckpt.get("images_seen"), "init": ckpt.get("init"),
              "weights_sha256": weights_sha256(ckpt["model"])}
    return recipe.InitialWeights(ckpt["model"], origin)


class Job(NamedTuple):
    """One fracture model to train: its role (the checkpoint stem's suffix), a label for the
    log, the age group it serves (None for the pooled models), its rows, and the suffix of a
    further training seed's files ("" for the first seed)."""

    role: str
    label: str
    group: int | None
    train: pd.DataFrame
    val: pd.DataFrame
    seed_suffix: str = ""


def check_groups(groups: Sequence[int] | None, bounds: Sequence[float], names: Sequence[str]) -> None:
    """Raise ``DataError`` (one line) for a ``--groups`` value that is not an age group of ``bounds``."""
    bad = [g for g in groups or () if g >= len(names)]
    if bad:
        raise DataError(f"--groups {' '.join(map(str, bad))}: there are {len(names)} age groups, 0..{len(names) - 1} "
                        f"({', '.join(names)}), with stage 1's --age-bounds {' '.join(f'{b:g}' for b in bounds)}")


def plan_jobs(args: argparse.Namespace, cfg: train_config.TrainConfig, train_all: pd.DataFrame,
              val_all: pd.DataFrame, names: Sequence[str]) -> list[Job]:
    """Every model this run trains, in training order; ``names``: the age groups' names."""
    pooled = Job(columns.POOLED_ROLE, "all age groups", None, train_all, val_all)
    if args.pooled:
        return [pooled]
    for path, df in ((args.train_csv, train_all), (args.val_csv, val_all)):
        if args.group_column not in df.columns:
            raise DataError.at(path, 1, f"no column {args.group_column!r}; run train_age_classifier.py "
                                        f"first, or pass --group-column age_group")
    groups = args.groups if args.groups is not None else range(len(names))
    jobs = [Job(columns.group_role(g), f"age group {g} ({names[g]})", g,
                rows_of_group(train_all, args.group_column, g), rows_of_group(val_all, args.group_column, g))
            for g in groups]
    if not cfg.init_from_pooled:
        return jobs
    if not _finished(model_files(args, columns.POOLED_ROLE).best):
        engine.log("group models start from the pooled model (--init-from-pooled): training it first")
        jobs.insert(0, pooled)
    control = args.control if args.control is not None else args.groups is None
    if control:
        jobs.append(Job(columns.CONTROL_ROLE, "all age groups, continued from the pooled model like the group "
                        "models (equal-budget control)", None, train_all, val_all))
    return jobs


def model_files(args: argparse.Namespace, role: str, seed_suffix: str = "") -> engine.RunFiles:
    return engine.RunFiles.from_stem(args.models_dir, columns.fracture_model(role) + seed_suffix)


def further_seed_jobs(cfg: train_config.TrainConfig, first: list[Job], seed: int) -> list[Job]:
    """The models a further training seed retrains: those the evaluation compares. With
    --init-from-pooled the group models and the control both continue from the (first seed's)
    pooled model, so only they are retrained and the shared start costs nothing more; without
    it the pooled model is the comparison and is retrained too."""
    compared = {columns.CONTROL_ROLE} if cfg.init_from_pooled else {columns.POOLED_ROLE}
    suffix = columns.seed_suffix(seed)
    return [job._replace(seed_suffix=suffix, label=f"{job.label}, training seed {seed}") for job in first
            if job.group is not None or job.role in compared]


def continuation_config(cfg: train_config.TrainConfig) -> train_config.TrainConfig:
    """The settings of a model that continues the pooled model: ``--continue-epochs`` epochs and
    no warm-up (its weights are trained already); everything else as given."""
    epochs = cfg.continue_epochs if cfg.continue_epochs is not None else cfg.epochs
    return dataclasses.replace(cfg, epochs=epochs, warmup_epochs=0)


def train_job(args: argparse.Namespace, cfg: train_config.TrainConfig, job: Job, device: Any,
              bounds: Sequence[float]) -> dict[str, Any]:
    """Train one model (or find it finished) for the age ``bounds``; its result, or why it was skipped."""
    reason = skip_reason(job.train, job.val, args.min_rows)
    if reason:
        engine.log(f"== {job.label}: SKIPPED: {reason} ==")
        return {"skipped": reason, "train_rows": len(job.train), "val_rows": len(job.val)}
    if job.val[TARGET].nunique() < 2:
        engine.log(f"{job.label}: validation rows hold one class only; AUROC is undefined for it")
    files = model_files(args, job.role, job.seed_suffix)
    init = None
    if job.role != columns.POOLED_ROLE and cfg.init_from_pooled:
        init = continued_from(model_files(args, columns.POOLED_ROLE).best,
                              {"kind": "fracture", "model_name": cfg.model, "img_size": cfg.img_size})
        cfg = continuation_config(cfg)
    task = recipe.Task("fracture", TARGET, class_names=CLASS_NAMES, age_bounds=bounds,
                       title=f"fracture classifier, {job.label}",
                       extra_meta={"age_group": job.group, "group_column": args.group_column, "role": job.role})
    result = recipe.train_classifier(cfg, task, recipe.Frames(job.train, job.val), files, device, init)
    result.pop("history")
    return {**result, "config": str(files.config_json), "train_rows": len(job.train), "val_rows": len(job.val)}


def main(args: argparse.Namespace) -> dict[str, Any]:
    args = presets.resolve_paths(args)
    cfg = presets.resolve_config(args, "fracture")
    bounds, names = splits.recorded_age_groups(args.test_csv, args.age_bounds)
    check_groups(args.groups, bounds, names)
    with distributed.session(cfg.device, cfg.out_dir) as info:
        if info.is_main:
            config.print_config(config.to_dict(cfg.record()), "train_fracture_per_agegroup.py")
        train_all, val_all = tables.read_split_csv(args.train_csv), tables.read_split_csv(args.val_csv)
        frames = {str(args.train_csv): train_all, str(args.val_csv): val_all,
                  str(args.test_csv): tables.read_split_csv(args.test_csv, validate=False)}
        for note in splits.check_splits(frames, args.test_csv):
            engine.log(f"note: {note}")
        first = plan_jobs(args, cfg, train_all, val_all, names)
        models = {job.role: train_job(args, cfg, job, info.device, bounds) for job in first}
        seeds = [cfg.seed + k for k in range(args.seeds)]
        for seed in seeds[1:]:
            for job in further_seed_jobs(cfg, first, seed):
                models[job.role + job.seed_suffix] = train_job(args, dataclasses.replace(cfg, seed=seed), job,
                                                               info.device, bounds)
        out = {"models": models, "group_column": args.group_column, "pooled": args.pooled, "seeds": seeds}
        if info.is_main and args.result_json:
            write_json(out, args.result_json)
    return out


if __name__ == "__main__":
    errors.run(main, get_args_parser())
