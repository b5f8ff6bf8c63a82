"""The one training loop: train_one_epoch / evaluate / fit, plus predict.

Both trainers (``train_age_classifier.py``, ``train_fracture_per_agegroup.py``) call
:func:`fit` through ``recipe.train_classifier``; what differs between them (number of
classes, target column, loss, sampler, the metric that picks the best epoch) is passed in:
the model, loss and optimizer as a :class:`Learner`, the settings as a
``train_config.TrainConfig``, what checkpoints record as a :class:`CheckpointRecord`.

Output conventions:

* Models have one output per class (``[N, C]`` logits, softmax), also the binary fracture
  task (C = 2), since checkpoints rebuild the head from ``num_classes`` (models.py). Focal
  loss on two logits with alpha ``(1 - a, a)`` equals the binary sigmoid focal loss on
  their difference (``recipe.make_criterion``). A one-logit head (``[N]``/``[N, 1]``, sigmoid)
  works too. :func:`to_probs` gives ``[N, C]`` probabilities either way, so
  ``probs.argmax(1)`` is the prediction and ``probs[:, 1]`` the positive-class probability.
* Metrics per split: ``loss``, ``acc``, ``f1`` (binary F1 of class 1, or macro-F1),
  ``auroc`` (binary, or one-vs-rest macro; NaN when a class is missing), the confusion
  matrix (rows true, columns predicted) and ``n``, the number of images it covers.

Files of one model, from one stem (:class:`RunFiles`): ``<stem>.pt`` (best epoch),
``<stem>_last.pt`` (resumable state, written atomically every epoch),
``<stem>_metrics.csv`` (one row per epoch) and ``<stem>_config.json``.

Interruption: the ``last`` state is saved at the end of every epoch, so a Ctrl-C (SIGINT,
KeyboardInterrupt), a SIGTERM (errors.Terminated, a KeyboardInterrupt too) or a kill loses
at most the epoch in progress: ``--resume`` continues from the epoch after the last saved
one with the same optimizer, schedule, early-stopping and RNG state (tests check that the
numbers equal an uninterrupted run's).
"""
from __future__ import annotations

import contextlib
import math
import random
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
from torch.utils.data import DataLoader, DistributedSampler

import columns
import distributed
import environment
import logs
import metrics
import models
import train_config
from errors import ResumeError
from io_utils import write_csv
from models import load_checkpoint, save_checkpoint

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
    """``auto`` -> bf16 where the device computes it natively (a CUDA GPU that supports it, a
    CPU with AVX512-BF16 or AMX), otherwise off: emulated bf16 is slower than fp32."""
    if amp == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "off"
        return "bf16" if device.type == "cpu" and environment.cpu_has_native_bf16() else "off"
    if amp not in train_config.AMP_MODES:
        raise ValueError(f"amp must be one of {', '.join(train_config.AMP_MODES)}, got {amp!r}")
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


@dataclass(frozen=True)
class Compute:
    """Where and how batches run: the device, the resolved autocast mode (bf16, fp16 or
    off; :func:`resolve_amp`) and the memory format."""

    device: torch.device
    amp: str = "off"
    channels_last: bool = False


@torch.no_grad()
def forward_all(model: nn.Module, loader: DataLoader, compute: Compute, *, progress: bool = False,
                desc: str = "eval") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logits and labels of every dataset row, in dataset order, gathered over ranks.

    Returns ``(indices, logits float32, labels)`` covering each dataset index exactly once.
    """
    model.eval()
    indices = _sampler_indices(loader)
    logits_parts, label_parts = [], []
    for x, y in _progress(loader, progress, desc):
        x, y = _to_device(x, y, compute.device, compute.channels_last)
        with autocast(compute.device, compute.amp):
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


def evaluate(model: nn.Module, loader: DataLoader, criterion: Callable, compute: Compute, *,
             progress: bool = False, desc: str = "val") -> EvalResult:
    """Loss and metrics over the whole (possibly rank-sharded) dataset of ``loader``."""
    indices, logits, labels = forward_all(model, loader, compute, progress=progress, desc=desc)
    logits_t = torch.from_numpy(logits)
    if logits_t.shape[1] == 1:
        logits_t = logits_t.reshape(-1)
    with torch.no_grad():
        loss = float(criterion(logits_t, loss_targets(logits_t, torch.from_numpy(labels)))) if len(labels) else float("nan")
    probs = to_probs(logits_t).numpy()
    scores = metrics.compute_metrics(probs, labels)
    scores["loss"] = loss
    return EvalResult(loss=loss, probs=probs, labels=labels, indices=indices, metrics=scores)


def predict(model: nn.Module, loader: DataLoader, compute: Compute, *, progress: bool = False,
            desc: str = "predict") -> np.ndarray:
    """``[N, C]`` probabilities for every row of the loader's dataset, in dataset order."""
    _, logits, _ = forward_all(model, loader, compute, progress=progress, desc=desc)
    logits_t = torch.from_numpy(logits)
    return to_probs(logits_t.reshape(-1) if logits_t.shape[1] == 1 else logits_t).numpy()


