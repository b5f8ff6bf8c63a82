"""Routed inference: the age classifier picks the fracture model of each image.

Shared by ``evaluate.py`` (stage 5) and ``predict.py`` (new images): loading the age
classifier and the per-group fracture models from a models directory, routing each image
to the fracture model of its predicted age group (hard) or mixing the group models by the
age classifier's probabilities (soft), test-time horizontal flip, and Grad-CAM.

Under ``torchrun`` every model's inference is sharded: each rank predicts its
``DistributedSampler`` share of the rows and ``engine.predict`` gathers them back, so every
rank gets the same probabilities, in row order, as a single process would.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import cv2
import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

import columns
import distributed
import engine
import environment
import errors
import image_io
import models
import recipe
import unified_dataset

ROUTINGS = ("hard", "soft")


def checkpoint_name(stem: str) -> str:
    """The best-checkpoint file name of a model stem (columns.AGE_MODEL, columns.fracture_model(role))."""
    return columns.model_files(stem)["best"]


def group_ckpt_name(group: int) -> str:
    return checkpoint_name(columns.fracture_model(columns.group_role(group)))


POOLED_CKPT = checkpoint_name(columns.fracture_model(columns.POOLED_ROLE))
# The pooled model trained further like the group models: routing's equal-budget control.
CONTROL_CKPT = checkpoint_name(columns.fracture_model(columns.CONTROL_ROLE))


# --------------------------------------------------------------------------- models
@dataclass
class LoadedModel:
    """A model in eval mode plus the preprocessing its checkpoint prescribes."""

    model: nn.Module
    name: str
    img_size: int
    mean: float
    std: float
    num_classes: int
    path: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    channels_last: bool = False  # the memory format it was trained in, and is run in


@dataclass
class RoutedModels:
    """The age classifier, the group fracture models that exist, the pooled model and, when it
    was trained, the pooled model continued with the group models' budget (``pooled_continued``)."""

    age: LoadedModel
    groups: dict[int, LoadedModel]
    pooled: LoadedModel | None
    age_bounds: tuple[float, ...]
    notes: list[str] = field(default_factory=list)
    pooled_continued: LoadedModel | None = None

    @property
    def n_groups(self) -> int:
        return len(self.age_bounds) + 1

    def model_for_group(self, g: int) -> LoadedModel:
        """The fracture model that serves age group ``g`` (pooled when ``g`` has none)."""
        if g in self.groups:
            return self.groups[g]
        if self.pooled is None:
            raise errors.CheckpointError(
                f"no fracture model for age group {g} ({group_ckpt_name(g)}) and no "
                f"{POOLED_CKPT} to fall back to")
        return self.pooled

    def served_by(self) -> dict[int, str]:
        return {g: self.model_for_group(g).name for g in range(self.n_groups)}


def _scalar(v: Any, default: float) -> float:
    if v is None:
        return default
    arr = np.asarray(v, dtype=float).reshape(-1)
    return float(arr.mean()) if arr.size else default


def load_model(path: str | os.PathLike, name: str, device: torch.device, kind: str,
               num_classes: int | Sequence[int] | None = None) -> LoadedModel:
    """Load a pipeline checkpoint of ``kind`` (age|fracture), check its class count, and
    build the model in eval mode on ``device``. Raises ``errors.CheckpointError``."""
    path = Path(path)
    ckpt = models.load_checkpoint(path, expect={"kind": kind})
    allowed = (num_classes,) if isinstance(num_classes, int) else num_classes
    nc = int(ckpt["num_classes"])
    if allowed is not None and nc not in allowed:
        raise errors.CheckpointError(
            f"{path}: checkpoint has {nc} classes, expected {' or '.join(map(str, allowed))} "
            f"for the {name} model")
    if int(ckpt.get("in_chans", 1)) != 1:
        raise errors.CheckpointError(f"{path}: in_chans {ckpt['in_chans']}, the pipeline feeds "
                                     "1-channel radiographs")
    model = models.build_from_checkpoint(ckpt, device=device, source=str(path))
    # Run in the memory format it was trained in: on the CPU channels_last pooling and
    # convolutions are several times faster, and the probabilities differ only in rounding.
    channels_last = bool((ckpt.get("config") or {}).get("channels_last"))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    meta = {k: v for k, v in ckpt.items() if k not in ("model", "optimizer", "scheduler", "scaler")}
    meta["weights_sha256"] = models.weights_sha256(ckpt["model"])
    return LoadedModel(model=model, name=name, img_size=int(ckpt["img_size"]),
                       mean=_scalar(ckpt.get("mean"), 0.5), std=_scalar(ckpt.get("std"), 0.25),
                       num_classes=nc, path=path, meta=meta, channels_last=channels_last)


