"""Training presets and the command-line options the training scripts share.

Two presets:

* ``demo``: the phantom on a CPU: a small model trained from scratch at low resolution for
  a few epochs, no pretrained weights. The numbers live in :data:`DEMO_RECIPE`, the one
  place to tune the demo.
* ``paper``: the design's settings for the real data on a GPU: Swin-Large
  (``swin_large_patch4_window12_384.ms_in22k``) at 384 px from ImageNet-22k weights,
  AdamW lr 1e-5, focal loss (alpha 0.25, gamma 2), class-balanced sampling, early stopping.

Effective configuration = preset < YAML file (``--config``) < flags given on the command
line. Every training flag therefore defaults to ``None`` ("not given") in argparse; the
help text shows the preset values instead. A YAML file holds the same keys as the flags
(``img_size`` or ``img-size``), optionally with ``age:`` / ``fracture:`` sections that only
apply to that trainer::

    preset: paper
    batch_size: 8
    accum_steps: 2
    fracture:
      epochs: 30
"""
from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

import columns
import io_utils
import phantom
import train_config

# --------------------------------------------------------------------------- argument types
# The value parsers live with the training options they check (train_config.py); the
# scripts' other options use them under these names.
positive_int = train_config.positive_int
non_negative_int = train_config.non_negative_int
finite_float = train_config.finite_float
positive_float = train_config.positive_float
non_negative_float = train_config.non_negative_float
probability = train_config.probability
drop_rate = train_config.drop_rate
split_fraction = train_config.split_fraction


class AgeBoundsAction(argparse.Action):
    """``--age-bounds B1 B2 ...``: finite, strictly increasing, within (0, MAX_AGE] years."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Sequence[str] | str | None, option_string: str | None = None) -> None:
        texts = [values] if isinstance(values, str) else list(values or [])
        bounds = [train_config.number_of_years(t) if not isinstance(t, float) else t for t in texts]
        shown = " ".join(f"{b:g}" for b in bounds)
        if any(not 0 < b <= columns.MAX_AGE for b in bounds):
            raise argparse.ArgumentError(self, f"each bound must be in (0, {columns.MAX_AGE:g}] years, got {shown}")
        if any(hi <= lo for lo, hi in zip(bounds, bounds[1:])):
            raise argparse.ArgumentError(self, f"must be strictly increasing, got {shown}")
        setattr(namespace, self.dest, bounds)


def output_file(text: str) -> str:
    """A file to write: not an existing folder, and not below an existing file."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file name, e.g. {path / 'predictions.csv'}")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise argparse.ArgumentTypeError(f"{parent} is a file, so {text} cannot be created")
            break
    return text


# The demo recipe, measured on the default phantom on a 2-core CPU; change it here only.
# A 0.32M-parameter timm ResNet (cnn_demo): tiny Swins from scratch stayed at macro-F1
# 0.45-0.68 on the age task in the same time. Age needs less resolution than fracture
# (bone size, carpal count, physes are large structures; a buckle is a few pixels).
DEMO_RECIPE: dict[str, Any] = {
    "model": "cnn_demo",
    "img_size": 96,
    "epochs": 6,
    "lr": 2e-3,
    "age": {"img_size": 64, "epochs": 10},
    # The group models and the equal-budget control continue the 6-epoch pooled model for 4
    # more epochs: on the phantom their validation AUROC matched that of 6 more epochs
    # (0.954/0.986/0.946 vs 0.957/0.986/0.951), and the control costs a third less.
    "continue_epochs": 4,
    # The fastest CPU settings benchmark.py measures for cnn_demo (training images per
    # CPU-second, one thread, batch 32, fp32 = 1): at 96 px channels_last 1.3-1.8x, bf16
    # autocast 1.4-1.6x, both 2.5-2.8x; at 64 px both 2.3x. The demo's metrics stayed within
    # the spread between training seeds. bf16 only where the CPU has it (PRESETS below).
    "channels_last": True,
}


# evaluate.py's --amp takes the same choices as the trainers'
AMP_MODES = train_config.AMP_MODES

# What both presets share: the design's loss, sampler and optimizer settings.
_COMMON: dict[str, Any] = {
    "weight_decay": 0.05,
    "min_delta": 0.0,
    "metric": "f1",
    "sampler": "balanced",
    "loss": "focal",
    "focal_alpha": 0.25,
    "focal_gamma": 2.0,
    "pretrained_file": None,
    "grad_checkpointing": False,
    "fused_attn": True,
    # auto: bf16 where the device computes it natively, a GPU that has it or a CPU with
    # AVX512-BF16/AMX (engine.resolve_amp); the demo trains 2.5x and Swin-L 384 1.3x faster
    # there, and emulated bf16 elsewhere would be slower than fp32
    "amp": "auto",
    "compile": False,
    "accum_steps": 1,
    "grad_clip": None,
    "mean": train_config.GRAY_MEAN,
    "std": train_config.GRAY_STD,
    "device": "auto",
    "seed": 42,
}

