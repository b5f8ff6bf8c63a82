"""The export folder: the trained system in forms that other tools read.

Layout (written by ``export.py``, read by ``predict.py``)::

    export/
      system.json                 routing, thresholds, calibration, preprocessing, versions, results
      MODEL_CARD.md
      <stem>/                     one folder per model (age_classifier, fracture_classifier_agegroup0, ...)
        config.json               timm's config (architecture, num_classes, in_chans, input size,
                                  mean/std, label_names) plus a "pipeline" section
        model.safetensors         the weights, as timm's save_for_hf writes them
        model.onnx                fixed image size, dynamic batch

Each model folder is what ``timm.create_model("local-dir:<folder>", pretrained=True)`` builds
(the demo architectures need ``import models`` first, which registers them with timm).
:class:`OnnxModel` runs a ``model.onnx`` with onnxruntime behind the ``nn.Module`` interface,
so routing, test-time flip and the loaders work unchanged with either backend.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import columns
import errors
import inference
import models

CONFIG_JSON = "config.json"
WEIGHTS = "model.safetensors"
ONNX_FILE = "model.onnx"
ONNX_INPUT = "image"
ONNX_OUTPUT = "logits"
ONNX_OPSET = 17
BACKENDS = ("torch", "onnxruntime")
# The preprocessing every input gets before any model sees it (image_io.read_image,
# letterbox, build_transforms); timm's own transforms do not reproduce the first three steps.
PREPROCESSING: tuple[str, ...] = (
    "read the image at its full bit depth (16-bit PNG, DICOM with its rescale and MONOCHROME1 inverted, "
    "8-bit PNG/JPEG), one channel",
    "percentile scaling: clip to the 0.5th and 99.5th percentile of the image and map that range to [0, 1]",
    "letterbox: resize the longer side to the input size keeping the aspect ratio (area interpolation "
    "when shrinking), pad the shorter side with 0 symmetrically to a square",
    "normalise: (x - mean) / std with the model's scalar mean and std",
    "tensor of shape (N, 1, S, S), float32",
)


def is_export_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / columns.SYSTEM_JSON).is_file()


def pipeline_meta(lm: inference.LoadedModel) -> dict[str, Any]:
    """What config.json's "pipeline" section says about one model (enough to serve it)."""
    meta = lm.meta
    return {"name": lm.name, "kind": meta.get("kind"), "class_names": list(meta.get("class_names") or []),
            "img_size": lm.img_size, "mean": lm.mean, "std": lm.std, "in_chans": 1,
            "age_bounds": list(meta["age_bounds"]) if meta.get("age_bounds") is not None else None,
            "age_group": meta.get("age_group"), "channels_last": lm.channels_last,
            "epoch": meta.get("epoch"), "source_checkpoint": lm.path.name if lm.path else None,
            "preprocessing": list(PREPROCESSING)}


def save_timm_folder(lm: inference.LoadedModel, folder: Path) -> Path:
    """``model.safetensors`` + ``config.json`` of ``lm`` via timm's ``save_for_hf``, written
    in a temporary folder beside ``folder`` and moved in file by file (each move atomic)."""
    from timm.models import save_for_hf

    folder.mkdir(parents=True, exist_ok=True)
    model = lm.model.to(memory_format=torch.contiguous_format)  # safetensors wants contiguous tensors
    size = (1, lm.img_size, lm.img_size)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        save_for_hf(model, str(tmp), safe_serialization=True,
                    model_config={"label_names": list(lm.meta.get("class_names") or []),
                                  "pipeline": pipeline_meta(lm)},
                    model_args=dict(lm.meta.get("model_kwargs") or {}) or None,
                    data_config={"input_size": size, "mean": (lm.mean,), "std": (lm.std,),
                                 "interpolation": "area", "crop_pct": 1.0})
        for name in (WEIGHTS, CONFIG_JSON):
            os.replace(tmp / name, folder / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if lm.channels_last:
        lm.model.to(memory_format=torch.channels_last)
    return folder


def export_onnx(model: nn.Module, path: Path, img_size: int, opset: int = ONNX_OPSET) -> Path:
    """``model`` as ONNX (TorchScript exporter): input ``image`` (N, 1, S, S), output ``logits``,
    the batch dimension dynamic. Written atomically."""
    from io_utils import atomic_path

    model = model.eval().to(memory_format=torch.contiguous_format)
    dummy = torch.zeros(2, 1, img_size, img_size)
    with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings():
        # The tracer warns that shape checks (Swin's window asserts) become constants: with a
        # fixed image size they are. The TorchScript exporter's own deprecation notice is
        # known; the parity check measures what it produced.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(model, (dummy,), str(tmp), input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT],
                          dynamic_axes={ONNX_INPUT: {0: "batch"}, ONNX_OUTPUT: {0: "batch"}},
                          opset_version=opset, dynamo=False, do_constant_folding=True)
    return path