def loaded_models(routed: RoutedModels) -> list[LoadedModel]:
    """Every loaded model: the age classifier, the group models, the pooled ones that exist."""
    return [lm for lm in (routed.age, *routed.groups.values(), routed.pooled, routed.pooled_continued) if lm]


def routing_models(routed: RoutedModels) -> list[LoadedModel]:
    """The models routing runs: the age classifier and the model serving each group."""
    serving = {id(m): m for m in (routed.model_for_group(g) for g in range(routed.n_groups))}
    return [routed.age, *serving.values()]


def weights_by_file(loaded: Sequence[LoadedModel]) -> dict[str, str | None]:
    """Checkpoint file name -> the digest of its weights (what a threshold was chosen for)."""
    return {lm.path.name: lm.meta.get("weights_sha256") for lm in loaded if lm.path is not None}


def changed_models(recorded: Mapping[str, Any], loaded: Sequence[LoadedModel]) -> list[str]:
    """The checkpoints among ``loaded`` whose weights differ from ``recorded`` (file name ->
    digest), or that it does not list."""
    now = weights_by_file(loaded)
    return [name for name, digest in now.items() if recorded.get(name) != digest]


def load_routed_models(models_dir: str | os.PathLike, device: torch.device,
                       require_pooled: bool = False) -> RoutedModels:
    """Load everything routing needs from ``models_dir``; say which group falls back."""
    models_dir = Path(models_dir)
    age_path = models_dir / checkpoint_name(columns.AGE_MODEL)
    if not age_path.exists():
        raise errors.CheckpointError(f"{age_path}: age classifier checkpoint not found "
                                     "(run train_age_classifier.py, or pass --models-dir)")
    age = load_model(age_path, columns.AGE_MODEL, device, "age")
    if not age.meta.get("age_bounds"):
        raise errors.CheckpointError(f"{age_path}: records no age bounds, so its groups are unknown; retrain it "
                                     "(train_age_classifier.py)")
    bounds = tuple(float(b) for b in age.meta["age_bounds"])
    n_groups = len(bounds) + 1
    if age.num_classes != n_groups:
        raise errors.CheckpointError(f"{age_path}: {age.num_classes} classes for {n_groups} age "
                                     f"groups (bounds {bounds})")
    groups: dict[int, LoadedModel] = {}
    notes: list[str] = []
    for g in range(n_groups):
        p = models_dir / group_ckpt_name(g)
        if p.exists():
            groups[g] = load_model(p, columns.group_role(g), device, "fracture", (1, 2))
            trained_for = groups[g].meta.get("age_group")
            if trained_for is not None and int(trained_for) != g:
                raise errors.CheckpointError(f"{p}: trained for age group {trained_for}, not {g}")
            gb = groups[g].meta.get("age_bounds")
            if gb is not None and tuple(float(b) for b in gb) != bounds:
                raise errors.CheckpointError(
                    f"{p}: age bounds {tuple(gb)} differ from the age classifier's {bounds}")
    pooled_path = models_dir / POOLED_CKPT
    pooled = (load_model(pooled_path, columns.POOLED_ROLE, device, "fracture", (1, 2))
              if pooled_path.exists() else None)
    if require_pooled and pooled is None:
        raise errors.CheckpointError(f"{pooled_path}: pooled fracture model not found "
                                     "(train_fracture_per_agegroup.py --pooled)")
    control_path = models_dir / CONTROL_CKPT
    control = (load_model(control_path, columns.CONTROL_ROLE, device, "fracture", (1, 2))
               if control_path.exists() else None)
    names = columns.age_group_names(bounds)
    for g in range(n_groups):
        if g not in groups:
            if pooled is None:
                raise errors.CheckpointError(
                    f"{models_dir / group_ckpt_name(g)}: no fracture model for age group "
                    f"{g} ({names[g]}) and no {POOLED_CKPT} to fall back to")
            notes.append(f"age group {g} ({names[g]}) has no model of its own "
                         f"({group_ckpt_name(g)} missing, e.g. skipped as too small): "
                         "its images go to the pooled model")
    loaded = [age, *groups.values(), pooled, control]
    note = environment.version_note({lm.path.name: lm.meta.get("versions") for lm in loaded if lm is not None})
    if note:
        notes.append(note)
    return RoutedModels(age=age, groups=groups, pooled=pooled, age_bounds=bounds, notes=notes,
                        pooled_continued=control)


