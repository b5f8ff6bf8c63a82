"""Models by timm name, the tiny demo models, pretrained weights, and checkpoints.

Models
    :func:`create_model` builds any timm model by name (legacy timm-0.4 names such as
    ``swin_large_patch4_window12_384_in22k`` are mapped by :func:`resolve_model_name`).
    Importing this module also registers tiny demo models with timm, so they go through
    ``timm.create_model`` like any other:

    * ``swin_demo``: timm's ``SwinTransformer`` (embed 32, depths 2-2-2, heads 2-4-8) with a
      convolutional stem (two stride-2 3x3 conv-BN-GELU layers instead of the 4x4 patchify
      conv), because early convolutions help vision transformers trained from scratch on
      little data (Xiao et al., 2021, "Early Convolutions Help Transformers See Better").
    * ``swin_demo_patchify``: the same with Swin's own 4x4 patchify stem.
    * ``cnn_demo``: timm's ``ResNet`` with one ``BasicBlock`` per stage, widths 16-32-64-128.

    The demo Swins pick each stage's window as the largest size <= 8 that divides that
    stage's feature map for the requested ``img_size`` (a stage at most 8 wide attends
    globally). All three have fewer than 1M parameters.

Grayscale input
    Radiographs have one channel, so models are built with ``in_chans=1``. When RGB
    pretrained weights are loaded, timm sums the stem kernels over the three input channels
    (``timm.models.adapt_input_conv``). Because convolution is linear this gives exactly the
    output the RGB network gives for the gray image replicated into R, G and B, at a third
    of the stem's input memory and compute; normalisation is then one scalar ``mean``/``std``
    (stored in the checkpoint) instead of ImageNet's per-channel values.

Pretrained weights
    ``pretrained_file`` (safetensors, or a .pth/.bin state dict, or one of our checkpoints)
    is loaded by timm via ``pretrained_cfg_overlay=dict(file=...)``, which also adapts the
    stem to ``in_chans`` and drops a classifier of another size. Without a file, weights come
    from the local Hugging Face / torch hub cache, or else the hub; the hub is probed first
    (3 s) so an offline machine gets :class:`PretrainedWeightsError` saying how to provide
    the weights within seconds instead of minutes of download retries.

Checkpoints
    A plain dict readable with ``torch.load(weights_only=True)`` (no pickled classes, so
    loading never executes code): see :data:`CHECKPOINT_KEYS`. :func:`save_checkpoint`
    writes atomically and refuses values that a weights-only load would reject;
    :func:`load_checkpoint` and :func:`build_from_checkpoint` turn every problem (truncated
    file, foreign pickle, missing keys, another model or class count) into a one-line
    :class:`CheckpointError` naming the file.
"""
from __future__ import annotations

import collections
import difflib
import hashlib
import math
import os
import pickle
import re
import socket
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union
from urllib.parse import urlparse

import numpy as np
import timm
import torch
from timm.layers import PatchEmbed
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, ResNet
from timm.models.swin_transformer import SwinTransformer
from timm.models.swin_transformer import checkpoint_filter_fn as swin_checkpoint_filter_fn
from torch import nn

import environment
import train_config
from errors import CheckpointError, PretrainedWeightsError
from io_utils import atomic_path, to_jsonable

__all__ = [
    "CHECKPOINT_FORMAT_VERSION", "CHECKPOINT_KEYS", "CHECKPOINT_KINDS", "CheckpointError",
    "ModelSpec", "PretrainedWeightsError", "WeightsOptions", "build_from_checkpoint", "create_model",
    "load_checkpoint", "make_checkpoint", "model_state_dict", "resolve_model_name", "save_checkpoint", "to_jsonable",
]

PathLike = Union[str, os.PathLike]

