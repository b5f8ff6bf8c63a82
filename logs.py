"""What a run tells its user while it works: progress and TensorBoard scalars.

:class:`Progress` wraps a loader for training and inference alike. On a terminal it is
tqdm's bar, as before. Without one (a cluster job writing to a log file, stdout piped) a bar
would print nothing readable, so it prints a line to stdout at least every
``PROGRESS_EVERY_S`` seconds (and every ``every_steps`` steps when asked):

    epoch 2 train: step 120/400 | loss 0.4213 | 35.2 img/s | ETA 0:02:15

so a log shows within half a minute that the run is alive and how long the pass will take.
Its :meth:`Progress.estimate` (seconds per step, seconds left) is there for notes that
project a whole run from its first steps.

:class:`ScalarLog` writes TensorBoard event files (``torch.utils.tensorboard``): per epoch
the losses, metrics, learning rate and images/s, per step the training loss. The per-step
losses are kept as tensors and read once per epoch, so logging them adds no device sync to
the training step. A ScalarLog without a folder (other ranks, or no run directory) does
nothing.
"""
from __future__ import annotations

import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, TextIO

import torch

PROGRESS_EVERY_S = 30.0
# On a terminal the bar's loss is refreshed every this many steps (reading it syncs the device).
BAR_LOSS_EVERY = 10


def on_terminal() -> bool:
    """Whether progress bars can be shown (tqdm draws them on stderr)."""
    return sys.stderr.isatty()


def format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def format_rate(images_per_s: float) -> str:
    """Throughput as ``12.3 img/s``, or as ``17.2 s/img`` below one image a second (Swin-L on
    a CPU), where a rate rounded to one decimal would read 0.0."""
    if not (math.isfinite(images_per_s) and images_per_s > 0):
        return "- img/s"
    return f"{images_per_s:.1f} img/s" if images_per_s >= 1 else f"{1 / images_per_s:.1f} s/img"


def _batch_images(item: Any) -> int:
    first = item[0] if isinstance(item, (tuple, list)) and item else item
    shape = getattr(first, "shape", None)
    return int(shape[0]) if shape else 1