# --------------------------------------------------------------------------- inference
class HFlipTTA(nn.Module):
    """Average the class probabilities of an image and its horizontal mirror.

    Returns logits whose sigmoid/softmax is that average, so any code that turns logits
    into probabilities (``engine.predict``, Grad-CAM targets) works unchanged.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 before averaging: under fp16 autocast the clamp and logit epsilons underflow
        a, b = self.model(x).float(), self.model(torch.flip(x, dims=[-1])).float()
        if a.ndim == 1 or a.shape[-1] == 1:
            p = (torch.sigmoid(a) + torch.sigmoid(b)) / 2
            return torch.logit(p, eps=1e-7)
        p = (torch.softmax(a, -1) + torch.softmax(b, -1)) / 2
        return torch.log(p.clamp_min(1e-12))


def fracture_prob(out: np.ndarray) -> np.ndarray:
    """The fracture probability from a binary model's output of shape (N,), (N,1) or (N,2)."""
    out = np.asarray(out, dtype=float)
    if out.ndim == 2 and out.shape[1] == 2:
        return out[:, 1]
    return out.reshape(-1)


def loader_for(lm: LoadedModel, df: pd.DataFrame, *, batch_size: int = 32,
               cache_dir: str | os.PathLike | None = None, feed: recipe.Feed = recipe.Feed()) -> DataLoader:
    """In-order loader over every row of ``df`` (labels -1) for :func:`engine.predict`, preparing
    images as ``lm``'s checkpoint prescribes (size, normalisation, the eval transform). Under
    torchrun (and ``feed.shard``) each rank gets its share, which :func:`engine.predict` gathers;
    workers do not persist (one pass)."""
    transform = unified_dataset.build_transforms(lm.img_size, train=False, mean=lm.mean, std=lm.std)
    ds = unified_dataset.WristDataset(df, None, transform, lm.img_size, cache_dir=cache_dir)
    return recipe.make_loader(ds, batch_size, train=False, feed=dataclasses.replace(feed, persistent=False))


def model_probs(lm: LoadedModel, df: pd.DataFrame, device: torch.device, tta: bool = False,
                amp: str = "off", **loader_kw: Any) -> np.ndarray:
    """Probabilities of ``lm`` on ``df``: (N, C) for the age model, (N,) for fracture models.
    The one way a checkpoint is run over a table (stage 3's predictions, evaluation, predict.py).

    ``amp``: off, bf16 or fp16 autocast (``engine.resolve_amp`` turns auto into one); the
    memory format is the checkpoint's (:func:`load_model`); ``loader_kw``: :func:`loader_for`'s
    batch size and cache, and ``workers``. Under torchrun every rank must call this with the
    same ``df``: the ranks share the work.
    """
    if len(df) == 0:
        return np.zeros((0, lm.num_classes)) if lm.num_classes > 2 else np.zeros(0)
    model = HFlipTTA(lm.model) if tta else lm.model
    feed = recipe.Feed(workers=loader_kw.pop("workers", 0), device=device)
    # rank 0 shows progress: a bar on a terminal, a line every 30 s in a log (logs.Progress)
    probs = np.asarray(engine.predict(model, loader_for(lm, df, feed=feed, **loader_kw),
                                      engine.Compute(device, amp, lm.channels_last), progress=distributed.is_main(),
                                      desc=f"{lm.name} on {len(df)} images"), float)
    if lm.num_classes > 2:
        return probs.reshape(len(df), lm.num_classes)
    return fracture_prob(probs)