CHECKPOINT_FORMAT_VERSION = 1
CHECKPOINT_KINDS = ("age", "fracture")
#: Keys every checkpoint has. Optional: ``model_kwargs`` (extra create_model kwargs needed to
#: rebuild the architecture) and, in resumable ``last`` files, optimizer/scheduler/... state.
CHECKPOINT_KEYS = (
    "model", "model_name", "num_classes", "class_names", "img_size", "in_chans", "mean", "std",
    "age_bounds", "config", "metrics", "epoch", "versions", "format_version", "kind",
)
_MODEL_KWARGS_KEY = "model_kwargs"


# --------------------------------------------------------------------------- demo models


class ConvStemPatchEmbed(PatchEmbed):
    """timm ``PatchEmbed`` whose patchify conv is a stack of stride-2 3x3 conv-BN-GELU layers.

    Same interface, grid and output as ``PatchEmbed`` (so ``SwinTransformer`` takes it as its
    ``embed_layer``); ``patch_size`` must be a power of two (one conv per factor of two).
    """

    def __init__(self, img_size=224, patch_size=4, in_chans=3, embed_dim=96, norm_layer=None,
                 device=None, dtype=None, **kwargs: Any) -> None:
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                         norm_layer=norm_layer, device=device, dtype=dtype, **kwargs)
        ph, pw = self.patch_size
        n_convs = int(math.log2(ph))
        if ph != pw or ph < 2 or 2 ** n_convs != ph:
            raise ValueError(f"conv stem needs a square power-of-two patch size, got {self.patch_size}")
        dd = {"device": device, "dtype": dtype}
        layers: list[nn.Module] = []
        ch = in_chans
        for i in range(n_convs):
            width = max(embed_dim // 2 ** (n_convs - 1 - i), 8)
            layers += [nn.Conv2d(ch, width, 3, stride=2, padding=1, bias=False, **dd),
                       nn.BatchNorm2d(width, **dd), nn.GELU()]
            ch = width
        layers.append(nn.Conv2d(ch, embed_dim, 1, **dd))
        self.proj = nn.Sequential(*layers)


def _demo_window_sizes(img_size: Any, patch_size: int, num_stages: int, max_window: int = 8) -> tuple:
    """Per stage, the largest window <= max_window that divides the stage's feature map."""
    h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if h % patch_size or w % patch_size:
        raise ValueError(f"img_size {img_size} is not a multiple of the patch size {patch_size}")
    sizes = []
    gh, gw = h // patch_size, w // patch_size
    for stage in range(num_stages):
        if stage > 0:  # Swin's patch merging halves the map (rounding up) from stage 1 on
            gh, gw = (gh + 1) // 2, (gw + 1) // 2
        sizes.append(tuple(max(d for d in range(1, min(g, max_window) + 1) if g % d == 0) for g in (gh, gw)))
    return tuple(sizes)


def _demo_cfg(**kwargs: Any) -> dict:
    # No weights exist for the demo models; the cfg tells timm's pretrained-file loader which
    # layers are the stem and the classifier, like the cfgs of real timm models do.
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 128, 128), "pool_size": None,
        "crop_pct": 1.0, "interpolation": "bilinear", "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25),
        "license": "apache-2.0", **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "swin_demo": _demo_cfg(first_conv="patch_embed.proj.0", classifier="head.fc", fixed_input_size=True),
    "swin_demo_patchify": _demo_cfg(first_conv="patch_embed.proj", classifier="head.fc", fixed_input_size=True),
    "cnn_demo": _demo_cfg(first_conv="conv1", classifier="fc"),
})


def _create_swin_demo(variant: str, pretrained: bool, conv_stem: bool, **kwargs: Any) -> SwinTransformer:
    img_size = kwargs.pop("img_size", 128)
    depths = kwargs.pop("depths", (2, 2, 2))
    patch_size = kwargs.pop("patch_size", 4)
    model_args = dict(
        img_size=img_size, patch_size=patch_size, embed_dim=32, depths=depths, num_heads=(2, 4, 8),
        window_size=_demo_window_sizes(img_size, patch_size, len(depths)), drop_path_rate=0.0,
    )
    if conv_stem:
        model_args["embed_layer"] = ConvStemPatchEmbed
    return build_model_with_cfg(
        SwinTransformer, variant, pretrained,
        pretrained_filter_fn=swin_checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=tuple(range(len(depths)))),
        **dict(model_args, **kwargs),
    )


