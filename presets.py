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
from typing import Any, Mapping

import yaml

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
    # The fastest CPU settings benchmark.py measures for cnn_demo (training images per
    # CPU-second, one thread, batch 32, fp32 = 1): at 96 px channels_last 1.3-1.8x, bf16
    # autocast 1.4-1.6x, both 2.5-2.8x; at 64 px both 2.3x. The demo's metrics stayed within
    # the spread between training seeds. bf16 only where the CPU has it (PRESETS below).
    "channels_last": True,
}


def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 in hardware (AVX512-BF16 or AMX).

    Elsewhere oneDNN emulates bf16 convolutions, more slowly than fp32, so the demo then
    keeps ``auto`` (fp32 on the CPU, bf16 on a GPU that has it).
    """
    import torch  # every script imports torch anyway; here only to ask the CPU

    probes = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return any(bool(probe()) for probe in probes if probe is not None)

# Grayscale normalisation. ImageNet's RGB statistics averaged over channels, so that
# pretrained weights see inputs in the range they were trained on (models.py sums the
# RGB stem over channels for in_chans=1).
GRAY_MEAN = 0.449
GRAY_STD = 0.226

# Mixed-precision choices of every script (engine.resolve_amp turns auto into one of the others).
AMP_MODES: tuple[str, ...] = ("auto", "bf16", "fp16", "off")

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
    "amp": "auto",
    "compile": False,
    "accum_steps": 1,
    "grad_clip": None,
    "mean": GRAY_MEAN,
    "std": GRAY_STD,
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
        "amp": "bf16" if cpu_has_native_bf16() else "auto",
        # The phantom's >=15 y group (~460 training images) is too small to learn from
        # scratch in the CPU budget (val AUROC 0.64-0.70); starting from the pooled model
        # gets it to ~0.94. The paper preset starts every model from ImageNet-22k instead.
        "init_from_pooled": True,
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
        "workers": 8,
        "channels_last": True,
        "init_from_pooled": False,
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

# (flag, dest, type, choices, help). Booleans get --x/--no-x.
_OPTIONS: tuple[tuple[str, str, Any, tuple | None, str], ...] = (
    ("--model", "model", str, None, "timm model name (legacy timm-0.4 names accepted)"),
    ("--img-size", "img_size", int, None, "square input size in pixels"),
    ("--batch-size", "batch_size", int, None, "images per optimizer micro-step and process"),
    ("--epochs", "epochs", int, None, "maximum number of epochs"),
    ("--lr", "lr", float, None, "AdamW learning rate"),
    ("--weight-decay", "weight_decay", float, None, "AdamW weight decay"),
    ("--scheduler", "scheduler", str, ("plateau", "cosine"),
     "learning-rate schedule: ReduceLROnPlateau on the monitored metric, or cosine"),
    ("--warmup-epochs", "warmup_epochs", int, None, "linear warm-up epochs (cosine only)"),
    ("--patience", "patience", int, None, "early stopping: epochs without improvement"),
    ("--min-delta", "min_delta", float, None, "early stopping: smallest change that counts"),
    ("--metric", "metric", str, ("f1", "auroc", "acc", "loss"),
     "validation metric for early stopping and the best checkpoint (f1 = binary F1 or macro-F1)"),
    ("--sampler", "sampler", str, ("balanced", "random"), "class-balanced or plain shuffled sampling"),
    ("--loss", "loss", str, ("focal", "ce"), "focal loss or (binary) cross-entropy"),
    ("--focal-alpha", "focal_alpha", float, None, "focal loss alpha (weight of the positive class)"),
    ("--focal-gamma", "focal_gamma", float, None, "focal loss gamma"),
    ("--pretrained", "pretrained", bool, None, "start from pretrained weights (hub or --pretrained-file)"),
    ("--pretrained-file", "pretrained_file", str, None, "local weights file (.safetensors/.pth)"),
    ("--drop-path", "drop_path", float, None, "stochastic depth rate"),
    ("--grad-checkpointing", "grad_checkpointing", bool, None, "activation checkpointing (saves memory)"),
    ("--fused-attn", "fused_attn", bool, None,
     "attention through scaled_dot_product_attention: the same function, and on an H100 Swin-L 384 "
     "trains 8-17%% faster in a third less memory (timm leaves it off for Swin)"),
    ("--workers", "workers", int, None, "DataLoader worker processes per training process"),
    ("--amp", "amp", str, AMP_MODES,
     "mixed precision: auto = bf16 autocast on CUDA, off on CPU; fp16 uses a grad scaler"),
    ("--channels-last", "channels_last", bool, None, "channels_last memory format"),
    ("--compile", "compile", bool, None, "torch.compile the model"),
    ("--accum-steps", "accum_steps", int, None, "gradient accumulation steps"),
    ("--grad-clip", "grad_clip", float, None, "clip gradient norm to this value"),
    ("--mean", "mean", float, None, "input normalisation mean"),
    ("--std", "std", float, None, "input normalisation std"),
    ("--device", "device", str, None, "auto, cpu, cuda or cuda:N"),
    ("--seed", "seed", int, None, "random seed (python, numpy, torch)"),
    ("--init-from-pooled", "init_from_pooled", bool, None,
     "stage 4: start each age-group model from the pooled model's weights (trained first if missing)"),
)
TRAIN_KEYS: tuple[str, ...] = tuple(o[1] for o in _OPTIONS)
# Options whose value is a path or a switch of the run, not a training hyper-parameter.
RUN_KEYS: tuple[str, ...] = ("preset", "config", "quiet", "resume", "force")


def _help(dest: str, text: str) -> str:
    demo, paper = PRESETS["demo"][dest], PRESETS["paper"][dest]
    return f"{text} [demo: {demo}, paper: {paper}]"


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


def resolve_config(args: argparse.Namespace, stage: str) -> argparse.Namespace:
    """Merge preset < YAML < explicit flags into a new namespace for ``stage``.

    ``stage`` is ``"age"`` or ``"fracture"`` (selects :data:`STAGE_OVERRIDES` and the YAML
    section). Non-training attributes of ``args`` (paths etc.) are kept as they are.
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
    out = argparse.Namespace(**vars(args))
    for key, value in cfg.items():
        setattr(out, key, value)
    out.preset = preset
    _check(out)
    return out


def model_note(cfg: argparse.Namespace) -> str | None:
    """A plain statement when the demo trains a CNN instead of a Swin (printed by the trainers)."""
    if cfg.preset == "demo" and "swin" not in str(cfg.model):
        return (f"note: the demo preset trains {cfg.model}, a small CNN, not a Swin: a tiny Swin trained "
                f"from scratch learns the phantom too slowly for the CPU time budget. The paper preset "
                f"trains Swin-L; the tests train swin_demo through this same code path.")
    return None


def _check(cfg: argparse.Namespace) -> None:
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
    """Fill the path defaults that derive from --out-dir (in place; returns args)."""
    out = Path(args.out_dir)
    defaults = {"train_csv": "age_train_tmp.csv", "val_csv": "age_val_tmp.csv", "test_csv": "age_test.csv"}
    for key, name in defaults.items():
        if hasattr(args, key) and getattr(args, key) is None:
            setattr(args, key, out / name)
    if args.models_dir is None:
        args.models_dir = out / "saved_agegroup_models"
    if args.no_cache:
        args.cache_dir = None
    elif args.cache_dir is None:
        args.cache_dir = out / "image.cache"
    return args