PRESETS: dict[str, dict[str, Any]] = {
    "demo": {
        **_COMMON,
        "model": DEMO_RECIPE["model"],
        "img_size": DEMO_RECIPE["img_size"],
        "batch_size": 32,
        "epochs": DEMO_RECIPE["epochs"],
        "lr": DEMO_RECIPE["lr"],
        "scheduler": "cosine",
        "warmup_epochs": 1,
        "patience": 4,
        "pretrained": False,
        "drop_path": 0.0,
        "workers": 0,
        "channels_last": DEMO_RECIPE["channels_last"],
        # The phantom's >=15 y group (~460 training images) is too small to learn from
        # scratch in the CPU budget (val AUROC 0.64-0.70); starting from the pooled model
        # gets it to ~0.94. The paper preset starts every model from ImageNet-22k instead.
        "init_from_pooled": True,
        "continue_epochs": DEMO_RECIPE["continue_epochs"],
    },
    "paper": {
        **_COMMON,
        "model": "swin_large_patch4_window12_384.ms_in22k",
        "img_size": 384,
        "batch_size": 16,
        "epochs": 50,
        "lr": 1e-5,
        "scheduler": "plateau",
        "warmup_epochs": 0,
        "patience": 5,
        "pretrained": True,
        "drop_path": 0.1,
        # 8 feed a GPU at 384 px; more processes than cores only compete with the model's threads
        "workers": min(8, io_utils.default_workers()),
        "channels_last": True,
        "init_from_pooled": False,
        "continue_epochs": None,
    },
}

# Per-trainer differences within a preset. The age classifier is a 3-class task where
# plain cross-entropy with class-balanced sampling is enough; focal loss is the design's
# choice for the fracture task. Focal alpha 0.25 on top of balanced sampling pushes a
# small model trained from scratch below 0.5 for every image for several epochs (F1 0 at
# the fixed 0.5 threshold), so the demo picks the fracture models' best epoch by AUROC,
# which needs no threshold; evaluation chooses thresholds on validation anyway.
STAGE_OVERRIDES: dict[str, dict[str, dict[str, Any]]] = {
    "demo": {"age": {"loss": "ce", **DEMO_RECIPE["age"]}, "fracture": {"metric": "auroc"}},
    "paper": {"age": {"loss": "ce"}, "fracture": {}},
}

STAGES = ("age", "fracture")

# (flag, dest, type, choices, help), one per field of train_config.TrainConfig. Booleans get --x/--no-x.
_OPTIONS: tuple[tuple[str, str, Any, tuple | None, str], ...] = tuple(
    ("--" + f.name.replace("_", "-"), f.name, f.metadata["parse"], f.metadata["choices"], f.metadata["help"])
    for f in train_config.options())
TRAIN_KEYS: tuple[str, ...] = train_config.TRAIN_KEYS


def _help(dest: str, text: str) -> str:
    demo, paper = PRESETS["demo"][dest], PRESETS["paper"][dest]
    return f"{text} [demo: {demo}, paper: {paper}]".replace("%", "%%")