@register_model
def swin_demo(pretrained: bool = False, **kwargs: Any) -> SwinTransformer:
    """Tiny Swin (embed 32, depths 2-2-2, heads 2-4-8) with a conv stem; for the CPU demo."""
    return _create_swin_demo("swin_demo", pretrained, conv_stem=True, **kwargs)


@register_model
def swin_demo_patchify(pretrained: bool = False, **kwargs: Any) -> SwinTransformer:
    """Tiny Swin as ``swin_demo`` but with Swin's own 4x4 patchify stem."""
    return _create_swin_demo("swin_demo_patchify", pretrained, conv_stem=False, **kwargs)


@register_model
def cnn_demo(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """Tiny ResNet (one BasicBlock per stage, widths 16-32-64-128); any input size."""
    model_args = dict(block=BasicBlock, layers=(1, 1, 1, 1), channels=(16, 32, 64, 128), stem_width=16)
    return build_model_with_cfg(ResNet, "cnn_demo", pretrained, **dict(model_args, **kwargs))


# --------------------------------------------------------------------------- model names


def resolve_model_name(name: str) -> str:
    """The current timm name for ``name``: legacy timm-0.4 names are mapped, unknown ones refused.

    ``swin_large_patch4_window12_384_in22k`` -> ``swin_large_patch4_window12_384.ms_in22k``
    (timm's own deprecation table). Current names, with or without a ``.tag``, are returned
    unchanged. Raises ``ValueError`` for an unknown architecture or pretrained tag.
    """
    name = str(name).strip()
    deprecated = timm.models.get_deprecated_models()
    if name in deprecated:
        current = deprecated[name]
        if current is None:
            raise ValueError(f"model {name!r} was removed from timm and has no replacement")
        return current
    arch, _, tag = name.partition(".")
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise ValueError(f"unknown model name {name!r}{hint}")
    if tag:
        try:
            timm.models.get_pretrained_cfg(name)
        except RuntimeError:
            tags = sorted(timm.list_pretrained(f"{arch}.*"))
            raise ValueError(f"unknown pretrained tag in {name!r}; known: {', '.join(tags) or 'none'}") from None
    return name


def _takes_img_size(name: str) -> bool:
    # timm marks models whose constructor fixes the input size (ViT, Swin) with
    # fixed_input_size; CNNs neither need nor accept img_size
    cfg = timm.models.get_pretrained_cfg(name)
    return bool(cfg is not None and cfg.fixed_input_size)


# --------------------------------------------------------------------------- pretrained weights

_PROBE_TIMEOUT_S = 3.0


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _probe(host: str, port: int, timeout: float = _PROBE_TIMEOUT_S) -> Optional[str]:
    """None if a TCP connection to host:port opens within ``timeout`` s, else why not.

    Runs in a daemon thread because the DNS lookup inside ``create_connection`` ignores the
    socket timeout and can hang for tens of seconds on a machine without a resolver.
    """
    result: list[Optional[str]] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except OSError as exc:
            result.append(f"cannot connect to {host}:{port} ({exc.strerror or exc})")

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return result[0] if result else f"no answer from {host}:{port} within {timeout:.0f} s"


def _weights_howto(name: str, cfg: Any) -> str:
    if cfg is not None and cfg.hf_hub_id:
        filename = cfg.hf_hub_filename or "model.safetensors"
        where = f"https://huggingface.co/{cfg.hf_hub_id.split('@')[0]} (file {filename})"
    elif cfg is not None and cfg.url:
        where = cfg.url
    else:
        where = "the model's source"
    return (
        f"Provide them in one of three ways: download the weights from {where} on a machine with internet "
        f"access and pass --pretrained-file PATH (safetensors, or a .pth/.bin state dict); or copy a Hugging Face "
        f"cache that holds them (~/.cache/huggingface/hub, or $HF_HOME) to this machine; or pass --no-pretrained "
        f"to train from random initialisation."
    )


def _hub_weights_overlay(name: str) -> Optional[dict]:
    """Where timm should take ``name``'s hub weights from, failing fast when they can't be had.

    Returns ``{"file": cached_path}`` when the weights are already in the local Hugging Face or
    torch hub cache (no network needed), ``None`` when the hub answers (timm downloads them).
    """
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not timm.models.is_model_pretrained(name):
        raise PretrainedWeightsError(
            f"timm has no pretrained weights for model {name!r}. Pass --pretrained-file PATH with weights of "
            f"this architecture, or --no-pretrained to train from random initialisation."
        )
    import huggingface_hub
    from huggingface_hub import constants as hf_constants

    if cfg.hf_hub_id and not cfg.custom_load:
        repo_id, _, revision = cfg.hf_hub_id.partition("@")
        filenames = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        for filename in filenames:
            cached = huggingface_hub.try_to_load_from_cache(
                repo_id, filename, cache_dir=hf_constants.HF_HUB_CACHE, revision=revision or None
            )
            if isinstance(cached, str) and os.path.isfile(cached):
                return {"file": cached}
    if cfg.url and not cfg.custom_load:
        cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(cfg.url).path))
        if os.path.isfile(cached):
            return {"file": cached}

    # timm prefers the hub when the cfg names a hub repo, else the plain URL
    endpoint = urlparse(hf_constants.ENDPOINT if cfg.hf_hub_id else cfg.url)
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    if cfg.hf_hub_id and (_env_flag("HF_HUB_OFFLINE") or hf_constants.HF_HUB_OFFLINE):
        reason = "HF_HUB_OFFLINE is set"
    else:
        reason = _probe(host, port)
    if reason:
        raise PretrainedWeightsError(
            f"Pretrained weights for {name!r} are not in the local cache and cannot be downloaded: {reason}. "
            + _weights_howto(name, cfg)
        )
    return None


