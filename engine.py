"""The one training loop: train_one_epoch / evaluate / fit, plus predict.

Both trainers (``train_age_classifier.py``, ``train_fracture_per_agegroup.py``) call
:func:`fit` through :func:`train_classifier`; what differs between them (number of classes,
target column, loss, sampler, the metric that picks the best epoch) is passed in.

Output conventions:

* Models have one output per class (``[N, C]`` logits, softmax), also the binary fracture
  task (C = 2), since checkpoints rebuild the head from ``num_classes`` (models.py). Focal
  loss on two logits with alpha ``(1 - a, a)`` equals the binary sigmoid focal loss on
  their difference (:func:`make_criterion`). A one-logit head (``[N]``/``[N, 1]``, sigmoid)
  works too. :func:`to_probs` gives ``[N, C]`` probabilities either way, so
  ``probs.argmax(1)`` is the prediction and ``probs[:, 1]`` the positive-class probability.
* Metrics per split: ``loss``, ``acc``, ``f1`` (binary F1 of class 1, or macro-F1),
  ``auroc`` (binary, or one-vs-rest macro; NaN when a class is missing), the confusion
  matrix (rows true, columns predicted) and ``n``, the number of images it covers.

Files of one model, from one stem (:class:`RunFiles`): ``<stem>.pt`` (best epoch),
``<stem>_last.pt`` (resumable state, written atomically every epoch),
``<stem>_metrics.csv`` (one row per epoch) and ``<stem>_config.json``.

Interruption: the ``last`` state is saved at the end of every epoch, so a Ctrl-C (SIGINT,
KeyboardInterrupt) or a kill loses at most the epoch in progress: ``--resume`` continues
from the epoch after the last saved one with the same optimizer, schedule, early-stopping
and RNG state (tests check that the numbers equal an uninterrupted run's).
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.metrics import classification_report
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, SequentialSampler
from torchsampler import ImbalancedDatasetSampler

import columns
import distributed
import logs
import metrics
import splits
import unified_dataset
from config import save_config, to_dict
from errors import DataError, ResumeError
from io_utils import write_csv
from losses import FocalLoss
from models import create_model, load_checkpoint, make_checkpoint, resolve_model_name, save_checkpoint
from presets import AMP_MODES, model_note
from unified_dataset import WristDataset, build_transforms

HISTORY_COLUMNS: tuple[str, ...] = (
    "epoch", "lr", "train_loss", "train_acc", "train_f1", "train_images",
    "val_loss", "val_acc", "val_f1", "val_auroc", "seconds", "images_per_s",
)
# --metric -> (history column, direction)
MONITORS: dict[str, tuple[str, str]] = {
    "f1": ("val_f1", "max"),
    "auroc": ("val_auroc", "max"),
    "acc": ("val_acc", "max"),
    "loss": ("val_loss", "min"),
}


def log(*parts: Any) -> None:
    """Print on rank 0 only (all ranks compute the same numbers)."""
    if distributed.is_main():
        print(*parts, flush=True)


# --------------------------------------------------------------------------- precision, seeds
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_amp(amp: str, device: torch.device) -> str:
    """``auto`` -> bf16 on CUDA (when the GPU supports it), off on the CPU."""
    if amp == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "off"
    if amp not in AMP_MODES:
        raise ValueError(f"amp must be one of {', '.join(AMP_MODES)}, got {amp!r}")
    return amp


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def rng_state() -> dict[str, Any]:
    """RNG states of python, numpy and torch in types ``torch.load(weights_only=True)`` reads."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- outputs and metrics
def _is_binary(logits: torch.Tensor) -> bool:
    return logits.dim() == 1 or logits.shape[1] == 1


def to_probs(logits: torch.Tensor) -> torch.Tensor:
    """``[N, C]`` probabilities from binary (one logit) or multi-class logits."""
    logits = logits.float()
    if _is_binary(logits):
        p = torch.sigmoid(logits.reshape(-1))
        return torch.stack([1 - p, p], dim=1)
    return F.softmax(logits, dim=1)