class OnnxModel(nn.Module):
    """A ``model.onnx`` run by onnxruntime on the CPU, called like the PyTorch model
    (a float tensor in, a logits tensor out). It has no gradients, so no Grad-CAM."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        super().__init__()
        import onnxruntime as ort

        opts = ort.SessionOptions()
        # as many threads as torch uses, so that a comparison of the two backends is fair
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.inter_op_num_threads = 1
        self.path = Path(path)
        self.session = ort.InferenceSession(str(self.path), sess_options=opts, providers=["CPUExecutionProvider"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
        (out,) = self.session.run([ONNX_OUTPUT], {ONNX_INPUT: arr})
        return torch.from_numpy(out)


# --------------------------------------------------------------------------- reading
def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise errors.CheckpointError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from None


def load_exported_model(folder: Path, device: torch.device, backend: str = "torch") -> inference.LoadedModel:
    """One model folder of an export as :class:`inference.LoadedModel`: built by timm from
    ``local-dir:`` (``torch``) or ``model.onnx`` in onnxruntime (``onnxruntime``)."""
    import timm

    meta = dict(read_json(folder / CONFIG_JSON).get("pipeline") or {})
    if not meta:
        raise errors.CheckpointError(f"{folder / CONFIG_JSON}: no 'pipeline' section (not written by export.py)")
    if backend == "onnxruntime":
        if not (folder / ONNX_FILE).is_file():
            raise errors.CheckpointError(f"{folder / ONNX_FILE}: not found (export.py --no-onnx?)")
        model: nn.Module = OnnxModel(folder / ONNX_FILE)
        channels_last = False
    elif backend == "torch":
        try:
            model = timm.create_model(f"local-dir:{folder}", pretrained=True)
        except Exception as exc:  # a damaged or foreign folder: one line naming it
            raise errors.CheckpointError(f"{folder}: timm cannot build the model: {type(exc).__name__}: "
                                         f"{' '.join(str(exc).split())[:200]}") from None
        models.use_fused_attention(model)
        channels_last = bool(meta.get("channels_last"))
        model = model.to(device).eval()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
    else:
        raise ValueError(f"unknown backend {backend!r} ({', '.join(BACKENDS)})")
    return inference.LoadedModel(model=model, name=str(meta["name"]), img_size=int(meta["img_size"]),
                                 mean=float(meta["mean"]), std=float(meta["std"]),
                                 num_classes=len(meta["class_names"]), path=folder, meta=meta,
                                 channels_last=channels_last)


def load_routed_export(export_dir: str | os.PathLike, device: torch.device,
                       backend: str = "torch") -> tuple[inference.RoutedModels, dict[str, Any]]:
    """The routed system of an export folder, and its system.json."""
    export_dir = Path(export_dir)
    system = read_json(export_dir / columns.SYSTEM_JSON)
    folders = system["models"]

    def load(key: str) -> inference.LoadedModel | None:
        entry = folders.get(key)
        return load_exported_model(export_dir / entry["folder"], device, backend) if entry else None

    age = load(columns.AGE_MODEL)
    if age is None:
        raise errors.CheckpointError(f"{export_dir / columns.SYSTEM_JSON}: no age classifier")
    bounds = tuple(float(b) for b in system["age_bounds"])
    names = system.get("age_group_names")
    if names is not None and len(names) != len(bounds) + 1:
        raise errors.CheckpointError(f"{export_dir / columns.SYSTEM_JSON}: {len(names)} age group names for the "
                                     f"{len(bounds) + 1} groups of age_bounds {list(bounds)}")
    if age.num_classes != len(bounds) + 1:
        raise errors.CheckpointError(f"{age.path}: {age.num_classes} classes for the {len(bounds) + 1} age groups "
                                     f"of {columns.SYSTEM_JSON}'s age_bounds {list(bounds)}")
    groups = {g: lm for g in range(len(bounds) + 1) if (lm := load(columns.group_role(g))) is not None}
    routed = inference.RoutedModels(age=age, groups=groups, pooled=load(columns.POOLED_ROLE), age_bounds=bounds,
                                    pooled_continued=load(columns.CONTROL_ROLE))
    for lm in model_keys(routed).values():
        own = lm.meta.get("age_bounds")
        if own is not None and tuple(float(b) for b in own) != bounds:
            raise errors.CheckpointError(f"{lm.path}: trained with age bounds {list(own)}, but "
                                         f"{columns.SYSTEM_JSON} says {list(bounds)}; re-export the run (export.py)")
    for g in range(routed.n_groups):
        if g not in groups:
            routed.model_for_group(g)  # raises when there is no pooled model to serve it
            routed.notes.append(f"age group {g} has no model of its own: its images go to the pooled model")
    return routed, system


def probabilities(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    """(N, C) probabilities of ``model`` on a prepared batch (the engine's logits -> probabilities)."""
    import engine

    with torch.no_grad():
        out = model(x).float()
    return engine.to_probs(out.reshape(-1) if out.ndim == 1 or out.shape[1] == 1 else out).numpy()


def model_keys(routed: inference.RoutedModels) -> dict[str, inference.LoadedModel]:
    """Every model of the system by its key (age_classifier, agegroup{g}, pooled, pooled_continued)."""
    found = {columns.AGE_MODEL: routed.age, **{columns.group_role(g): lm for g, lm in routed.groups.items()}}
    for key in (columns.POOLED_ROLE, columns.CONTROL_ROLE):
        lm = getattr(routed, "pooled" if key == columns.POOLED_ROLE else "pooled_continued")
        if lm is not None:
            found[key] = lm
    return found


def folder_name(key: str) -> str:
    """The export folder of a model key: its checkpoint stem."""
    return key if key == columns.AGE_MODEL else columns.fracture_model(key)


