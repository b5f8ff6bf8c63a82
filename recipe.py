"""The recipe both trainers use: one classifier's data loaders, loss, optimizer and
schedule built from a :class:`train_config.TrainConfig`, and handed to :func:`engine.fit`.

Both trainers (``train_age_classifier.py``, ``train_fracture_per_agegroup.py``) call
:func:`train_classifier`; what differs between them (the checkpoint kind, the target
column, the classes, the rows, the starting weights) is passed in (:class:`Task`,
:class:`Frames`, :class:`InitialWeights`). :func:`make_loader` also builds the in-order
loaders that run a checkpoint over a table (``inference.loader_for``).
"""
from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, SequentialSampler
from torchsampler import ImbalancedDatasetSampler

import columns
import config
import distributed
import engine
import losses
import models
import splits
import tables
import train_config
import unified_dataset
from errors import DataError


# --------------------------------------------------------------------------- loaders
def _seed_worker(worker_id: int) -> None:
    # albumentations draws from its own generators, which forked workers would all copy
    # unchanged: reseed them from the per-worker seed torch derives from its RNG
    info = torch.utils.data.get_worker_info()
    transform = getattr(info.dataset, "transform", None)
    if hasattr(transform, "set_random_seed"):
        transform.set_random_seed(info.seed % 2**32)


@dataclass(frozen=True)
class Feed:
    """How a loader fetches batches: worker processes, pinned memory when the device is a
    GPU, workers kept between epochs (``persistent``), and rows shared out over the ranks
    under torchrun (``shard``; False gives an evaluation loader every row on every rank,
    for work one rank does alone without gathering, such as Grad-CAM)."""

    workers: int = 0
    device: torch.device = torch.device("cpu")
    persistent: bool = True
    shard: bool = True


def make_loader(dataset: Dataset, batch_size: int, *, train: bool, sampler: str = "random", seed: int = 0,
                feed: Feed = Feed()) -> DataLoader:
    """DataLoader for training (``sampler`` balanced|random) or evaluation (in order).

    Under torchrun the samplers are the distributed ones (class-balanced:
    :class:`distributed.DistributedBalancedSampler`; evaluation: ``DistributedSampler``
    without shuffling, whose padding :func:`engine.forward_all` removes again).
    """
    dist_on = distributed.is_dist()
    workers, shard = feed.workers, feed.shard
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
        pin_memory=feed.device.type == "cuda", persistent_workers=feed.persistent and workers > 0,
        prefetch_factor=4 if workers > 0 else None, worker_init_fn=_seed_worker,
        # a last batch of one image breaks BatchNorm in training
        drop_last=train and len(s) > batch_size,
    )


# --------------------------------------------------------------------------- loss, optimizer, schedule
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
    return losses.FocalLoss(alpha=alpha, gamma=focal_gamma)


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


# --------------------------------------------------------------------------- one classifier from a config
def weights_origin(cfg: train_config.TrainConfig) -> dict[str, Any]:
    """Where a model's initial weights come from when no checkpoint is given."""
    if cfg.pretrained:
        return {"kind": "pretrained", "source": str(cfg.pretrained_file or models.resolve_model_name(cfg.model))}
    return {"kind": "random", "seed": int(cfg.seed)}


def frame_fingerprint(df: pd.DataFrame, columns: Sequence[str]) -> str:
    """Short identity of the rows a model trains on (for the resume check)."""
    digest = hashlib.sha256(df[list(columns)].to_csv(index=False).encode()).hexdigest()
    return f"{len(df)} rows, sha256 {digest[:16]}"


@dataclass(frozen=True)
class Task:
    """What one trainer trains: the checkpoint kind, the target column and its classes, the
    age groups (recorded in every checkpoint), a title for the log, and further keys its
    checkpoints record (``extra_meta``: the age group, the routing column...)."""

    kind: str
    target_col: str
    class_names: Sequence[str]
    age_bounds: Sequence[float]
    title: str = ""
    extra_meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Frames:
    """The training and validation rows of one model; ``checked``: :func:`tables.decode_pass` already
    ran on both at the config's image size."""

    train: pd.DataFrame
    val: pd.DataFrame
    checked: bool = False


