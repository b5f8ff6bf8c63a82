"""Calibration parameters in one form, and the one function that applies them.

Stage 5 fits a calibration per model on validation; ``predict.py`` and the export folder
apply it to new images. Both go through :func:`apply_calibration`, so a probability in
``test_predictions.csv`` and the one ``predict.py`` gives for the same image agree to the
last bit.

The form, per model key (``age_classifier``, ``agegroup0..``, ``pooled``,
``pooled_continued``):

* binary fracture models: ``sigmoid(a * logit(p_raw) + b)``; temperature scaling is
  ``a = 1 / T, b = 0``, Platt scaling any ``a, b``;
* the age classifier: ``softmax(a * log(p_raw))``, i.e. ``softmax(logits / T)`` with
  ``a = 1 / T`` (``b`` is unused, since adding a constant to every class changes nothing).

``agegroup{g}`` is the model that serves age group g (the pooled model when the group has
none of its own), fitted on the validation images routed to g.

``calibration.json`` also records the checkpoints it was fitted for (file name, size,
sha256), so that a file left over from other weights is detected (:func:`stale_models`).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

import errors

AGE_KEY = "age_classifier"
# The same clipping as metrics' logit, so that an identity calibration (a=1, b=0) returns
# the probability it was given, up to rounding, away from 0 and 1.
_EPS = 1e-7


def from_temperatures(temperatures: Mapping[str, float], method: str) -> dict[str, Any]:
    """``{"method", "models": {key: {"a": 1/T, "b": 0}}}`` from one temperature per model key."""
    return {"method": method, "models": {k: {"a": 1.0 / float(t), "b": 0.0} for k, t in temperatures.items()}}


def calibration_params(result_calibration: Mapping[str, Any]) -> dict[str, Any]:
    """The common form from stage 5's ``metrics.json["calibration"]`` section: its
    ``params`` when it states them, else its per-model ``temperatures``."""
    if "params" in result_calibration:
        params = result_calibration["params"]
        models = params["models"] if "models" in params else params  # nested, or stage 5's {key: {a, b}}
        method = params.get("method", result_calibration.get("method", "")) if "models" in params \
            else result_calibration.get("method", "")
        out = {"method": str(method),
               "models": {k: {"a": float(v["a"]), "b": float(v.get("b", 0.0))} for k, v in models.items()}}
        if "chosen" in result_calibration:
            out["chosen"] = dict(result_calibration["chosen"])
        return out
    return from_temperatures(result_calibration["temperatures"], str(result_calibration.get("method", "")))


def logit(prob: Any) -> np.ndarray:
    """``log(p / (1 - p))``, with p clipped away from 0 and 1."""
    p = np.clip(np.asarray(prob, float), _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def apply_binary(prob: Any, ab: Mapping[str, float]) -> np.ndarray:
    """``sigmoid(a * logit(p) + b)``: one binary model's calibration map."""
    return 1.0 / (1.0 + np.exp(-(float(ab["a"]) * logit(prob) + float(ab.get("b", 0.0)))))


def apply_calibration(params: Mapping[str, Any], key: str, prob: Any) -> np.ndarray:
    """Calibrated probabilities of model ``key``: (N,) binary or (N, C) age probabilities in,
    the same shape out. A key without parameters is returned unchanged (as float)."""
    p = np.asarray(prob, float)
    ab = params.get("models", {}).get(key)
    if ab is None:
        return p
    if p.ndim == 2:
        z = float(ab["a"]) * np.log(np.clip(p, 1e-12, 1.0))
        z -= z.max(1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(1, keepdims=True)
    return apply_binary(p, ab)


# --------------------------------------------------------------------------- which weights
def file_digest(path: str | os.PathLike) -> dict[str, Any]:
    """Name, size and sha256 of a checkpoint: what a calibration was fitted for."""
    path = Path(path)
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return {"file": path.name, "size": path.stat().st_size, "sha256": h.hexdigest()}


def stale_models(params: Mapping[str, Any], checkpoints: Mapping[str, os.PathLike | str | None]) -> list[str]:
    """The model keys whose checkpoint differs from the one ``params`` was fitted for
    (``checkpoints``: model key -> current file, None when absent). Keys the file does not
    record are not judged."""
    recorded = params.get("checkpoints", {})
    stale = []
    for key, path in checkpoints.items():
        want = recorded.get(key)
        if want is None:
            continue
        if path is None or not Path(path).is_file():
            stale.append(f"{key} ({want['file']} missing)")
            continue
        p = Path(path)
        if p.stat().st_size != want["size"] or file_digest(p)["sha256"] != want["sha256"]:
            stale.append(f"{key} ({p.name} changed since the calibration was fitted)")
    return stale


def read_params(path: str | os.PathLike) -> dict[str, Any]:
    """``calibration.json`` as written by stage 5; ``DataError`` (one line) when unreadable."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        models = data["models"]
        for key, ab in models.items():
            float(ab["a"]), float(ab.get("b", 0.0))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise errors.DataError(f"{path}: not a calibration file written by evaluate.py "
                               f"({type(exc).__name__}: {exc})") from None
    return data