def add_training_args(parser: argparse.ArgumentParser, resume_flags: bool = True) -> argparse.ArgumentParser:
    """Add the options every trainer (and the driver) shares; the driver, which resumes by
    itself and whose --force means more, leaves out --resume/--force (``resume_flags``)."""
    g = parser.add_argument_group("training (defaults from --preset, then --config)")
    g.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="named settings: demo (phantom, CPU) or paper (Swin-L 384, GPU) [default: demo]")
    g.add_argument("--config", type=Path, default=None,
                   help="YAML file of option values; flags given on the command line win")
    for flag, dest, typ, choices, text in _OPTIONS:
        if typ is bool:
            g.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None,
                           help=_help(dest, text))
        else:
            g.add_argument(flag, dest=dest, type=typ, choices=choices, default=None,
                           help=_help(dest, text))
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    if not resume_flags:
        return parser
    g.add_argument("--resume", action="store_true",
                   help="continue from the saved `last` state if there is one (a finished model is "
                        "not retrained)")
    g.add_argument("--force", action="store_true",
                   help="with --resume: start over when the saved state's essential settings differ")
    return parser


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as exc:
        raise SystemExit(f"{path}: cannot read config: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise SystemExit(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise SystemExit(f"{path}: expected a mapping of option: value")
    return data


def _normalise(section: Mapping[str, Any], path: Path, allowed: tuple[str, ...]) -> dict[str, Any]:
    out = {}
    for key, value in section.items():
        k = str(key).replace("-", "_")
        if k not in allowed:
            raise SystemExit(f"{path}: unknown option {key!r} (known: {', '.join(sorted(allowed))})")
        out[k] = value
    return out


def chosen_preset(args: argparse.Namespace, default: str = "demo") -> str:
    """--preset if given, else the YAML file's ``preset:``, else ``default``."""
    if getattr(args, "preset", None):
        return args.preset
    if getattr(args, "config", None):
        return _read_yaml(args.config).get("preset") or default
    return default


def resolve_config(args: argparse.Namespace, stage: str) -> train_config.TrainConfig:
    """Merge preset < YAML < explicit flags into the typed config of ``stage``.

    ``stage`` is ``"age"`` or ``"fracture"`` (selects :data:`STAGE_OVERRIDES` and the YAML
    section). The run's switches and folders are taken from ``args`` as they are (resolve
    the path defaults first, :func:`resolve_paths`), and all of ``args`` is kept as the
    config's ``command``, which the run records.
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}")
    yaml_cfg: dict[str, Any] = {}
    yaml_stage: dict[str, Any] = {}
    if getattr(args, "config", None):
        raw = _read_yaml(args.config)
        raw.pop("preset", None)
        sections = {s: raw.pop(s) for s in STAGES if s in raw}
        yaml_cfg = _normalise(raw, args.config, TRAIN_KEYS)
        if stage in sections:
            yaml_stage = _normalise(sections[stage] or {}, args.config, TRAIN_KEYS)
    preset = chosen_preset(args)
    if preset not in PRESETS:
        raise SystemExit(f"unknown preset {preset!r} (known: {', '.join(sorted(PRESETS))})")

    cfg = copy.deepcopy(PRESETS[preset])
    cfg.update(STAGE_OVERRIDES[preset].get(stage, {}))
    cfg.update(yaml_cfg)
    cfg.update(yaml_stage)
    for key in TRAIN_KEYS:
        value = getattr(args, key, None)
        if value is not None:
            cfg[key] = value
    if cfg.get("pretrained_file"):
        cfg["pretrained"] = True  # a local file is only given to be used
    run = {key: getattr(args, key) for key in train_config.RUN_FIELDS if hasattr(args, key)}
    out = train_config.TrainConfig(**cfg, **run, preset=preset, command=dict(vars(args)))
    _check(out)
    return out


def _check(cfg: train_config.TrainConfig) -> None:
    positive = ("img_size", "batch_size", "epochs", "accum_steps")
    for key in positive:
        if int(getattr(cfg, key)) < 1:
            raise SystemExit(f"--{key.replace('_', '-')} must be >= 1, got {getattr(cfg, key)}")
    if cfg.lr <= 0:
        raise SystemExit(f"--lr must be > 0, got {cfg.lr}")
    if cfg.patience < 1:
        raise SystemExit(f"--patience must be >= 1, got {cfg.patience}")
    if cfg.workers < 0:
        raise SystemExit(f"--workers must be >= 0, got {cfg.workers}")


def explicit_training_argv(args: argparse.Namespace) -> list[str]:
    """The training flags that were given explicitly, as argv (for the driver to pass on)."""
    argv: list[str] = []
    if getattr(args, "preset", None):
        argv += ["--preset", args.preset]
    if getattr(args, "config", None):
        argv += ["--config", str(args.config)]
    for flag, dest, typ, _, _ in _OPTIONS:
        value = getattr(args, dest, None)
        if value is None:
            continue
        if typ is bool:
            argv.append(flag if value else "--no-" + flag[2:])
        else:
            argv += [flag, str(value)]
    if getattr(args, "quiet", False):
        argv.append("--quiet")
    return argv


def add_data_args(parser: argparse.ArgumentParser, test_csv: bool = False) -> argparse.ArgumentParser:
    """Input/output locations shared by the trainers; all derived from --out-dir by default."""
    g = parser.add_argument_group("files")
    g.add_argument("--out-dir", type=Path, default=Path("."),
                   help="run directory holding the split CSVs (stages 1-2) and the outputs [default: .]")
    g.add_argument("--train-csv", type=Path, default=None, help="[default: <out-dir>/age_train_tmp.csv]")
    g.add_argument("--val-csv", type=Path, default=None, help="[default: <out-dir>/age_val_tmp.csv]")
    if test_csv:
        g.add_argument("--test-csv", type=Path, default=None, help="[default: <out-dir>/age_test.csv]")
    g.add_argument("--models-dir", type=Path, default=None,
                   help="where checkpoints, metrics CSVs and configs go [default: <out-dir>/saved_agegroup_models]")
    g.add_argument("--cache-dir", type=Path, default=None,
                   help="decoded-image cache [default: <out-dir>/image.cache]")
    g.add_argument("--no-cache", action="store_true", help="decode every image every epoch (no cache)")
    g.add_argument("--result-json", type=Path, default=None,
                   help="also write what this run produced as JSON (used by run_all_training.py)")
    return parser


def resolve_paths(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with the path defaults that derive from --out-dir filled in (a copy)."""
    args = argparse.Namespace(**vars(args))
    run = columns.RunDir(args.out_dir)
    for key in ("train_csv", "val_csv", "test_csv"):
        if hasattr(args, key) and getattr(args, key) is None:
            setattr(args, key, getattr(run, key))
    if args.models_dir is None:
        args.models_dir = run.models_dir
    if args.no_cache:
        args.cache_dir = None
    elif args.cache_dir is None:
        args.cache_dir = run.cache_dir
    return args


# --------------------------------------------------------------------------- data options
# The data options of the stages, defined once. Each stage script adds the ones it takes;
# run_all_training.py adds all of them and passes each on to the stages that take it
# (:func:`split_argv`). Stages: "testset" (stage 1), "trainval" (stage 2), "train"
# (stages 3 and 4), "evaluate" (stage 5).
DATA_STAGES: tuple[str, ...] = ("testset", "trainval", "train", "evaluate")
_STAGE_NUMBERS = {"testset": "1", "trainval": "2", "train": "3-4", "evaluate": "5"}
_DATA_OPTIONS: tuple[dict[str, Any], ...] = (
    # flags[0] is the driver's name; the stages also take the others (--seed, the old name,
    # would clash with the driver's training seed). A dict default or help is per stage.
    {"flags": ("--data-csv",), "stages": ("testset",), "type": Path, "default": None,
     "help": "dataset CSV: GRAZPEDWRI-DX's dataset.csv or a generic one "
             "[default: <image-root>/dataset.csv, or a generated phantom]"},
    {"flags": ("--image-root",), "stages": ("testset",), "type": Path, "default": None,
     "help": "image folder, searched recursively (images_part1..4 may stay as unpacked) "
             "[default: the CSV's folder]"},
    {"flags": ("--format",), "stages": ("testset",), "choices": ("auto", "grazpedwri", "generic"),
     "default": "auto", "help": "CSV layout; auto recognises GRAZPEDWRI-DX by its header"},
    {"flags": ("--image-col",), "stages": ("testset",), "default": "image_path",
     "help": "generic CSV: image path column"},
    {"flags": ("--patient-col",), "stages": ("testset",), "default": "patient_id",
     "help": "generic CSV: patient id column"},
    {"flags": ("--age-col",), "stages": ("testset",), "default": "age", "help": "generic CSV: age (years) column"},
    {"flags": ("--label-col",), "stages": ("testset",), "default": "fracture",
     "help": "generic CSV: fracture 0/1 column"},
    {"flags": ("--exclude",), "stages": ("testset",), "nargs": "*",
     "choices": columns.EXCLUDABLE + ("none",), "default": ["metal"],
     "help": "drop images with these flags before splitting ('none' or no value: keep all)"},
    {"flags": ("--test-frac",), "stages": ("testset",), "type": split_fraction, "default": 0.15,
     "help": "share of patients in the test set (0-0.5]"},
    {"flags": ("--val-frac",), "stages": ("trainval",), "type": split_fraction, "default": 0.2,
     "help": "share of the other patients in the validation set (0-0.5]"},
    {"flags": ("--split-seed", "--seed"), "stages": ("testset", "trainval"), "type": int, "default": 42,
     "help": "random seed of the patient split"},
    {"flags": ("--age-bounds",), "stages": ("testset", "trainval", "train"), "type": float, "nargs": "+",
     "action": AgeBoundsAction,
     "default": {"testset": list(columns.AGE_BOUNDS), "trainval": None, "train": None},
     "help": {"testset": "age group boundaries in years (group g: bounds[g-1] <= age < bounds[g])",
              "trainval": "age group boundaries (default: those recorded by stage 1; must match them)",
              "train": "age group boundaries (default: those stage 1 recorded in age_test_split.json; "
                       "must match them)",
              "driver": "age group boundaries in years (group g: bounds[g-1] <= age < bounds[g]) "
                        "[default: 8 15]"}},
    {"flags": ("--skip-bad",), "stages": DATA_STAGES, "action": "store_true", "default": False,
     "help": {"testset": "set bad rows aside in rejected_rows.csv instead of stopping at the first",
              "trainval": "set bad pool rows aside in rejected_rows.csv instead of stopping at the first",
              "train": "leave images that cannot be decoded out (stage 3 also leaves their predictions "
                       "empty) and list them in <out-dir>/rejected_rows.csv, instead of stopping",
              "evaluate": "leave validation and test images that cannot be decoded out (the report "
                          "counts them) and list them in <out-dir>/rejected_rows.csv, instead of stopping",
              "driver": "every stage sets bad rows and undecodable images aside in "
                        "<out-dir>/rejected_rows.csv instead of stopping; the split CSVs keep every row"}},
    {"flags": ("--no-image-check",), "stages": ("testset", "trainval"), "action": "store_true", "default": False,
     "help": {"testset": "do not look at the image files (metadata-only split; stage 2 follows)",
              "trainval": "do not look at the image files (without it: as stage 1 did, from "
                          "age_test_split.json)",
              "driver": "metadata-only split: stages 1 and 2 do not look at the image files"}},
    {"flags": ("--decode-check",), "stages": ("testset",), "action": "store_true", "default": False,
     "help": "decode every image once to find corrupt files (one thread per core; stage 1 prints "
             "how long its image check took)"},
    {"flags": ("--phantom-patients",), "stages": ("testset",), "type": positive_int,
     "default": phantom.DEFAULT_N_PATIENTS, "help": "phantom size when no dataset is given"},
    {"flags": ("--phantom-img-size",), "stages": ("testset",), "type": positive_int,
     "default": phantom.DEFAULT_IMG_SIZE,
     "help": "phantom image height in pixels"},
    {"flags": ("--phantom-seed",), "stages": ("testset",), "type": int, "default": 0,
     "help": "phantom generator seed"},
)


def _dest(opt: Mapping[str, Any]) -> str:
    return opt["flags"][0].lstrip("-").replace("-", "_")


def _per_stage(value: Any, stage: str) -> Any:
    return value.get(stage) if isinstance(value, dict) else value


def add_split_args(parser: argparse.ArgumentParser, stage: str) -> argparse.ArgumentParser:
    """Add the "data" options that ``stage`` takes (one of :data:`DATA_STAGES`), or all of
    them for ``stage="driver"``: there every default is ``None`` ("the stage's default",
    which the help shows) and only the first flag name is taken."""
    if stage not in DATA_STAGES + ("driver",):
        raise ValueError(f"unknown stage {stage!r}")
    g = parser.add_argument_group("data")
    for opt in _DATA_OPTIONS:
        if stage != "driver" and stage not in opt["stages"]:
            continue
        kw = {k: v for k, v in opt.items() if k in ("type", "choices", "nargs", "action")}
        text = _per_stage(opt["help"], stage) or _per_stage(opt["help"], opt["stages"][0])
        if stage == "driver":
            default = _per_stage(opt["default"], opt["stages"][0])
            if not (isinstance(opt["help"], dict) and "driver" in opt["help"]) \
                    and default is not None and default is not False:
                text += f" [default: {' '.join(map(str, default)) if isinstance(default, list) else default}]"
            numbers = [_STAGE_NUMBERS[s] for s in opt["stages"]]
            text += " (every stage)" if opt["stages"] == DATA_STAGES else \
                f" (stage{'s' if len(numbers) > 1 else ''} {', '.join(numbers)})"
            g.add_argument(opt["flags"][0], dest=_dest(opt), default=None, help=text.replace("%", "%%"), **kw)
        else:
            g.add_argument(*opt["flags"], dest=_dest(opt), default=_per_stage(opt["default"], stage),
                           help=text.replace("%", "%%"), **kw)
    return parser


def split_argv(args: argparse.Namespace, stage: str) -> list[str]:
    """The data options given to the driver that ``stage`` takes, as that stage's argv."""
    argv: list[str] = []
    for opt in _DATA_OPTIONS:
        value = getattr(args, _dest(opt), None)
        if stage not in opt["stages"] or value is None or value is False:
            continue
        flag = opt["flags"][0]
        if value is True:
            argv.append(flag)
        elif isinstance(value, (list, tuple)):
            argv += [flag, *(f"{v:g}" if isinstance(v, float) else str(v) for v in value)]
        else:
            argv += [flag, str(value)]
    return argv
