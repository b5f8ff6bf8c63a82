"""torch.distributed helpers for running the trainers and evaluation under ``torchrun``.

Single-process runs need nothing: without the ``RANK``/``WORLD_SIZE`` variables that
``torchrun`` sets, :func:`init_distributed` returns a one-process :class:`DistInfo` and
every helper here degrades to a no-op.

Under ``torchrun --nproc_per_node N`` each process trains on its shard of the data with
DistributedDataParallel (see ``engine.fit``), and:

* the class-balanced sampler becomes :class:`DistributedBalancedSampler`, which draws one
  weighted sample per epoch from a generator seeded identically on every rank and hands
  each rank an interleaved slice of it (``DistributedSampler`` semantics);
* validation uses ``DistributedSampler(shuffle=False)``; :func:`gather_rows` collects every
  rank's rows and drops the duplicates that sampler pads with, so metrics are computed over
  the whole validation set exactly once;
* only rank 0 writes files and logs (:func:`is_main`), and rank 0's early-stopping decision
  is broadcast so that all ranks leave the loop together (:func:`broadcast_object`).

Backend: NCCL when the process owns a CUDA device, gloo otherwise (the CPU test runs two
gloo processes).
"""
from __future__ import annotations

import contextlib
import datetime
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

import errors
from io_utils import RunLock

# Set by run_all_training.py for the torchrun processes it launches: the driver already
# holds the output directory's lock, which its children must not try to take again.
LOCK_HELD_ENV = "WRIST_RUN_LOCK_HELD"


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` picks CUDA (this process's local GPU) when available, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return device


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment, if any."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        # A rank that hangs (e.g. another rank died before a collective) should fail
        # within minutes, not the 30-minute default.
        kwargs: dict[str, Any] = {"timeout": datetime.timedelta(minutes=10)}
        if backend == "nccl":
            kwargs["device_id"] = dev
        dist.init_process_group(backend=backend, **kwargs)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    """True on rank 0 (and in single-process runs): the one process that writes and logs."""
    return get_rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group.

    The barrier first: a rank that destroys its gloo group while another is still in a
    collective makes the survivor abort (SIGABRT) instead of exiting cleanly.
    """
    if is_dist():
        dist.barrier()
        dist.destroy_process_group()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s value of ``obj`` on every rank (identity when not distributed)."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sum of small float vectors over all ranks."""
    if not is_dist():
        return list(values)
    backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(list(values), dtype=torch.float64, device=backend_device)
    dist.all_reduce(t)
    return t.cpu().tolist()


def gather_arrays(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """Concatenate each array over all ranks (rank order); identity when not distributed."""
    if not is_dist():
        return arrays
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, arrays)
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(len(arrays)))


def gather_rows(indices: np.ndarray, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """Collect per-rank rows, keyed by dataset index, into one de-duplicated set.

    Each rank passes the dataset indices it processed and arrays with one row per index.
    Returns ``(indices, *arrays)`` sorted by index with every index exactly once, on every
    rank; the duplicates that ``DistributedSampler`` pads the last ranks with are dropped.
    Single-process: the same de-duplication and ordering, without communication.
    """
    indices, *arrays = gather_arrays(indices, *arrays)
    _, first = np.unique(indices, return_index=True)  # np.unique sorts by index
    return (indices[first], *(a[first] for a in arrays))


def class_balanced_weights(labels: Sequence[int]) -> torch.Tensor:
    """Per-sample weight 1 / (count of its class): the weighting ImbalancedDatasetSampler uses."""
    labels_arr = np.asarray(labels)
    _, inverse, counts = np.unique(labels_arr, return_inverse=True, return_counts=True)
    return torch.as_tensor(1.0 / counts[inverse], dtype=torch.double)


class DistributedBalancedSampler(Sampler[int]):
    """Class-balanced sampling with replacement, sharded over ranks.

    Every rank draws the same ``total_size`` weighted indices from a generator seeded with
    ``seed + epoch`` and keeps ``indices[rank::world_size]``; together the ranks see one
    class-balanced epoch of ``len(labels)`` draws (rounded up to a multiple of the world
    size). Call :meth:`set_epoch` at the start of each epoch, as with DistributedSampler.
    """

    def __init__(
        self,
        labels: Sequence[int],
        num_replicas: int | None = None,
        rank: int | None = None,
        seed: int = 0,
        num_samples: int | None = None,
    ) -> None:
        self.weights = class_balanced_weights(labels)
        self.num_replicas = get_world_size() if num_replicas is None else num_replicas
        self.rank = get_rank() if rank is None else rank
        self.seed = seed
        self.epoch = 0
        total = len(self.weights) if num_samples is None else num_samples
        self.num_samples = math.ceil(total / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        draws = torch.multinomial(self.weights, self.total_size, replacement=True, generator=g)
        return iter(draws[self.rank : self.total_size : self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples


@contextlib.contextmanager
def session(device: str, lock_dir: str | os.PathLike) -> Iterator[DistInfo]:
    """What a training or evaluation script runs inside: the process group (if under torchrun), the
    output directory's lock (rank 0 only; skipped when a launching driver holds it),
    Ctrl-C as exit status 130 (SIGTERM 143), and a clean exit from the process group. The body may leave
    the group early with :func:`cleanup` (all ranks at once), e.g. to let rank 0 go on alone."""
    info = init_distributed(device)
    held = os.environ.get(LOCK_HELD_ENV) == str(Path(lock_dir).resolve())
    lock = RunLock(lock_dir) if info.is_main and not held else contextlib.nullcontext()
    ok = False
    try:
        with lock:
            yield info
        ok = True
    except KeyboardInterrupt as exc:
        raise SystemExit(errors.exit_status(exc)) from None
    finally:
        if is_dist():
            if ok:
                cleanup()
            else:  # other ranks may never reach a barrier now; just leave
                dist.destroy_process_group()