@dataclass(frozen=True)
class InitialWeights:
    """A state dict of the same architecture to start from instead of the config's initial
    weights, and where it came from (stored as the checkpoint's ``init``, so a comparison of
    models can state each one's training budget)."""

    state: Mapping[str, torch.Tensor]
    origin: Mapping[str, Any]


def train_classifier(cfg: train_config.TrainConfig, task: Task, frames: Frames, files: engine.RunFiles,
                     device: torch.device, init: InitialWeights | None = None) -> dict[str, Any]:
    """Build data, model, loss, optimizer and schedule from ``cfg`` and :func:`engine.fit` them.
    Unless ``frames.checked``, every image is decoded first; with ``cfg.skip_bad`` the ones
    that fail are left out. Returns fit's result dict."""
    engine.seed_everything(cfg.seed + distributed.get_rank())
    class_names, target_col = task.class_names, task.target_col
    num_classes = len(class_names)
    train_df, val_df = frames.train, frames.val
    if not frames.checked:
        rejected = Path(cfg.out_dir) / columns.REJECTED_CSV
        progress = not cfg.quiet and sys.stderr.isatty()
        train_df, val_df = (tables.decode_pass(df, cfg.img_size, cache_dir=cfg.cache_dir, skip_bad=cfg.skip_bad,
                                        rejected_csv=rejected, progress=progress) for df in (train_df, val_df))
    datasets = {}
    for name, df, train in (("train", train_df, True), ("val", val_df, False)):
        transform = unified_dataset.build_transforms(cfg.img_size, train=train, mean=cfg.mean, std=cfg.std)
        ds = unified_dataset.WristDataset(df, target_col, transform, cfg.img_size, cache_dir=cfg.cache_dir)
        bad = [i for i, label in enumerate(ds.labels) if label >= num_classes]
        if bad:
            raise DataError.at(ds.source, ds.rows[bad[0]], f"{target_col} is {ds.labels[bad[0]]}, expected "
                                                           f"0..{num_classes - 1}")
        datasets[name] = ds
    feed = Feed(workers=cfg.workers, device=device)
    loaders = engine.Loaders(make_loader(datasets["train"], cfg.batch_size, train=True, sampler=cfg.sampler,
                                  seed=cfg.seed, feed=feed),
                      make_loader(datasets["val"], cfg.batch_size, train=False, seed=cfg.seed, feed=feed))
    model = models.create_model(cfg.model, num_classes=num_classes, in_chans=1, img_size=cfg.img_size,
                                weights=models.WeightsOptions(cfg.pretrained, cfg.pretrained_file, cfg.drop_path,
                                                              cfg.grad_checkpointing, cfg.fused_attn))
    if init is not None:
        model.load_state_dict(init.state)
    model = model.to(device)  # before the optimizer, which picks fused AdamW for CUDA parameters
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay)
    learner = engine.Learner(model, make_criterion(cfg.loss, num_classes, cfg.focal_alpha, cfg.focal_gamma), optimizer,
                      build_scheduler(optimizer, cfg.scheduler, cfg.epochs, warmup_epochs=cfg.warmup_epochs,
                                      mode=engine.MONITORS[cfg.metric][1]))
    spec = models.ModelSpec(model_name=cfg.model, kind=task.kind, class_names=list(class_names),
                            img_size=cfg.img_size, mean=cfg.mean, std=cfg.std, age_bounds=list(task.age_bounds))
    record = engine.CheckpointRecord(spec, settings={
        "model": models.resolve_model_name(cfg.model), "img_size": int(cfg.img_size), "classes": list(class_names),
        "train data": frame_fingerprint(train_df, ["image_path", target_col]),
        "val data": frame_fingerprint(val_df, ["image_path", target_col]),
    }, extra={"init": dict(init.origin) if init is not None else weights_origin(cfg),
              splits.TEST_SET_KEY: splits.recorded_test_sha256(cfg.test_csv), **dict(task.extra_meta)})
    if distributed.is_main():
        config.save_config(cfg.record(), files.config_json)
    n_params = sum(p.numel() for p in model.parameters())
    engine.log(f"== {task.title or files.best.stem}: {cfg.model} ({n_params / 1e6:.2f}M parameters), "
        f"{len(train_df)} train / {len(val_df)} val rows ==")
    note = cfg.note()
    if note:
        engine.log(note)
    return engine.fit(learner, loaders, cfg, device, files, record)