@dataclass(frozen=True)
class WeightsOptions:
    """How weights start and run: pretrained (local cache or hub; fails fast offline) or from
    ``pretrained_file`` (implies pretrained), stochastic depth, activation checkpointing (timm
    ``set_grad_checkpointing``), fused attention (:func:`use_fused_attention`)."""

    pretrained: bool = False
    pretrained_file: Optional[PathLike] = None
    drop_path_rate: float = 0.0
    grad_checkpointing: bool = False
    fused_attn: bool = False


def create_model(name: str, num_classes: int, in_chans: int = 1, img_size: Optional[int] = None,
                 weights: WeightsOptions = WeightsOptions(), **kwargs: Any) -> nn.Module:
    """Build timm model ``name`` (legacy names accepted) for ``num_classes`` classes.

    Args:
        name: timm name, optionally with a pretrained tag (``swin_large_patch4_window12_384.ms_in22k``).
        in_chans: input channels; 1 for radiographs (RGB pretrained stems are summed, see module doc).
        img_size: input size for models that fix it (Swin, ViT); ignored by CNNs.
        weights: pretrained weights, stochastic depth, checkpointing, fused attention (:class:`WeightsOptions`).
        **kwargs: passed to the timm model constructor (e.g. ``device="meta"``).

    Raises:
        ValueError: unknown model name. PretrainedWeightsError: weights asked for but unavailable
        or not fitting the architecture.
    """
    pretrained, pretrained_file = weights.pretrained, weights.pretrained_file
    resolved = resolve_model_name(name)
    # drop_path_rate always passed: some timm constructors default to non-zero (Swin: 0.1)
    model_kwargs: dict[str, Any] = dict(
        num_classes=int(num_classes), in_chans=int(in_chans), drop_path_rate=float(weights.drop_path_rate), **kwargs
    )
    if img_size is not None and _takes_img_size(resolved):
        model_kwargs["img_size"] = int(img_size) if isinstance(img_size, (int, np.integer)) else tuple(img_size)

    overlay: Optional[dict] = None
    source = "the hub"
    if pretrained_file is not None:
        path = Path(pretrained_file)
        if not path.is_file():
            raise PretrainedWeightsError(f"{path}: pretrained weights file not found (--pretrained-file)")
        overlay = {"file": str(path)}
        source = str(path)
        pretrained = True
    elif pretrained:
        overlay = _hub_weights_overlay(resolved)
        if overlay:
            source = overlay["file"]

    if not pretrained:
        model = _timm_create(resolved, model_kwargs)
    else:
        try:
            model = _timm_create(resolved, model_kwargs, pretrained=True, pretrained_cfg_overlay=overlay)
        except Exception as exc:  # download, unpickling or shape errors: all mean "these weights don't work"
            detail = " ".join(str(exc).split())[:300] or type(exc).__name__
            raise PretrainedWeightsError(
                f"{source}: could not load pretrained weights for {resolved!r}: {type(exc).__name__}: {detail}. "
                + (_weights_howto(resolved, timm.models.get_pretrained_cfg(resolved)) if pretrained_file is None
                   else "Check that the file holds weights of this architecture.")
            ) from exc
        if overlay:
            _check_pretrained_coverage(model, overlay["file"], resolved)
    if weights.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if weights.fused_attn:
        use_fused_attention(model)
    return model