class Progress:
    """Iterate over ``iterable`` showing progress: a tqdm bar on a terminal, else lines.

    ``enabled=False`` shows nothing. ``bar`` forces the mode (default: :func:`on_terminal`).
    ``on_first(progress)``, when given, is called once after the first ``first_steps``
    steps, e.g. to print an estimate of a whole run. Images are counted from the batches'
    first tensor (this process's share under torchrun).
    """

    def __init__(self, iterable: Iterable, desc: str, *, enabled: bool = True, bar: bool | None = None,
                 every_s: float | None = None, every_steps: int | None = None) -> None:
        self.iterable, self.desc, self.enabled = iterable, desc, enabled
        self.bar = on_terminal() if bar is None else bar
        self.every_s = PROGRESS_EVERY_S if every_s is None else every_s
        self.every_steps = every_steps
        self.stream: TextIO | None = None  # None: sys.stdout at the time of printing
        self.total = len(iterable) if hasattr(iterable, "__len__") else None
        self.steps = self.images = 0
        self.started = time.perf_counter()
        self.on_first: Callable[["Progress"], None] | None = None
        self.first_steps = 3
        self._loss: Any = None
        self._tqdm: Any = None
        self._last = self.started  # when the last line was printed
        self._lock = threading.Lock()

    def set_loss(self, loss: Any) -> None:
        """The latest loss (a tensor is read only when shown)."""
        self._loss = loss
        if self._tqdm is not None and self.steps % BAR_LOSS_EVERY == 0:
            self._tqdm.set_postfix(loss=f"{float(loss):.4f}")

    def estimate(self) -> tuple[float, float]:
        """(seconds per step so far, seconds left in this pass); NaN before the first step."""
        if not self.steps:
            return float("nan"), float("nan")
        per_step = (time.perf_counter() - self.started) / self.steps
        left = (self.total - self.steps) * per_step if self.total is not None else float("nan")
        return per_step, left

    def line(self) -> str:
        """The progress line as printed without a terminal."""
        elapsed = time.perf_counter() - self.started
        parts = [f"{self.desc}: step {self.steps}/{self.total if self.total is not None else '?'}"]
        if self._loss is not None:
            parts.append(f"loss {float(self._loss):.4f}")
        parts.append(format_rate(self.images / elapsed if elapsed > 0 else float("nan")))
        parts.append(f"ETA {format_seconds(self.estimate()[1])}")
        return " | ".join(parts)

    def _print(self) -> None:
        with self._lock:
            self._last = time.perf_counter()
            print(self.line(), file=self.stream or sys.stdout, flush=True)

    def __iter__(self) -> Iterator[Any]:
        self.started = time.perf_counter()
        lines = self.enabled and not self.bar
        source = self.iterable
        if self.enabled and self.bar:
            from tqdm.auto import tqdm

            source = self._tqdm = tqdm(self.iterable, desc=self.desc, leave=False, dynamic_ncols=True)
        self._last = self.started
        stop = threading.Event()
        heartbeat = threading.Thread(target=self._heartbeat, args=(stop,), daemon=True)
        if lines and self.every_s > 0:
            heartbeat.start()
        try:
            for item in source:
                yield item
                # here the consumer has finished the step and asks for the next batch
                self._done(item)
                now = time.perf_counter()
                due = now - self._last >= self.every_s or bool(self.every_steps and self.steps % self.every_steps == 0)
                if lines and due and (self.total is None or self.steps < self.total):
                    self._print()
        finally:
            stop.set()
            if heartbeat.is_alive():
                heartbeat.join()
            if self._tqdm is not None:
                self._tqdm.close()
                self._tqdm = None

    def _heartbeat(self, stop: threading.Event) -> None:
        # One step can outlast every_s (a batch of 64 through Swin-L 384 on a CPU takes
        # minutes); a line still comes every every_s, so a log without a terminal shows the
        # run is alive.
        while not stop.wait(self.every_s / 4):
            if time.perf_counter() - self._last >= self.every_s:
                self._print()

    def _done(self, item: Any) -> None:
        self.steps += 1
        self.images += _batch_images(item)
        if self.on_first is not None and self.steps == self.first_steps:
            self.on_first(self)


def estimate_line(bar: Progress, epochs_left: int) -> str:
    """The one line that projects a model's training from its first steps, so a slow run
    (Swin-L on a CPU: an epoch can take an hour) says early how long it will take."""
    per_step, _ = bar.estimate()
    epoch_s = per_step * (bar.total or bar.steps)
    return (f"estimate from the first {bar.steps} steps: {per_step:.2f} s per step, "
            f"{format_seconds(epoch_s)} per epoch's training, up to "
            f"{format_seconds(epoch_s * epochs_left)} for {epochs_left} epoch(s) (validation not included)")


class ScalarLog:
    """TensorBoard scalars of one model's training, in ``log_dir`` (None: nothing is written).

    ``step`` counts optimizer micro-steps over the whole run (set it when resuming)."""

    def __init__(self, log_dir: str | os.PathLike | None) -> None:
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.step = 0
        self._pending: list[tuple[int, torch.Tensor]] = []
        self._writer: Any = None
        if self.log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.log_dir))

    @property
    def enabled(self) -> bool:
        return self._writer is not None

    def step_loss(self, loss: torch.Tensor) -> None:
        """One training step's (detached) loss; written at the next :meth:`epoch`."""
        self.step += 1
        if self._writer is not None:
            self._pending.append((self.step, loss.detach().float().reshape(())))

    def epoch(self, epoch: int, values: Mapping[str, Any]) -> None:
        """Per-epoch scalars (``tag -> value``; None and NaN are left out), and the pending
        per-step losses."""
        if self._writer is None:
            return
        if self._pending:
            losses = torch.stack([t for _, t in self._pending]).cpu().tolist()
            for (step, _), value in zip(self._pending, losses):
                self._writer.add_scalar("train/step_loss", value, step)
            self._pending.clear()
        for tag, value in values.items():
            if value is not None and math.isfinite(float(value)):
                self._writer.add_scalar(tag, float(value), epoch)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