def combine_routes(age_probs: np.ndarray, group_probs: np.ndarray, mode: str,
                   true_group: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fracture probability from per-group fracture probabilities.

    ``group_probs[i, g]``: probability that the model serving group g gives image i.
    hard: the predicted group's model; soft: the mix weighted by the age probabilities
    (a wrong call near the 8- and 15-year boundaries then costs less); oracle: the true
    group's model. Returns ``(prob, group_used)``; for soft, group_used is the argmax group.
    """
    age_probs, group_probs = np.asarray(age_probs, float), np.asarray(group_probs, float)
    pred = age_probs.argmax(1)
    rows = np.arange(len(pred))
    if mode == "hard":
        return group_probs[rows, pred], pred
    if mode == "soft":
        w = age_probs / age_probs.sum(1, keepdims=True)
        return (w * group_probs).sum(1), pred
    if mode == "oracle":
        if true_group is None:
            raise ValueError("oracle routing needs the true age groups")
        g = np.asarray(true_group, dtype=int)
        return group_probs[rows, g], g
    raise ValueError(f"unknown routing {mode!r} (hard|soft|oracle)")


def all_group_probs(routed: RoutedModels, df: pd.DataFrame, device: torch.device,
                    tta: bool = False, **loader_kw: Any) -> np.ndarray:
    """(N, n_groups): every group's serving model on every image (each model runs once)."""
    out = np.zeros((len(df), routed.n_groups))
    done: dict[int, np.ndarray] = {}
    for g in range(routed.n_groups):
        lm = routed.model_for_group(g)
        if id(lm) not in done:
            done[id(lm)] = model_probs(lm, df, device, tta, **loader_kw)
        out[:, g] = done[id(lm)]
    return out


def route(routed: RoutedModels, df: pd.DataFrame, device: torch.device, mode: str = "hard",
          tta: bool = False, **loader_kw: Any) -> pd.DataFrame:
    """Routed prediction for each row of ``df``.

    hard: the age classifier picks a group and only that group's model sees the image;
    soft: every group model sees every image and their probabilities are mixed.
    Returns a frame aligned with ``df``: age_group_label, age_group_prob_0..G-1,
    fracture_prob, fracture_model (which model decided; the argmax group's for soft) and, for
    soft, group_fracture_prob_0..G-1 (each group's model).
    ``loader_kw`` go on to :func:`model_probs` (``amp``, the loader's batch size, workers, cache).
    """
    age_probs = model_probs(routed.age, df, device, tta, **loader_kw)
    pred = age_probs.argmax(1) if len(df) else np.zeros(0, int)
    prob = np.zeros(len(df))
    if mode == "hard":
        for lm_id in {id(routed.model_for_group(g)) for g in np.unique(pred)}:
            gs = [g for g in np.unique(pred) if id(routed.model_for_group(g)) == lm_id]
            idx = np.flatnonzero(np.isin(pred, gs))
            prob[idx] = model_probs(routed.model_for_group(gs[0]), df.iloc[idx], device, tta,
                                    **loader_kw)
    elif mode == "soft":
        group_probs = all_group_probs(routed, df, device, tta, **loader_kw)
        prob, _ = combine_routes(age_probs, group_probs, "soft")
    else:
        raise ValueError(f"unknown routing {mode!r} (hard|soft)")
    out = pd.DataFrame({"age_group_label": pred.astype(int)}, index=df.index)
    for g in range(routed.n_groups):
        out[f"age_group_prob_{g}"] = age_probs[:, g] if len(df) else []
    out["fracture_prob"] = prob
    out["fracture_model"] = [routed.model_for_group(int(g)).name for g in pred]
    if mode == "soft":  # what was mixed, so that a calibration can be applied per model
        for g in range(routed.n_groups):
            out[f"group_fracture_prob_{g}"] = group_probs[:, g] if len(df) else []
    return out


# --------------------------------------------------------------------------- Grad-CAM
def nhwc_to_nchw(x: torch.Tensor) -> torch.Tensor:
    """timm 1.x Swin stages emit (B, H, W, C); Grad-CAM wants (B, C, H, W)."""
    return x.permute(0, 3, 1, 2)


def _is_swin(model: nn.Module) -> bool:
    return "swin" in type(model).__name__.lower()


def cam_target(model: nn.Module) -> tuple[nn.Module, Callable | None]:
    """The layer Grad-CAM looks at and the reshape it needs.

    Swin (timm 1.x): the last stage's last block's first norm, whose output is NHWC, hence
    a permute (not the (B, L, C) reshape of timm 0.4). CNNs: the last convolutional stage
    (timm's ``feature_info`` names it), else the last Conv2d.
    """
    inner = model.model if isinstance(model, HFlipTTA) else model
    if _is_swin(inner) and hasattr(inner, "layers"):
        return inner.layers[-1].blocks[-1].norm1, nhwc_to_nchw
    info = getattr(inner, "feature_info", None)
    if info is not None:
        try:
            name = info[-1]["module"] if isinstance(info, list) else info.module_name()[-1]
            return inner.get_submodule(name), None
        except (AttributeError, KeyError, IndexError):
            pass
    convs = [m for m in inner.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"{type(inner).__name__}: no convolutional layer for Grad-CAM")
    return convs[-1], None


def gradcam(model: nn.Module, images: torch.Tensor, target_index: int | None = None) -> np.ndarray:
    """Grad-CAM maps (B, H, W) in [0, 1] for the fracture output of ``model``.

    ``target_index``: the output unit to explain (default: 0 for a one-logit model, 1 (the
    fracture class) for a two-logit model).
    """
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    layer, reshape = cam_target(model)
    if target_index is None:
        with torch.no_grad():
            n_out = model(images[:1].to(next(model.parameters()).device)).reshape(1, -1).shape[1]
        target_index = 0 if n_out == 1 else 1
    with GradCAM(model=model, target_layers=[layer], reshape_transform=reshape) as cam:
        maps = cam(input_tensor=images,
                   targets=[ClassifierOutputTarget(target_index)] * images.shape[0])
    model.eval()
    return np.nan_to_num(np.asarray(maps, dtype=np.float32), nan=0.0, posinf=1.0, neginf=0.0)


def cam_examples(lm: LoadedModel, df: pd.DataFrame, device: torch.device,
                 tta: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(image, CAM) for each row of ``df`` explained by model ``lm``, both at the ORIGINAL
    image's resolution: the image in the display window the model sees (its 0.5/99.5
    percentile normalisation, ``image_io.read_image``), the CAM mapped back from the
    letterboxed model input (``image_io.unletterbox``). One row at a time, since
    full-size images add up."""
    if len(df) == 0:
        return
    loader = loader_for(lm, df, batch_size=8, feed=recipe.Feed(shard=False))
    model = HFlipTTA(lm.model) if tta else lm.model
    paths = iter(df["image_path"].astype(str))
    for x, _ in loader:
        for m in gradcam(model, x.to(device)):
            image = image_io.read_image(next(paths))
            yield image, image_io.unletterbox(m, image.shape)


def overlay_png_bytes(image: np.ndarray, cam: np.ndarray, lines: Sequence[str] = ()) -> bytes:
    """The CAM over the image (jet colour map, 40% opacity) at the image's size, with
    ``lines`` of text in its top-left corner, as PNG bytes."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    rgb = np.repeat(np.clip(image, 0, 1)[..., None], 3, axis=2).astype(np.float32)
    vis = np.ascontiguousarray(show_cam_on_image(rgb, np.clip(cam, 0, 1), use_rgb=False,
                                                 image_weight=0.6))  # BGR for OpenCV
    # text about 1/40 of the longer side high, whatever the resolution
    scale = max(0.35, max(vis.shape[:2]) / 1400)
    thick = max(1, round(2 * scale))
    y = 0
    for text in lines:
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
        y += th + base + 4 * thick
        cv2.rectangle(vis, (0, y - th - base - 2 * thick), (tw + 6 * thick, y + thick), (0, 0, 0), -1)
        cv2.putText(vis, text, (3 * thick, y - base), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thick,
                    cv2.LINE_AA)
    ok, buf = cv2.imencode(".png", vis)
    if not ok:
        raise RuntimeError("PNG encoding of the Grad-CAM overlay failed")
    return buf.tobytes()


# --------------------------------------------------------------------------- inputs