@dataclass
class StepContext:
    """What an optimizer micro-step needs besides the model and the batch. Without a
    ``scaler`` the step runs unscaled (a disabled GradScaler)."""

    criterion: Callable
    optimizer: torch.optim.Optimizer
    compute: Compute
    scaler: torch.amp.GradScaler | None = None
    accum_steps: int = 1
    grad_clip: float | None = None

    def __post_init__(self) -> None:
        if self.scaler is None:
            self.scaler = torch.amp.GradScaler(self.compute.device.type, enabled=False)


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: StepContext, *,
               step_now: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One micro-step: forward, loss, backward of ``loss / accum_steps``; with ``step_now``
    also the (unscaled, clipped) optimizer step. Returns the loss and logits, detached."""
    optimizer, scaler = step.optimizer, step.scaler
    # DDP: skip the gradient all-reduce on accumulation micro-steps
    sync = model.no_sync() if (not step_now and hasattr(model, "no_sync")) else contextlib.nullcontext()
    with sync:
        with autocast(step.compute.device, step.compute.amp):
            logits = model(x)
            loss = step.criterion(logits, loss_targets(logits, y))
        scaler.scale(loss / step.accum_steps).backward()
    if step_now:
        if step.grad_clip:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), step.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach(), logits.detach()


@dataclass
class Display:
    """How a pass shows its progress: shown at all, under which label, and what to call once
    after the first few steps (:attr:`logs.Progress.on_first`, e.g. a duration estimate)."""

    progress: bool = False
    desc: str = "train"
    on_first: Callable[[logs.Progress], None] | None = None


def train_one_epoch(model: nn.Module, loader: DataLoader, step: StepContext, *, display: Display | None = None,
                    scalars: logs.ScalarLog | None = None) -> dict[str, float]:
    """One pass over ``loader``; returns loss, acc, f1, n, seconds, images_per_s (all ranks).
    ``scalars`` receives each step's loss (TensorBoard)."""
    display = display or Display()
    model.train()
    device, optimizer, accum_steps = step.compute.device, step.optimizer, step.accum_steps
    n_batches = len(loader)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    preds, labels = [], []
    num_classes = 2
    optimizer.zero_grad(set_to_none=True)
    start = time.perf_counter()
    bar = _progress(loader, display.progress, display.desc)
    bar.on_first, bar.first_steps = display.on_first, min(bar.first_steps, max(n_batches, 1))
    for i, (x, y) in enumerate(bar):
        x, y = _to_device(x, y, device, step.compute.channels_last)
        step_now = (i + 1) % accum_steps == 0 or i + 1 == n_batches
        loss, logits = train_step(model, x, y, step, step_now=step_now)
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
class Learner:
    """The model being trained and what updates it: the loss, the optimizer and its schedule."""

    model: nn.Module
    criterion: Callable
    optimizer: torch.optim.Optimizer
    scheduler: Any = None


@dataclass(frozen=True)
class Loaders:
    """The training and the validation loader of one run."""

    train: DataLoader
    val: DataLoader


@dataclass(frozen=True)
class CheckpointRecord:
    """What every checkpoint of one run records besides the weights, metrics and config: the
    model's :class:`models.ModelSpec`, the essential ``settings`` a resume must match (model,
    image size, classes, data) and further keys (``extra``: where the weights started, the
    test set, the age group...)."""

    spec: models.ModelSpec
    settings: Mapping[str, Any]
    extra: Mapping[str, Any] = field(default_factory=dict)


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


def _finished_result(files: RunFiles, settings: Mapping[str, Any], cfg: train_config.TrainConfig,
                     monitor_col: str) -> tuple[dict[str, Any] | None, bool]:
    """With --resume, a model already trained with these settings is not retrained: its
    result. Returns (that result or None, whether a finished model is being redone)."""
    if not (cfg.resume and files.best.exists()):
        return None, False
    finished = load_checkpoint(files.best)
    if not finished.get("finished"):
        return None, False
    diffs = settings_mismatch(finished.get("settings", {}), settings)
    if diffs and not cfg.force:
        raise _settings_error(files.best, diffs)
    if diffs:
        log(f"--force: {files.best} was trained with other settings ({'; '.join(diffs)}); starting over")
        return None, True
    log(f"{files.best}: already trained (best epoch {finished['epoch']}, {monitor_col} "
        f"{_fmt(finished['metrics'].get(monitor_col))}); not retraining")
    return _result(files, finished["epoch"], finished["metrics"], finished["epochs_run"], finished["stopped_early"],
                   finished["history"]), False