def use_fused_attention(model: nn.Module, enable: bool = True) -> int:
    """Route every timm attention block of ``model`` through ``F.scaled_dot_product_attention``.

    timm leaves it off for Swin's window attention (flagged experimental there): the
    relative-position bias, plus the shift mask, become SDPA's additive mask. It is the same
    function (tests compare outputs and the bias table's gradient). On an H100, Swin-L 384
    bf16 training runs 17% faster eager and 8% faster compiled, in a third less memory, and
    inference 38% faster (benchmarks/h100_swin_large_384_fused_attn.log); on the CPU it
    makes no measurable difference. The trainers' default (``--no-fused-attn`` turns it off).
    Returns the number of blocks switched (0 for CNNs).
    """
    blocks = [m for m in model.modules() if hasattr(m, "fused_attn")]
    for m in blocks:
        m.fused_attn = bool(enable)
    return len(blocks)


def _timm_create(name: str, model_kwargs: dict[str, Any], **pretrained_kwargs: Any) -> nn.Module:
    try:
        return timm.create_model(name, **pretrained_kwargs, **model_kwargs)
    except TypeError as exc:
        # the few timm constructors without stochastic depth reject the argument before any
        # weights are fetched; a zero rate can simply be left out
        if "drop_path_rate" not in str(exc) or model_kwargs.get("drop_path_rate"):
            raise
        kwargs = {k: v for k, v in model_kwargs.items() if k != "drop_path_rate"}
        return timm.create_model(name, **pretrained_kwargs, **kwargs)


def _check_pretrained_coverage(model: nn.Module, path: str, name: str, min_fraction: float = 0.5) -> None:
    """Refuse a weights file that left most of the model at random init.

    timm loads non-strictly whenever it drops a classifier of another size, so a file of a
    different architecture would otherwise be "loaded" without a word. A tensor counts as
    loaded when the file has it under the same name with the values the model now holds
    (stems adapted to in_chans and tables resized for img_size don't count, hence a fraction).
    """
    source = timm.models.load_state_dict(path)  # the same reader timm used
    classifiers = (timm.models.get_pretrained_cfg(name) or timm.models.PretrainedCfg()).classifier or ()
    classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
    target = {k: v for k, v in model.state_dict().items()
              if v.is_floating_point() and not any(k.startswith(c + ".") for c in classifiers)}
    total = sum(v.numel() for v in target.values())
    loaded = sum(
        v.numel() for k, v in target.items()
        if k in source and tuple(source[k].shape) == tuple(v.shape) and torch.equal(source[k].to(v.dtype), v)
    )
    if total and loaded < min_fraction * total:
        example = next(iter(source), "nothing")
        raise PretrainedWeightsError(
            f"{path}: only {100 * loaded / total:.0f}% of the weights of {name!r} were found in this file "
            f"(file keys look like {example!r}, the model's like {next(iter(target))!r}); it holds weights of "
            f"another architecture. Pass weights of {name!r}, or --no-pretrained."
        )