def loss_targets(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Targets in the form the loss expects: float like the logit for binary, int64 indices otherwise."""
    if _is_binary(logits):
        return labels.to(logits.dtype).reshape(logits.shape)
    return labels.long()


def _predicted_labels(logits: torch.Tensor) -> torch.Tensor:
    if _is_binary(logits):
        return (logits.reshape(-1) > 0).long()
    return logits.argmax(1)


# --------------------------------------------------------------------------- one pass over data
def _progress(iterable: Iterable, enabled: bool, desc: str) -> logs.Progress:
    """A bar on a terminal, progress lines without one (logs.Progress)."""
    return logs.Progress(iterable, desc, enabled=enabled)


def _to_device(x: torch.Tensor, y: torch.Tensor, device: torch.device,
               channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.to(device, non_blocking=True)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True)


def _sampler_indices(loader: DataLoader) -> np.ndarray:
    """Dataset indices in the order an unshuffled loader yields them (this rank's share)."""
    sampler = loader.sampler
    if isinstance(sampler, DistributedSampler) and sampler.shuffle:
        raise ValueError("evaluation needs an unshuffled loader")
    return np.fromiter(iter(sampler), dtype=np.int64)


@torch.no_grad()
def forward_all(model: nn.Module, loader: DataLoader, device: torch.device, *, amp: str = "off",
                channels_last: bool = False, progress: bool = False,
                desc: str = "eval") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logits and labels of every dataset row, in dataset order, gathered over ranks.

    Returns ``(indices, logits float32, labels)`` covering each dataset index exactly once.
    """
    model.eval()
    indices = _sampler_indices(loader)
    logits_parts, label_parts = [], []
    for x, y in _progress(loader, progress, desc):
        x, y = _to_device(x, y, device, channels_last)
        with autocast(device, amp):
            out = model(x)
        logits_parts.append(out.float().reshape(out.shape[0], -1))
        label_parts.append(y)
    logits = torch.cat(logits_parts).cpu().numpy() if logits_parts else np.zeros((0, 1), np.float32)
    labels = torch.cat(label_parts).cpu().numpy() if label_parts else np.zeros(0, np.int64)
    if len(indices) != len(logits):
        raise RuntimeError(f"loader yielded {len(logits)} rows for {len(indices)} sampler indices")
    return distributed.gather_rows(indices, logits, labels)


@dataclass
class EvalResult:
    loss: float
    probs: np.ndarray  # [N, C]
    labels: np.ndarray  # [N]
    indices: np.ndarray  # dataset index of each row
    metrics: dict[str, Any]


def evaluate(model: nn.Module, loader: DataLoader, criterion: Callable, device: torch.device, *,
             amp: str = "off", channels_last: bool = False, progress: bool = False,
             desc: str = "val") -> EvalResult:
    """Loss and metrics over the whole (possibly rank-sharded) dataset of ``loader``."""
    indices, logits, labels = forward_all(model, loader, device, amp=amp, channels_last=channels_last,
                                          progress=progress, desc=desc)
    logits_t = torch.from_numpy(logits)
    if logits_t.shape[1] == 1:
        logits_t = logits_t.reshape(-1)
    with torch.no_grad():
        loss = float(criterion(logits_t, loss_targets(logits_t, torch.from_numpy(labels)))) if len(labels) else float("nan")
    probs = to_probs(logits_t).numpy()
    scores = metrics.compute_metrics(probs, labels)
    scores["loss"] = loss
    return EvalResult(loss=loss, probs=probs, labels=labels, indices=indices, metrics=scores)


def predict(model: nn.Module, loader: DataLoader, device: torch.device, *, amp: str = "off",
            channels_last: bool = False, progress: bool = False, desc: str = "predict") -> np.ndarray:
    """``[N, C]`` probabilities for every row of the loader's dataset, in dataset order."""
    _, logits, _ = forward_all(model, loader, device, amp=amp, channels_last=channels_last,
                               progress=progress, desc=desc)
    logits_t = torch.from_numpy(logits)
    return to_probs(logits_t.reshape(-1) if logits_t.shape[1] == 1 else logits_t).numpy()


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, criterion: Callable,
               optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, device: torch.device, *,
               amp: str = "off", accum_steps: int = 1, step_now: bool = True,
               grad_clip: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One micro-step: forward, loss, backward of ``loss / accum_steps``; with ``step_now``
    also the (unscaled, clipped) optimizer step. Returns the loss and logits, detached."""
    # DDP: skip the gradient all-reduce on accumulation micro-steps
    sync = model.no_sync() if (not step_now and hasattr(model, "no_sync")) else contextlib.nullcontext()
    with sync:
        with autocast(device, amp):
            logits = model(x)
            loss = criterion(logits, loss_targets(logits, y))
        scaler.scale(loss / accum_steps).backward()
    if step_now:
        if grad_clip:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach(), logits.detach()


def train_one_epoch(model: nn.Module, loader: DataLoader, criterion: Callable,
                    optimizer: torch.optim.Optimizer, device: torch.device, *,
                    scaler: torch.amp.GradScaler | None = None, amp: str = "off", accum_steps: int = 1,
                    channels_last: bool = False, grad_clip: float | None = None,
                    progress: bool = False, desc: str = "train",
                    scalars: logs.ScalarLog | None = None,
                    on_first: Callable[[logs.Progress], None] | None = None) -> dict[str, float]:
    """One pass over ``loader``; returns loss, acc, f1, n, seconds, images_per_s (all ranks).
    ``scalars`` receives each step's loss (TensorBoard); ``on_first`` is called once after
    the first few steps (:class:`logs.Progress`)."""
    model.train()
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=False)
    n_batches = len(loader)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    preds, labels = [], []
    num_classes = 2
    optimizer.zero_grad(set_to_none=True)
    start = time.perf_counter()
    bar = _progress(loader, progress, desc)
    bar.on_first, bar.first_steps = on_first, min(bar.first_steps, max(n_batches, 1))
    for i, (x, y) in enumerate(bar):
        x, y = _to_device(x, y, device, channels_last)
        step_now = (i + 1) % accum_steps == 0 or i + 1 == n_batches
        loss, logits = train_step(model, x, y, criterion, optimizer, scaler, device, amp=amp,
                                  accum_steps=accum_steps, step_now=step_now, grad_clip=grad_clip)
        loss_sum += loss.double() * y.shape[0]
        preds.append(_predicted_labels(logits))
        labels.append(y)
        num_classes = 2 if _is_binary(logits) else logits.shape[1]
        bar.set_loss(loss)
        if scalars is not None:
            scalars.step_loss(loss)
    preds_np = torch.cat(preds).cpu().numpy() if preds else np.zeros(0, np.int64)
    labels_np = torch.cat(labels).cpu().numpy() if labels else np.zeros(0, np.int64)
    total_loss, n = distributed.all_reduce_sum([float(loss_sum), float(len(labels_np))])
    seconds = time.perf_counter() - start
    if not math.isfinite(total_loss):
        raise FloatingPointError("training loss is not finite (diverged); lower --lr or use --amp off")
    preds_np, labels_np = distributed.gather_arrays(preds_np, labels_np)
    m = metrics.classification_metrics(labels_np, preds_np, num_classes)
    return {"loss": total_loss / max(n, 1), "acc": m["acc"], "f1": m["f1"], "n": int(n),
            "seconds": seconds, "images_per_s": n / seconds if seconds > 0 else float("nan")}


# --------------------------------------------------------------------------- early stopping
class EarlyStopping:
    """Stop after ``patience`` epochs without an improvement larger than ``min_delta``.

    A NaN value never counts as an improvement, except that the first epoch always
    becomes the best (so there is always a best checkpoint).
    """

    def __init__(self, patience: int, mode: str = "max", min_delta: float = 0.0) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be max or min, got {mode!r}")
        self.patience, self.mode, self.min_delta = patience, mode, min_delta
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.bad_epochs = 0

    def improved(self, value: float) -> bool:
        if self.best is None or (math.isnan(self.best) and not math.isnan(value)):
            return True
        if math.isnan(value):
            return False
        if self.mode == "max":
            return value > self.best + self.min_delta
        return value < self.best - self.min_delta

    def step(self, value: float, epoch: int) -> bool:
        """Record an epoch's value; True if it is the new best."""
        if self.improved(value):
            self.best, self.best_epoch, self.bad_epochs = float(value), epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"patience": self.patience, "mode": self.mode, "min_delta": self.min_delta,
                "best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        # patience/min_delta stay as configured now: resuming may change them
        self.best, self.best_epoch, self.bad_epochs = state["best"], state["best_epoch"], state["bad_epochs"]


# --------------------------------------------------------------------------- optimizer, schedule
def build_optimizer(model: nn.Module, lr: float, weight_decay: float,
                    fused: bool | None = None) -> torch.optim.Optimizer:
    """AdamW via timm: no weight decay on biases, norms and the model's ``no_weight_decay`` set.

    ``fused`` (default: when every parameter is on CUDA) uses PyTorch's single-kernel AdamW;
    torch still defaults to the multi-kernel foreach version, which reads and writes the
    optimizer state once per elementwise operation. CPU runs keep the default.
    """
    from timm.optim import create_optimizer_v2

    if fused is None:
        params = list(model.parameters())
        fused = bool(params) and all(p.is_cuda for p in params)
    extra = {"fused": True} if fused else {}
    return create_optimizer_v2(model, opt="adamw", lr=lr, weight_decay=weight_decay, **extra)


def build_scheduler(optimizer: torch.optim.Optimizer, kind: str, epochs: int, *, warmup_epochs: int = 0,
                    mode: str = "max") -> torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau:
    """Per-epoch schedule: ``plateau`` (halve the lr after 2 flat epochs of the monitored
    metric) or ``cosine`` (to 1% of the lr, after ``warmup_epochs`` of linear warm-up)."""
    sched = torch.optim.lr_scheduler
    if kind == "plateau":
        return sched.ReduceLROnPlateau(optimizer, mode=mode, factor=0.5, patience=2)
    if kind != "cosine":
        raise ValueError(f"unknown scheduler {kind!r} (plateau|cosine)")
    base_lr = optimizer.param_groups[0]["lr"]
    warmup = min(max(warmup_epochs, 0), max(epochs - 1, 0))
    cosine = sched.CosineAnnealingLR(optimizer, T_max=max(epochs - warmup, 1), eta_min=base_lr * 0.01)
    if not warmup:
        return cosine
    ramp = sched.LinearLR(optimizer, start_factor=0.1, end_factor=1.0, total_iters=warmup)
    return sched.SequentialLR(optimizer, [ramp, cosine], milestones=[warmup])


# --------------------------------------------------------------------------- fit
@dataclass
class RunFiles:
    """The files of one trained model, all derived from one stem."""

    best: Path
    last: Path
    metrics_csv: Path
    config_json: Path

    @classmethod
    def from_stem(cls, directory: str | Path, stem: str) -> "RunFiles":
        names = columns.model_files(stem)
        d = Path(directory)
        return cls(best=d / names["best"], last=d / names["last"], metrics_csv=d / names["history"],
                   config_json=d / names["config"])


@dataclass
class FitOptions:
    epochs: int
    monitor: str = "f1"
    patience: int = 5
    min_delta: float = 0.0
    amp: str = "off"  # resolved: bf16 | fp16 | off
    accum_steps: int = 1
    channels_last: bool = False
    compile: bool = False
    grad_clip: float | None = None
    resume: bool = False
    force: bool = False
    quiet: bool = False
    seed: int = 0
    tensorboard_dir: Path | None = None  # this model's TensorBoard folder (rank 0 writes it)


def settings_mismatch(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between two essential-settings dicts."""
    out = []
    for key in sorted(set(saved) | set(now)):
        if saved.get(key) != now.get(key):
            out.append(f"{key}: saved {saved.get(key)!r}, now {now.get(key)!r}")
    return out


def _write_history(history: list[dict[str, Any]], path: Path) -> None:
    write_csv(pd.DataFrame(history, columns=list(HISTORY_COLUMNS)), path)


def _fmt(x: float) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


@dataclass
class TrainState:
    """What a run carries from one epoch to the next, and what its ``last`` file restores."""

    stopper: EarlyStopping
    scaler: torch.amp.GradScaler
    history: list[dict[str, Any]] = field(default_factory=list)
    best_metrics: dict[str, Any] = field(default_factory=dict)
    start_epoch: int = 1
    scalars: logs.ScalarLog = field(default_factory=lambda: logs.ScalarLog(None))


def _settings_error(path: Path, diffs: Sequence[str]) -> ResumeError:
    return ResumeError(f"{path}: cannot resume, essential settings differ: " + "; ".join(diffs)
                       + ". Use the saved settings, or --force to start over.")


def _finished_result(files: RunFiles, settings: Mapping[str, Any], opts: FitOptions,
                     monitor_col: str) -> tuple[dict[str, Any] | None, bool]:
    """With --resume, a model already trained with these settings is not retrained: its
    result. Returns (that result or None, whether a finished model is being redone)."""
    if not (opts.resume and files.best.exists()):
        return None, False
    finished = load_checkpoint(files.best)
    if not finished.get("finished"):
        return None, False
    diffs = settings_mismatch(finished.get("settings", {}), settings)
    if diffs and not opts.force:
        raise _settings_error(files.best, diffs)
    if diffs:
        log(f"--force: {files.best} was trained with other settings ({'; '.join(diffs)}); starting over")
        return None, True
    log(f"{files.best}: already trained (best epoch {finished['epoch']}, {monitor_col} "
        f"{_fmt(finished['metrics'].get(monitor_col))}); not retraining")
    return _result(files, finished["epoch"], finished["metrics"], finished["epochs_run"], finished["stopped_early"],
                   finished["history"]), False


def _restore_last(files: RunFiles, settings: Mapping[str, Any], opts: FitOptions, model: nn.Module,
                  optimizer: torch.optim.Optimizer, scheduler: Any, state: TrainState, monitor_col: str) -> None:
    """Continue an unfinished run from its ``last`` file (only with --resume and the same
    essential settings): weights, optimizer, schedule, scaler, early stopping, history, RNGs."""
    if not files.last.exists():
        return
    saved = load_checkpoint(files.last)
    diffs = settings_mismatch(saved.get("settings", {}), settings)
    if not opts.resume:
        log(f"Found an unfinished run in {files.last} (epoch {saved['epoch']}); starting over "
            f"(pass --resume to continue it)")
        return
    if diffs and not opts.force:
        raise _settings_error(files.last, diffs)
    if diffs:
        log(f"--force: saved state in {files.last} has different settings ({'; '.join(diffs)}); starting over")
        return
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    if scheduler is not None and saved.get("scheduler") is not None:
        scheduler.load_state_dict(saved["scheduler"])
    if saved.get("scaler"):
        state.scaler.load_state_dict(saved["scaler"])
    state.stopper.load_state_dict(saved["early_stopping"])
    state.history = list(saved["history"])
    state.best_metrics = dict(saved["best_metrics"])
    state.start_epoch = int(saved["epoch"]) + 1
    set_rng_state(saved["rng"])
    if distributed.get_rank():  # ranks must not share augmentation streams
        seed_everything(opts.seed + 1000 * state.start_epoch + distributed.get_rank())
    log(f"Resuming from epoch {state.start_epoch} (state of epoch {saved['epoch']} in {files.last}; "
        f"best {monitor_col} so far {_fmt(state.stopper.best)} at epoch {state.stopper.best_epoch})")


def _wrap(model: nn.Module, device: torch.device, opts: FitOptions) -> nn.Module:
    """The model as trained: DDP under torchrun, compiled if asked (checkpoints keep ``model``)."""
    if distributed.is_dist():
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(model) if opts.compile else model


def _run_epoch(epoch: int, model: nn.Module, train_loader: DataLoader, val_loader: DataLoader, criterion: Callable,
               optimizer: torch.optim.Optimizer, device: torch.device, state: TrainState, opts: FitOptions,
               progress: bool) -> tuple[dict[str, Any], EvalResult, dict[str, float]]:
    """Train one epoch and validate: the history row, the validation result, the train stats."""
    t0 = time.perf_counter()
    for loader in (train_loader, val_loader):
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
    lr = optimizer.param_groups[0]["lr"]
    tr = train_one_epoch(model, train_loader, criterion, optimizer, device, scaler=state.scaler, amp=opts.amp,
                         accum_steps=opts.accum_steps, channels_last=opts.channels_last, grad_clip=opts.grad_clip,
                         progress=progress, desc=f"epoch {epoch} train", scalars=state.scalars,
                         on_first=_eta_note(opts.epochs - epoch + 1) if progress and epoch == state.start_epoch else None)
    ev = evaluate(model, val_loader, criterion, device, amp=opts.amp, channels_last=opts.channels_last,
                  progress=progress, desc=f"epoch {epoch} val")
    vm = ev.metrics
    row = {"epoch": epoch, "lr": lr, "train_loss": tr["loss"], "train_acc": tr["acc"], "train_f1": tr["f1"],
           "train_images": tr["n"], "val_loss": vm["loss"], "val_acc": vm["acc"], "val_f1": vm["f1"],
           "val_auroc": vm["auroc"], "seconds": time.perf_counter() - t0, "images_per_s": tr["images_per_s"]}
    return row, ev, tr


def _eta_note(epochs_left: int) -> Callable[[logs.Progress], None]:
    """The one line that projects this model's training from its first steps, so a slow run
    (Swin-L on a CPU: an epoch can take an hour) says early how long it will take."""
    def note(bar: logs.Progress) -> None:
        per_step, _ = bar.estimate()
        epoch_s = per_step * (bar.total or bar.steps)
        log(f"estimate from the first {bar.steps} steps: {per_step:.2f} s per step, "
            f"{logs.format_seconds(epoch_s)} per epoch's training, up to "
            f"{logs.format_seconds(epoch_s * epochs_left)} for {epochs_left} epoch(s) (validation not included)")
    return note


def _step_scheduler(scheduler: Any, value: float) -> None:
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(value)
    elif scheduler is not None:
        scheduler.step()


def _best_metrics(vm: Mapping[str, Any], tr: Mapping[str, Any]) -> dict[str, Any]:
    best = {f"val_{k}" if k != "confusion_matrix" else "val_confusion_matrix": v for k, v in vm.items()}
    best.update({"train_loss": tr["loss"], "train_acc": tr["acc"], "train_f1": tr["f1"]})
    return best


def _save_epoch(files: RunFiles, checkpoint: Callable[..., dict[str, Any]], epoch: int, is_best: bool,
                vm: Mapping[str, Any], optimizer: torch.optim.Optimizer, scheduler: Any, state: TrainState) -> None:
    """The best checkpoint (if this epoch is it), the metrics CSV and the resumable ``last`` state."""
    if is_best:
        save_checkpoint(files.best, checkpoint(epoch, state.best_metrics, finished=False))
    _write_history(state.history, files.metrics_csv)
    save_checkpoint(files.last, checkpoint(
        epoch, vm, optimizer=optimizer.state_dict(),
        scheduler=scheduler.state_dict() if scheduler is not None else None, scaler=state.scaler.state_dict(), early_stopping=state.stopper.state_dict(), rng=rng_state(),
        sampler_epoch=epoch, history=state.history, best_metrics=state.best_metrics))


def _log_epoch(epoch: int, row: Mapping[str, Any], ev: EvalResult, is_best: bool, stopper: EarlyStopping,
               class_names: Sequence[str]) -> None:
    vm = ev.metrics
    log(f"[Epoch {epoch}] Train Loss {_fmt(row['train_loss'])} | Acc {_fmt(row['train_acc'])} | F1 "
        f"{_fmt(row['train_f1'])} | lr {row['lr']:.3g} | {logs.format_rate(row['images_per_s'])}")
    log(f"[Epoch {epoch}] Val Loss {_fmt(vm['loss'])} | Acc {_fmt(vm['acc'])} | F1 {_fmt(vm['f1'])}"
        f" | AUROC {_fmt(vm['auroc'])} | n {vm['n']}"
        + (" | new best" if is_best else f" | best {_fmt(stopper.best)} at epoch {stopper.best_epoch}"))
    log(metrics.format_confusion(vm["confusion_matrix"], class_names))
    if len(class_names) > 2:
        log(classification_report(ev.labels, ev.probs.argmax(1), labels=list(range(len(class_names))),
                                  target_names=list(class_names), digits=3, zero_division=0))


def _finish(files: RunFiles, epochs_run: int, stopped_early: bool, history: list[dict[str, Any]],
            opts: FitOptions) -> None:
    """Mark the best checkpoint finished (what --resume checks to not retrain) with the run's
    budget; the resumable state (optimizer etc., several times the model's size) goes."""
    if distributed.is_main():
        best = load_checkpoint(files.best)
        best.update(finished=True, epochs_run=epochs_run, stopped_early=stopped_early, history=history,
                    epochs_max=opts.epochs, images_seen=images_seen(history))
        save_checkpoint(files.best, best)
        files.last.unlink(missing_ok=True)
    distributed.barrier()  # the best checkpoint exists for every rank after this


def fit(model: nn.Module, train_loader: DataLoader, val_loader: DataLoader, criterion: Callable,
        optimizer: torch.optim.Optimizer, scheduler: Any, *, device: torch.device, files: RunFiles,
        meta: Mapping[str, Any], settings: Mapping[str, Any], opts: FitOptions,
        class_names: Sequence[str]) -> dict[str, Any]:
    """Train with early stopping; save the best checkpoint and a resumable ``last`` state.

    ``meta`` goes into every checkpoint (model name, classes, image size, normalisation,
    config...). ``settings`` are the essential settings a resume must match (model, image
    size, classes, data); a mismatch raises :class:`ResumeError` naming them, unless
    ``opts.force``, which starts over. Returns best epoch, its val metrics, epochs run,
    whether it stopped early, and the file paths.
    """
    if opts.monitor not in MONITORS:
        raise ValueError(f"unknown metric {opts.monitor!r} (known: {', '.join(MONITORS)})")
    monitor_col, mode = MONITORS[opts.monitor]
    settings = dict(settings)
    progress = not opts.quiet and distributed.is_main()  # a bar on a terminal, else lines
    state = TrainState(EarlyStopping(opts.patience, mode=mode, min_delta=opts.min_delta),
                       torch.amp.GradScaler(device.type, enabled=opts.amp == "fp16"))
    raw = model.to(device)
    if opts.channels_last:
        raw = raw.to(memory_format=torch.channels_last)
    done, redo = _finished_result(files, settings, opts, monitor_col)
    if done is not None:
        distributed.barrier()
        return done
    if not redo:
        _restore_last(files, settings, opts, raw, optimizer, scheduler, state, monitor_col)
    train_model = _wrap(raw, device, opts)
    if distributed.is_main() and opts.tensorboard_dir is not None:
        state.scalars = logs.ScalarLog(opts.tensorboard_dir)
        state.scalars.step = (state.start_epoch - 1) * len(train_loader)

    def checkpoint(epoch: int, scores: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
        return make_checkpoint(raw, **meta, metrics=scores, epoch=epoch, settings=settings,
                               monitor=opts.monitor, **extra)

    epoch = saved_epoch = state.start_epoch - 1
    stopped_early = state.stopper.should_stop  # stopped, but interrupted before the finished marker
    log(f"Training {meta.get('model_name', '')} on {device} (amp {opts.amp}) for up to {opts.epochs} epochs, "
        f"{len(train_loader.dataset)} train / {len(val_loader.dataset)} val images, best epoch by {monitor_col}")
    try:
        for epoch in range(opts.epochs + 1 if stopped_early else state.start_epoch, opts.epochs + 1):
            row, ev, tr = _run_epoch(epoch, train_model, train_loader, val_loader, criterion, optimizer, device,
                                     state, opts, progress)
            state.history.append(row)
            value = float(row[monitor_col])
            _step_scheduler(scheduler, value)
            is_best = state.stopper.step(value, epoch)
            # every rank computed the same gathered metrics; rank 0's decision is the one
            stop = distributed.broadcast_object(state.stopper.should_stop and epoch < opts.epochs)
            if is_best:
                state.best_metrics = _best_metrics(ev.metrics, tr)
            if distributed.is_main():  # saved before the epoch is reported: a Ctrl-C after its Val line keeps it
                _save_epoch(files, checkpoint, epoch, is_best, ev.metrics, optimizer, scheduler, state)
            saved_epoch = epoch
            state.scalars.epoch(epoch, scalar_values(row))
            _log_epoch(epoch, row, ev, is_best, state.stopper, class_names)
            if stop:
                stopped_early = True
                log(f"Early stopping at epoch {epoch}: no {monitor_col} improvement for {state.stopper.bad_epochs} "
                    f"epochs (best {_fmt(state.stopper.best)} at epoch {state.stopper.best_epoch})")
                break
    except KeyboardInterrupt:
        log(f"\nInterrupted during epoch {epoch}. State of epoch {saved_epoch} is saved in {files.last}; re-run "
            f"with --resume (run_all_training.py: the same command) to continue from epoch {saved_epoch + 1}."
            if saved_epoch >= 1
            else f"\nInterrupted during epoch {epoch}, before any epoch completed; nothing to resume.")
        raise
    finally:
        state.scalars.close()
    _finish(files, epoch, stopped_early, state.history, opts)
    log(f"Best epoch {state.stopper.best_epoch}: {monitor_col} {_fmt(state.stopper.best)} -> {files.best}")
    return _result(files, state.stopper.best_epoch, state.best_metrics, epoch, stopped_early, state.history)


def scalar_values(row: Mapping[str, Any]) -> dict[str, Any]:
    """An epoch's history row as TensorBoard tags (train/..., val/..., lr, ...)."""
    tags = {"train_loss": "train/loss", "train_acc": "train/acc", "train_f1": "train/f1",
            "images_per_s": "train/images_per_s", "val_loss": "val/loss", "val_acc": "val/acc",
            "val_f1": "val/f1", "val_auroc": "val/auroc", "lr": "lr", "seconds": "epoch_seconds"}
    return {tag: row.get(key) for key, tag in tags.items()}


def images_seen(history: Sequence[Mapping[str, Any]]) -> int | None:
    """Training images processed over all epochs of a run (its training budget); None for a
    history written before the per-epoch count was recorded."""
    counts = [row.get("train_images") for row in history]
    if not counts or any(c is None or c != c for c in counts):
        return None
    return int(sum(counts))


def _result(files: RunFiles, best_epoch: int | None, best_metrics: Mapping[str, Any], epochs_run: int,
            stopped_early: bool, history: list) -> dict[str, Any]:
    return {"checkpoint": str(files.best), "last": str(files.last), "metrics_csv": str(files.metrics_csv),
            "best_epoch": best_epoch, "best_metrics": dict(best_metrics), "epochs_run": epochs_run,
            "stopped_early": stopped_early, "images_seen": images_seen(history), "history": list(history)}


# --------------------------------------------------------------------------- the recipe both trainers use
def _seed_worker(worker_id: int) -> None:
    # albumentations draws from its own generators, which forked workers would all copy
    # unchanged: reseed them from the per-worker seed torch derives from its RNG
    info = torch.utils.data.get_worker_info()
    transform = getattr(info.dataset, "transform", None)
    if hasattr(transform, "set_random_seed"):
        transform.set_random_seed(info.seed % 2**32)


def make_loader(dataset: Dataset, batch_size: int, *, train: bool, sampler: str = "random", workers: int = 0,
                seed: int = 0, device: torch.device = torch.device("cpu"), persistent: bool = True,
                shard: bool = True) -> DataLoader:
    """DataLoader for training (``sampler`` balanced|random) or evaluation (in order).

    Under torchrun the samplers are the distributed ones (class-balanced:
    :class:`distributed.DistributedBalancedSampler`; evaluation: ``DistributedSampler``
    without shuffling, whose padding :func:`forward_all` removes again). ``shard=False``
    gives an evaluation loader every row on every rank, for work one rank does alone
    without gathering (Grad-CAM).
    """
    dist_on = distributed.is_dist()
    if train and sampler == "balanced":
        labels = dataset.get_labels()
        s = (distributed.DistributedBalancedSampler(labels, seed=seed) if dist_on
             else ImbalancedDatasetSampler(dataset, labels=labels))
    elif train:
        s = DistributedSampler(dataset, shuffle=True, seed=seed) if dist_on else RandomSampler(dataset)
    else:
        s = DistributedSampler(dataset, shuffle=False) if dist_on and shard else SequentialSampler(dataset)
    transform = getattr(dataset, "transform", None)
    if workers == 0 and hasattr(transform, "set_random_seed"):
        transform.set_random_seed(seed + distributed.get_rank())
    return DataLoader(
        dataset, batch_size=batch_size, sampler=s, num_workers=workers,
        pin_memory=device.type == "cuda", persistent_workers=persistent and workers > 0,
        prefetch_factor=4 if workers > 0 else None, worker_init_fn=_seed_worker,
        # a last batch of one image breaks BatchNorm in training
        drop_last=train and len(s) > batch_size,
    )


def make_criterion(loss: str, num_classes: int, focal_alpha: float | None = 0.25,
                   focal_gamma: float = 2.0) -> nn.Module:
    """``ce`` or ``focal``. For two classes (a two-logit softmax head) focal alpha is the
    positive-class weight, i.e. exactly the binary sigmoid focal loss on the logit difference."""
    if loss == "ce":
        return nn.CrossEntropyLoss()
    if loss != "focal":
        raise ValueError(f"unknown loss {loss!r} (focal|ce)")
    alpha: Any = focal_alpha
    if num_classes == 2 and focal_alpha is not None:
        alpha = (1.0 - focal_alpha, focal_alpha)
    return FocalLoss(alpha=alpha, gamma=focal_gamma)


def weights_origin(cfg: Any) -> dict[str, Any]:
    """Where a model's initial weights come from when no checkpoint is given."""
    if cfg.pretrained:
        return {"kind": "pretrained", "source": str(cfg.pretrained_file or resolve_model_name(cfg.model))}
    return {"kind": "random", "seed": int(cfg.seed)}


def frame_fingerprint(df: pd.DataFrame, columns: Sequence[str]) -> str:
    """Short identity of the rows a model trains on (for the resume check)."""
    digest = hashlib.sha256(df[list(columns)].to_csv(index=False).encode()).hexdigest()
    return f"{len(df)} rows, sha256 {digest[:16]}"


def decode_pass(df: pd.DataFrame, img_size: int, *, cache_dir: str | Path | None, skip_bad: bool,
                rejected_csv: str | Path | None, progress: bool = False) -> pd.DataFrame:
    """``unified_dataset.check_decodable`` before the first epoch or inference: rank 0 decodes
    (into the cache) and every rank gets the same rows back.

    Every image is decoded here anyway (the cache warm-up), so this is where a file that
    passed stage 1's cheap checks but cannot be decoded fails, in one line, rather than in
    a DataLoader worker hours into training.
    """
    kept = None
    if distributed.is_main():
        kept = unified_dataset.check_decodable(df, img_size, cache_dir, skip_bad=skip_bad,
                                               rejected_csv=rejected_csv, progress=progress)
    dropped = distributed.broadcast_object(
        [r for r in df.index if r not in kept.index] if kept is not None else None)
    if kept is None:
        kept = df.drop(index=dropped)
        kept.attrs.update(df.attrs)
    return kept


def train_classifier(cfg: Any, *, kind: str, train_df: pd.DataFrame, val_df: pd.DataFrame, target_col: str,
                     class_names: Sequence[str], files: RunFiles, device: torch.device, age_bounds: Sequence[float],
                     cache_dir: str | Path | None = None, extra_meta: Mapping[str, Any] | None = None,
                     title: str = "", init_state: Mapping[str, torch.Tensor] | None = None,
                     init_from: Mapping[str, Any] | None = None,
                     images_checked: bool = False) -> dict[str, Any]:
    """Build data, model, loss, optimizer and schedule from ``cfg`` (presets.resolve_config)
    and :func:`fit` them. ``init_state`` (a state dict of the same architecture) replaces the
    initial weights, and ``init_from`` says where it came from (stored as the checkpoint's
    ``init``, so a comparison of models can state each one's training budget). Unless
    ``images_checked`` (the caller ran :func:`decode_pass` on both frames at
    ``cfg.img_size``), every image is decoded first; with ``cfg.skip_bad`` the ones that fail
    are left out. Returns fit's result dict."""
    seed_everything(cfg.seed + distributed.get_rank())
    num_classes = len(class_names)
    if not images_checked:
        rejected = Path(cfg.out_dir) / columns.REJECTED_CSV
        progress = not cfg.quiet and sys.stderr.isatty()
        train_df, val_df = (decode_pass(df, cfg.img_size, cache_dir=cache_dir, skip_bad=cfg.skip_bad,
                                        rejected_csv=rejected, progress=progress) for df in (train_df, val_df))
    datasets = {}
    for name, df, train in (("train", train_df, True), ("val", val_df, False)):
        transform = build_transforms(cfg.img_size, train=train, mean=cfg.mean, std=cfg.std)
        ds = WristDataset(df, target_col, transform, cfg.img_size, cache_dir=cache_dir)
        bad = [i for i, label in enumerate(ds.labels) if label >= num_classes]
        if bad:
            raise DataError.at(ds.source, ds.rows[bad[0]], f"{target_col} is {ds.labels[bad[0]]}, expected "
                                                           f"0..{num_classes - 1}")
        datasets[name] = ds
    amp = resolve_amp(cfg.amp, device)
    train_loader = make_loader(datasets["train"], cfg.batch_size, train=True, sampler=cfg.sampler,
                               workers=cfg.workers, seed=cfg.seed, device=device)
    val_loader = make_loader(datasets["val"], cfg.batch_size, train=False, workers=cfg.workers,
                             seed=cfg.seed, device=device)
    model = create_model(cfg.model, num_classes=num_classes, in_chans=1, img_size=cfg.img_size,
                         pretrained=cfg.pretrained, pretrained_file=cfg.pretrained_file,
                         drop_path_rate=cfg.drop_path, grad_checkpointing=cfg.grad_checkpointing,
                         fused_attn=cfg.fused_attn)
    if init_state is not None:
        model.load_state_dict(init_state)
    model = model.to(device)  # before the optimizer, which picks fused AdamW for CUDA parameters
    criterion = make_criterion(cfg.loss, num_classes, cfg.focal_alpha, cfg.focal_gamma)
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay)
    scheduler = build_scheduler(optimizer, cfg.scheduler, cfg.epochs, warmup_epochs=cfg.warmup_epochs,
                                mode=MONITORS[cfg.metric][1])
    config = to_dict(cfg)
    meta = {"model_name": cfg.model, "kind": kind, "class_names": list(class_names), "img_size": cfg.img_size,
            "in_chans": 1, "mean": cfg.mean, "std": cfg.std, "age_bounds": list(age_bounds), "config": config,
            "init": dict(init_from) if init_from is not None else weights_origin(cfg),
            splits.TEST_SET_KEY: splits.recorded_test_sha256(getattr(cfg, "test_csv", None)), **dict(extra_meta or {})}
    settings = {
        "model": resolve_model_name(cfg.model), "img_size": int(cfg.img_size), "classes": list(class_names),
        "train data": frame_fingerprint(train_df, ["image_path", target_col]),
        "val data": frame_fingerprint(val_df, ["image_path", target_col]),
    }
    if distributed.is_main():
        save_config(config, files.config_json)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"== {title or files.best.stem}: {cfg.model} ({n_params / 1e6:.2f}M parameters), "
        f"{len(train_df)} train / {len(val_df)} val rows ==")
    note = model_note(cfg)
    if note:
        log(note)
    opts = FitOptions(epochs=cfg.epochs, monitor=cfg.metric, patience=cfg.patience, min_delta=cfg.min_delta,
                      amp=amp, accum_steps=cfg.accum_steps, channels_last=cfg.channels_last,
                      compile=cfg.compile, grad_clip=cfg.grad_clip, resume=cfg.resume, force=cfg.force,
                      quiet=cfg.quiet, seed=cfg.seed,
                      tensorboard_dir=columns.RunDir(cfg.out_dir).tensorboard_dir / files.best.stem)
    return fit(model, train_loader, val_loader, criterion, optimizer, scheduler, device=device, files=files,
               meta=meta, settings=settings, opts=opts, class_names=class_names)


def inference_loader(df: pd.DataFrame, img_size: int, mean: float, std: float, *, batch_size: int,
                     workers: int = 0, device: torch.device = torch.device("cpu"),
                     cache_dir: str | Path | None = None, shard: bool = True) -> DataLoader:
    """In-order loader over every row of ``df`` with the eval transform (labels -1), for
    :func:`predict`; size and normalisation come from the checkpoint being applied. Under
    torchrun (and ``shard``) each rank gets its share, which :func:`predict` gathers."""
    ds = WristDataset(df, None, build_transforms(img_size, train=False, mean=mean, std=std), img_size,
                      cache_dir=cache_dir)
    return make_loader(ds, batch_size, train=False, workers=workers, device=device, persistent=False,
                       shard=shard)