def _restore_last(files: RunFiles, settings: Mapping[str, Any], cfg: train_config.TrainConfig, learner: Learner,
                  state: TrainState, monitor_col: str) -> None:
    """Continue an unfinished run from its ``last`` file (only with --resume and the same
    essential settings): weights, optimizer, schedule, scaler, early stopping, history, RNGs."""
    if not files.last.exists():
        return
    saved = load_checkpoint(files.last)
    diffs = settings_mismatch(saved.get("settings", {}), settings)
    if not cfg.resume:
        log(f"Found an unfinished run in {files.last} (epoch {saved['epoch']}); starting over "
            f"(pass --resume to continue it)")
        return
    if diffs and not cfg.force:
        raise _settings_error(files.last, diffs)
    if diffs:
        log(f"--force: saved state in {files.last} has different settings ({'; '.join(diffs)}); starting over")
        return
    learner.model.load_state_dict(saved["model"])
    learner.optimizer.load_state_dict(saved["optimizer"])
    if learner.scheduler is not None and saved.get("scheduler") is not None:
        learner.scheduler.load_state_dict(saved["scheduler"])
    if saved.get("scaler"):
        state.scaler.load_state_dict(saved["scaler"])
    state.stopper.load_state_dict(saved["early_stopping"])
    state.history = list(saved["history"])
    state.best_metrics = dict(saved["best_metrics"])
    state.start_epoch = int(saved["epoch"]) + 1
    set_rng_state(saved["rng"])
    if distributed.get_rank():  # ranks must not share augmentation streams
        seed_everything(cfg.seed + 1000 * state.start_epoch + distributed.get_rank())
    log(f"Resuming from epoch {state.start_epoch} (state of epoch {saved['epoch']} in {files.last}; "
        f"best {monitor_col} so far {_fmt(state.stopper.best)} at epoch {state.stopper.best_epoch})")


def _wrap(model: nn.Module, device: torch.device, compile_model: bool) -> nn.Module:
    """The model as trained: DDP under torchrun, compiled if asked (checkpoints keep ``model``)."""
    if distributed.is_dist():
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(model) if compile_model else model


def _run_epoch(epoch: int, model: nn.Module, loaders: Loaders, step: StepContext, state: TrainState,
               progress: bool, epochs: int) -> tuple[dict[str, Any], EvalResult, dict[str, float]]:
    """Train one epoch (of ``epochs``) and validate: the history row, the validation result,
    the train stats."""
    t0 = time.perf_counter()
    for loader in (loaders.train, loaders.val):
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
    lr = step.optimizer.param_groups[0]["lr"]
    first = _eta_note(epochs - epoch + 1) if progress and epoch == state.start_epoch else None
    tr = train_one_epoch(model, loaders.train, step, display=Display(progress, f"epoch {epoch} train", first),
                         scalars=state.scalars)
    ev = evaluate(model, loaders.val, step.criterion, step.compute, progress=progress, desc=f"epoch {epoch} val")
    vm = ev.metrics
    row = {"epoch": epoch, "lr": lr, "train_loss": tr["loss"], "train_acc": tr["acc"], "train_f1": tr["f1"],
           "train_images": tr["n"], "val_loss": vm["loss"], "val_acc": vm["acc"], "val_f1": vm["f1"],
           "val_auroc": vm["auroc"], "seconds": time.perf_counter() - t0, "images_per_s": tr["images_per_s"]}
    return row, ev, tr