# --------------------------------------------------------------------------- checkpoints


_SAFE_SCALARS = (str, bytes, int, float, bool, complex, type(None))  # exact types: np.float64 is a float
_SAFE_OBJECTS = (torch.Tensor, torch.dtype, torch.device, torch.Size)


def _check_weights_only_safe(obj: Any, where: str) -> None:
    # Fails at save time, with the key path, for what torch.load(weights_only=True) would
    # refuse at load time (possibly hours later, on another machine)
    if type(obj) in _SAFE_SCALARS or isinstance(obj, _SAFE_OBJECTS):
        return
    if type(obj) in (dict, list, tuple, set, collections.OrderedDict):  # not defaultdict & co: refused
        items = obj.items() if isinstance(obj, dict) else enumerate(obj)
        for key, value in items:
            if isinstance(obj, dict) and type(key) not in _SAFE_SCALARS:
                raise TypeError(f"checkpoint{where}: key {key!r} of type {type(key).__name__} is not loadable "
                                f"with weights_only=True")
            _check_weights_only_safe(value, f"{where}[{key!r}]")
        return
    raise TypeError(f"checkpoint{where}: {type(obj).__module__}.{type(obj).__qualname__} is not loadable with "
                    f"weights_only=True; convert it with models.to_jsonable() or to a tensor")


def model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict on CPU, unwrapped from DDP/DataParallel and torch.compile.

    Tensors are copies, so a "best" state kept in memory does not follow later training.
    """
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            break
    state = model.state_dict()
    return {k: v.detach().clone() if v.device.type == "cpu" else v.detach().cpu() for k, v in state.items()}


def weights_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """A digest of a state dict's names, shapes, dtypes and values, independent of the memory
    format: which weights a model has, so a record of "started from" or "chosen for" these
    weights can be checked later. About 0.5 s for Swin-Large's 800 MB."""
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


@dataclass(frozen=True)
class ModelSpec:
    """A checkpoint's model besides the weights: architecture (``model_kwargs``: extra
    create_model kwargs to rebuild it), task, classes, expected input and age groups."""

    model_name: str
    kind: str
    class_names: Sequence[str]
    img_size: int
    mean: float | Sequence[float]
    std: float | Sequence[float]
    age_bounds: Sequence[float]
    in_chans: int = 1
    model_kwargs: Optional[Mapping[str, Any]] = None


def make_checkpoint(model: nn.Module | Mapping[str, torch.Tensor], spec: ModelSpec, *,
                    config: train_config.TrainConfig | Mapping[str, Any] | None = None,
                    metrics: Optional[Mapping[str, Any]] = None, epoch: int = 0, **extra: Any) -> dict[str, Any]:
    """A checkpoint dict with every key of :data:`CHECKPOINT_KEYS` (``num_classes`` from
    ``spec.class_names``); a :class:`train_config.TrainConfig` is recorded as its ``record()``.

    ``extra`` adds further keys, e.g. optimizer/scheduler/RNG state in a resumable ``last`` file.
    """
    config = config.record() if isinstance(config, train_config.TrainConfig) else config
    ckpt = {
        "model": model if isinstance(model, Mapping) else model_state_dict(model),
        "model_name": resolve_model_name(spec.model_name),
        "num_classes": len(spec.class_names),
        "class_names": [str(c) for c in spec.class_names],
        "img_size": spec.img_size,
        "in_chans": int(spec.in_chans),
        "mean": spec.mean,
        "std": spec.std,
        "age_bounds": spec.age_bounds,
        "config": {} if config is None else config,
        "metrics": dict(metrics or {}),
        "epoch": int(epoch),
        "versions": environment.versions(),
        "environment": {"lock": environment.lock_state(), "machine": environment.machine()},
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "kind": spec.kind,
    }
    if spec.model_kwargs:
        ckpt[_MODEL_KWARGS_KEY] = dict(spec.model_kwargs)
    ckpt.update(extra)
    return ckpt


