"""The typed training configuration: :class:`TrainConfig`, one field per training option.

Each training option is defined once, as a field of :class:`TrainConfig`: its name (the
flag is ``--`` plus the name with dashes, the YAML key is the name), its type, the parser
that checks a command-line value and its help text (the field's metadata). The values of
each preset live in ``presets.PRESETS``; ``presets.resolve_config`` builds the config once
(preset < YAML < flags), and the loop, the checkpoint writer and the trainers read it.

The parsers below are ``type=`` functions for argparse: a bad value is refused while the
command line is parsed, before any work, in one line.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping


# --------------------------------------------------------------------------- value parsers
def _number(text: str, kind: Callable[[str], Any], what: str) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def _bounded(kind: Callable[[str], Any], what: str, ok: Callable[[Any], bool]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = _number(text, kind, what)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    return parse


def number_of_years(text: str) -> float:
    """A finite number (a bound in years); its range is the caller's to check."""
    return _number(text, float, "a number of years")


positive_int = _bounded(int, "an integer >= 1", lambda v: v >= 1)
non_negative_int = _bounded(int, "an integer >= 0", lambda v: v >= 0)
finite_float = _bounded(float, "a finite number", lambda v: True)
positive_float = _bounded(float, "a number > 0", lambda v: v > 0)
non_negative_float = _bounded(float, "a number >= 0", lambda v: v >= 0)
probability = _bounded(float, "a number in [0, 1]", lambda v: 0 <= v <= 1)
drop_rate = _bounded(float, "a number in [0, 1)", lambda v: 0 <= v < 1)
# held-out share of patients: a split needs both sides, and 1/frac folds
split_fraction = _bounded(float, "a fraction in (0, 0.5]", lambda v: 0 < v <= 0.5)


# --------------------------------------------------------------------------- constants of the loop
# Grayscale normalisation. ImageNet's RGB statistics averaged over channels, so that
# pretrained weights see inputs in the range they were trained on (models.py sums the
# RGB stem over channels for in_chans=1).
GRAY_MEAN = 0.449
GRAY_STD = 0.226

# Mixed-precision choices of every script (engine.resolve_amp turns auto into one of the others).
AMP_MODES: tuple[str, ...] = ("auto", "bf16", "fp16", "off")

METRICS: tuple[str, ...] = ("f1", "auroc", "acc", "loss")


def _option(help: str, parse: Callable[[str], Any] = str, choices: tuple[str, ...] | None = None) -> Any:
    """A training option: a field without a default (each preset gives the value) whose
    metadata says how the command line parses it and what its help says."""
    return field(metadata={"help": help, "parse": parse, "choices": choices})


@dataclass(frozen=True)
class TrainConfig:
    """The effective settings of one trainer: the training options, the preset they came
    from, the run switches the loop reads, and the rest of the command line (``command``)
    as given, recorded with them (:meth:`record`)."""

    model: str = _option("timm model name (legacy timm-0.4 names accepted)")
    img_size: int = _option("square input size in pixels", positive_int)
    batch_size: int = _option("images per optimizer micro-step and process", positive_int)
    epochs: int = _option("maximum number of epochs", positive_int)
    lr: float = _option("AdamW learning rate", positive_float)
    weight_decay: float = _option("AdamW weight decay", non_negative_float)
    scheduler: str = _option("learning-rate schedule: ReduceLROnPlateau on the monitored metric, or cosine",
                             choices=("plateau", "cosine"))
    warmup_epochs: int = _option("linear warm-up epochs (cosine only)", non_negative_int)
    patience: int = _option("early stopping: epochs without improvement", positive_int)
    min_delta: float = _option("early stopping: smallest change that counts", non_negative_float)
    metric: str = _option("validation metric for early stopping and the best checkpoint "
                          "(f1 = binary F1 or macro-F1)", choices=METRICS)
    sampler: str = _option("class-balanced or plain shuffled sampling", choices=("balanced", "random"))
    loss: str = _option("focal loss or (binary) cross-entropy", choices=("focal", "ce"))
    focal_alpha: float = _option("focal loss alpha (weight of the positive class)", probability)
    focal_gamma: float = _option("focal loss gamma", non_negative_float)
    pretrained: bool = _option("start from pretrained weights (hub or --pretrained-file)", bool)
    pretrained_file: str | None = _option("local weights file (.safetensors/.pth)")
    drop_path: float = _option("stochastic depth rate", drop_rate)
    grad_checkpointing: bool = _option("activation checkpointing (saves memory)", bool)
    fused_attn: bool = _option(
        "attention through scaled_dot_product_attention: the same function, and on an H100 Swin-L 384 "
        "trains 8-17% faster in a third less memory (timm leaves it off for Swin)", bool)
    workers: int = _option("DataLoader worker processes per training process", non_negative_int)
    amp: str = _option("mixed precision: auto = bf16 autocast where the GPU or CPU computes bf16 "
                       "natively, otherwise off; fp16 uses a grad scaler",
                       choices=AMP_MODES)
    channels_last: bool = _option("channels_last memory format", bool)
    compile: bool = _option("torch.compile the model", bool)
    accum_steps: int = _option("gradient accumulation steps", positive_int)
    grad_clip: float | None = _option("clip gradient norm to this value", positive_float)
    mean: float = _option("input normalisation mean", finite_float)
    std: float = _option("input normalisation std", positive_float)
    device: str = _option("auto, cpu, cuda or cuda:N")
    seed: int = _option("random seed (python, numpy, torch)", int)
    init_from_pooled: bool = _option(
        "stage 4: start each age-group model from the pooled model's weights (trained first if missing)", bool)
    continue_epochs: int | None = _option(
        "stage 4 with --init-from-pooled: epochs of the models that start from the pooled model's weights "
        "(the group models and the control), without warm-up, as the weights are trained; unset: --epochs",
        positive_int)
    # not training options: where the values came from, and the run's switches and folders
    preset: str = "demo"
    quiet: bool = False
    resume: bool = False
    force: bool = False
    skip_bad: bool = False
    out_dir: Path = Path(".")
    cache_dir: Path | None = None
    test_csv: Path | None = None
    command: Mapping[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """What the run records as its config (``*_config.json``, checkpoints' ``config``):
        the command line as given, with the effective training options and preset; the run
        switches and folders where the command line has them."""
        out = dict(self.command)
        for f in dataclasses.fields(self):
            if f.name != "command" and (f.metadata or f.name == "preset" or f.name in out):
                out[f.name] = getattr(self, f.name)
        return out

    def note(self) -> str | None:
        """A plain statement when the demo trains a CNN instead of a Swin (the trainers print it)."""
        if self.preset == "demo" and "swin" not in str(self.model):
            return (f"note: the demo preset trains {self.model}, a small CNN, not a Swin: a tiny Swin trained "
                    f"from scratch learns the phantom too slowly for the CPU time budget. The paper preset "
                    f"trains Swin-L; the tests train swin_demo through this same code path.")
        return None


def options() -> tuple[dataclasses.Field, ...]:
    """The training options, in the order the help lists them."""
    return tuple(f for f in dataclasses.fields(TrainConfig) if f.metadata)


TRAIN_KEYS: tuple[str, ...] = tuple(f.name for f in options())
# the run's switches and folders, taken from the command line as they are
RUN_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(TrainConfig)
                                    if not f.metadata and f.name not in ("preset", "command"))