def _eta_note(epochs_left: int) -> Callable[[logs.Progress], None]:
    return lambda bar: log(logs.estimate_line(bar, epochs_left))


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
                vm: Mapping[str, Any], learner: Learner, state: TrainState) -> None:
    """The best checkpoint (if this epoch is it), the metrics CSV and the resumable ``last`` state."""
    if is_best:
        save_checkpoint(files.best, checkpoint(epoch, state.best_metrics, finished=False))
    _write_history(state.history, files.metrics_csv)
    save_checkpoint(files.last, checkpoint(
        epoch, vm, optimizer=learner.optimizer.state_dict(),
        scheduler=learner.scheduler.state_dict() if learner.scheduler is not None else None,
        scaler=state.scaler.state_dict(), early_stopping=state.stopper.state_dict(), rng=rng_state(),
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
            epochs_max: int) -> None:
    """Mark the best checkpoint finished (what --resume checks to not retrain) with the run's
    budget; the resumable state (optimizer etc., several times the model's size) goes."""
    if distributed.is_main():
        best = load_checkpoint(files.best)
        best.update(finished=True, epochs_run=epochs_run, stopped_early=stopped_early, history=history,
                    epochs_max=epochs_max, images_seen=images_seen(history))
        save_checkpoint(files.best, best)
        files.last.unlink(missing_ok=True)
    distributed.barrier()  # the best checkpoint exists for every rank after this


def fit(learner: Learner, loaders: Loaders, cfg: train_config.TrainConfig, device: torch.device,
        files: RunFiles, record: CheckpointRecord) -> dict[str, Any]:
    """Train with early stopping; save the best checkpoint and a resumable ``last`` state.

    ``cfg`` gives the epochs, the monitored metric, early stopping, precision, the resume
    switches and the run folder (TensorBoard). ``record`` goes into every checkpoint; its
    ``settings`` are the essential settings a resume must match: a mismatch raises
    :class:`ResumeError` naming them, unless ``cfg.force``, which starts over. Returns best
    epoch, its val metrics, epochs run, whether it stopped early, and the file paths.
    """
    if cfg.metric not in MONITORS:
        raise ValueError(f"unknown metric {cfg.metric!r} (known: {', '.join(MONITORS)})")
    monitor_col, mode = MONITORS[cfg.metric]
    settings = dict(record.settings)
    compute = Compute(device, resolve_amp(cfg.amp, device), cfg.channels_last)
    progress = not cfg.quiet and distributed.is_main()  # a bar on a terminal, else lines
    state = TrainState(EarlyStopping(cfg.patience, mode=mode, min_delta=cfg.min_delta),
                       torch.amp.GradScaler(device.type, enabled=compute.amp == "fp16"))
    raw = learner.model = learner.model.to(device)
    if cfg.channels_last:
        raw = learner.model = raw.to(memory_format=torch.channels_last)
    done, redo = _finished_result(files, settings, cfg, monitor_col)
    if done is not None:
        distributed.barrier()
        return done
    if not redo:
        _restore_last(files, settings, cfg, learner, state, monitor_col)
    train_model = _wrap(raw, device, cfg.compile)
    if distributed.is_main():
        state.scalars = logs.ScalarLog(columns.RunDir(cfg.out_dir).tensorboard_dir / files.best.stem)
        state.scalars.step = (state.start_epoch - 1) * len(loaders.train)
    step = StepContext(learner.criterion, learner.optimizer, compute, state.scaler, cfg.accum_steps, cfg.grad_clip)

    def checkpoint(epoch: int, scores: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
        return models.make_checkpoint(raw, record.spec, config=cfg, metrics=scores, epoch=epoch, **record.extra,
                                      settings=settings, monitor=cfg.metric, **extra)

    epoch = saved_epoch = state.start_epoch - 1
    stopped_early = state.stopper.should_stop  # stopped, but interrupted before the finished marker
    log(f"Training {record.spec.model_name} on {device} (amp {compute.amp}) for up to {cfg.epochs} epochs, "
        f"{len(loaders.train.dataset)} train / {len(loaders.val.dataset)} val images, best epoch by {monitor_col}")
    try:
        for epoch in range(cfg.epochs + 1 if stopped_early else state.start_epoch, cfg.epochs + 1):
            row, ev, tr = _run_epoch(epoch, train_model, loaders, step, state, progress, cfg.epochs)
            state.history.append(row)
            value = float(row[monitor_col])
            _step_scheduler(learner.scheduler, value)
            is_best = state.stopper.step(value, epoch)
            # every rank computed the same gathered metrics; rank 0's decision is the one
            stop = distributed.broadcast_object(state.stopper.should_stop and epoch < cfg.epochs)
            if is_best:
                state.best_metrics = _best_metrics(ev.metrics, tr)
            if distributed.is_main():  # saved before the epoch is reported: a Ctrl-C after its Val line keeps it
                _save_epoch(files, checkpoint, epoch, is_best, ev.metrics, learner, state)
            saved_epoch = epoch
            state.scalars.epoch(epoch, scalar_values(row))
            _log_epoch(epoch, row, ev, is_best, state.stopper, record.spec.class_names)
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
    _finish(files, epoch, stopped_early, state.history, cfg.epochs)
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