def save_checkpoint(path: PathLike, ckpt: Mapping[str, Any]) -> Path:
    """Write ``ckpt`` atomically with ``torch.save``; returns ``path``.

    The metadata keys (config, metrics, class names, sizes, normalisation, versions,
    model_kwargs) are converted with :func:`to_jsonable`; ``model`` may be a module or a
    state dict. Raises ``ValueError`` for a missing key or a bad ``kind`` and ``TypeError``
    for a value ``torch.load(weights_only=True)`` could not read; nothing is written then.
    """
    ckpt = dict(ckpt)
    ckpt.setdefault("format_version", CHECKPOINT_FORMAT_VERSION)
    if "versions" not in ckpt:
        ckpt["versions"] = environment.versions()
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise ValueError(f"{path}: checkpoint lacks keys {', '.join(missing)}")
    if ckpt["kind"] not in CHECKPOINT_KINDS:
        raise ValueError(f"{path}: checkpoint kind must be one of {CHECKPOINT_KINDS}, got {ckpt['kind']!r}")
    if isinstance(ckpt["model"], nn.Module):
        ckpt["model"] = model_state_dict(ckpt["model"])
    for key in ("config", "metrics", "class_names", "img_size", "mean", "std", "age_bounds", "versions",
                "environment", _MODEL_KWARGS_KEY):
        if key in ckpt:
            ckpt[key] = to_jsonable(ckpt[key])
    ckpt["num_classes"] = int(ckpt["num_classes"])
    _check_weights_only_safe(ckpt, "")
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        # through a Python file object, so a full disk surfaces as the OSError (ENOSPC) that
        # atomic_path reports, not only as torch's "file write failed"
        torch.save(ckpt, fh)
    return Path(path)


def _first_line(exc: BaseException) -> str:
    return " ".join(str(exc).strip().splitlines()[:1])[:200] or type(exc).__name__


def _json_equal(a: Any, b: Any) -> bool:
    return to_jsonable(a) == to_jsonable(b)


def _canonical_name(name: Any) -> str:
    try:
        return resolve_model_name(str(name))
    except ValueError:
        return str(name)


def load_checkpoint(path: PathLike, expect: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """Load and validate a checkpoint written by :func:`save_checkpoint`.

    Uses ``torch.load(map_location="cpu", weights_only=True)``, so a foreign pickle is refused,
    never executed. ``expect`` maps checkpoint keys to required values (e.g.
    ``{"kind": "fracture", "num_classes": 2, "model_name": ..., "img_size": 384}``); model
    names are compared after :func:`resolve_model_name`, sequences by value.

    Raises:
        CheckpointError: one line, ``"<path>: <what is wrong>"``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f"the pickle references {found.group(1)}" if found else "the pickle holds arbitrary objects"
        raise CheckpointError(f"{path}: refused to load: {what}, but only tensors and plain data are allowed "
                              f"(torch.load weights_only=True); not a checkpoint written by this pipeline") from None
    except Exception as exc:  # whatever a damaged or foreign file makes torch.load raise: one line, no traceback
        size = path.stat().st_size
        zip_broken = "zip archive" in str(exc) or "central directory" in str(exc)
        if zip_broken or isinstance(exc, (EOFError, zipfile.BadZipFile)):
            why = "the file is truncated or not a PyTorch checkpoint (no valid zip archive)"
        else:
            why = f"cannot be read as a PyTorch checkpoint ({type(exc).__name__}: {_first_line(exc)})"
        raise CheckpointError(f"{path}: {why}; {size} bytes on disk") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: holds a {type(ckpt).__name__}, not a checkpoint dict")
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: not a checkpoint of this pipeline: missing keys {', '.join(missing)}")
    version = ckpt["format_version"]
    if not isinstance(version, int) or version > CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format_version {version!r} is newer than this code "
                              f"({CHECKPOINT_FORMAT_VERSION}); update the code")
    state = ckpt["model"]
    if not isinstance(state, dict) or not state or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(f"{path}: 'model' is not a non-empty state dict of tensors")
    if not isinstance(ckpt["num_classes"], int) or ckpt["num_classes"] < 1:
        raise CheckpointError(f"{path}: num_classes {ckpt['num_classes']!r} is not a positive integer")
    names = ckpt["class_names"]
    if not isinstance(names, (list, tuple)) or len(names) != ckpt["num_classes"]:
        raise CheckpointError(f"{path}: class_names {names!r} do not name {ckpt['num_classes']} classes")
    if ckpt["kind"] not in CHECKPOINT_KINDS:
        raise CheckpointError(f"{path}: kind {ckpt['kind']!r} is not one of {', '.join(CHECKPOINT_KINDS)}")
    for key, want in (expect or {}).items():
        if key not in ckpt:
            raise CheckpointError(f"{path}: has no {key!r} (expected {want!r})")
        have = ckpt[key]
        same = _canonical_name(have) == _canonical_name(want) if key == "model_name" else _json_equal(have, want)
        if not same:
            raise CheckpointError(f"{path}: {key} is {have!r}, expected {want!r}")
    return ckpt


def build_from_checkpoint(ckpt: Mapping[str, Any] | PathLike, device: str | torch.device = "cpu",
                          source: Optional[str] = None, fused_attn: bool = True) -> nn.Module:
    """The checkpoint's model with its weights, on ``device``, in eval mode.

    ``ckpt`` is a dict from :func:`load_checkpoint` or a path (then loaded here). ``source``
    names the file in messages when a dict is given. ``fused_attn``: see
    :func:`use_fused_attention` (the same function; Swin-L 384 inference on an H100 runs
    at 640 instead of 462 images/s). Raises :class:`CheckpointError` (one line)
    when the architecture cannot be built or the weights do not fit it.
    """
    if isinstance(ckpt, (str, os.PathLike)):
        source = source or str(ckpt)
        ckpt = load_checkpoint(ckpt)
    src = source or f"checkpoint of {ckpt.get('model_name', '?')!r}"
    name, num_classes = ckpt["model_name"], ckpt["num_classes"]
    img_size = ckpt.get("img_size")
    if isinstance(img_size, list):
        img_size = tuple(img_size)
    try:
        model = create_model(name, num_classes=num_classes, in_chans=ckpt.get("in_chans", 1), img_size=img_size,
                             weights=WeightsOptions(fused_attn=fused_attn), **dict(ckpt.get(_MODEL_KWARGS_KEY) or {}))
    except Exception as exc:
        raise CheckpointError(f"{src}: cannot build model {name!r}: {_first_line(exc)}") from None
    desc = f"{name} (num_classes={num_classes}, in_chans={ckpt.get('in_chans')}, img_size={img_size})"
    expected = model.state_dict()
    state = ckpt["model"]
    problems = [
        f"{k} has shape {list(v.shape)} in the file but {list(expected[k].shape)} in the model"
        for k, v in state.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing:
        problems.append(f"{len(missing)} weights missing (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected weights (e.g. {unexpected[0]})")
    if problems:
        more = f" (+{len(problems) - 2} more)" if len(problems) > 2 else ""
        raise CheckpointError(f"{src}: weights do not fit {desc}: {'; '.join(problems[:2])}{more}")
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()
