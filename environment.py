"""The software and machine a run ran on, recorded with every output.

Package versions, Python, the lock's hash and whether the running environment was
installed from it, the CPU model and whether it computes bf16 natively, the GPU and the
thread counts. Manifests, checkpoints, ``metrics.json`` and the report carry it, so two
results can be told apart by what made them, and a checkpoint used under other versions
than it was trained with is noticed (``version_note``).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import os
import platform
import sys
from pathlib import Path
from typing import Any, Mapping

# The packages whose behaviour the outputs depend on: the phantom's pixels (numpy, OpenCV),
# decoding and augmentation, the models, the metrics, and the exported models' runtimes.
PACKAGES: tuple[str, ...] = (
    "torch", "torchvision", "timm", "albumentations", "albucore", "numpy", "opencv-python-headless",
    "pandas", "scikit-learn", "scipy", "pillow", "pydicom", "safetensors", "grad-cam",
    "torchsampler", "onnx", "onnxruntime",
)
# The lock lives beside the code; an installed copy of the code without it records None.
LOCK_PATH = Path(__file__).resolve().parent / "requirements.lock"
# `make install` writes the lock's sha256 here (the venv's stamp).
STAMP_NAME = ".installed"


def versions() -> dict[str, str]:
    """Python's version and each of ``PACKAGES`` that is installed."""
    out = {"python": platform.python_version()}
    for pkg in PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[pkg] = importlib.metadata.version(pkg)
    return out


def file_sha256(path: Path) -> str | None:
    """Hex sha256 of a file, or None when it cannot be read."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def lock_state(lock: Path = LOCK_PATH, prefix: str | os.PathLike = sys.prefix) -> dict[str, Any]:
    """The lock's hash, the hash the running venv was installed from (None outside a
    ``make`` venv) and whether they agree."""
    sha = file_sha256(lock)
    installed = None
    with contextlib.suppress(OSError):
        installed = (Path(prefix) / STAMP_NAME).read_text().strip() or None
    return {"sha256": sha, "installed_from": installed,
            "matches": sha is not None and installed == sha}


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 in hardware (AVX512-BF16 or AMX).

    Elsewhere oneDNN emulates bf16 convolutions, more slowly than fp32, so the demo then
    keeps ``auto`` (fp32 on the CPU, bf16 on a GPU that has it).
    """
    import torch

    probes = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    for probe in probes:
        with contextlib.suppress(Exception):
            if probe is not None and probe():
                return True
    return False


def machine() -> dict[str, Any]:
    """CPU, its bf16 path, GPUs and thread counts, as the running process sees them."""
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "gpus": [],
    }
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["cuda"] = torch.version.cuda
    return info


def describe() -> dict[str, Any]:
    """Everything above in one JSON-friendly dict: ``versions``, ``lock``, ``machine``."""
    return {"versions": versions(), "lock": lock_state(), "machine": machine()}


def version_differences(recorded: Mapping[str, Any], current: Mapping[str, str] | None = None) -> dict[str, tuple]:
    """``{package: (recorded, running)}`` for each package recorded with another version
    than the running one; packages missing on either side are left out."""
    current = versions() if current is None else current
    return {pkg: (str(old), current[pkg]) for pkg, old in recorded.items()
            if pkg in current and str(old) != current[pkg]}


def version_note(recorded: Mapping[str, Mapping[str, Any]]) -> str | None:
    """One line when any of ``{name: recorded versions}`` (checkpoints, say) was made under
    other versions than the running ones; None when all agree."""
    current = versions()
    moved: dict[str, tuple] = {}
    names = []
    for name, rec in recorded.items():
        diff = version_differences(rec or {}, current)
        if diff:
            names.append(name)
            moved.update(diff)
    if not moved:
        return None
    what = ", ".join(f"{pkg} {old} (now {new})" for pkg, (old, new) in sorted(moved.items()))
    return (f"{', '.join(names)} trained under other versions: {what}; "
            "results may differ slightly from the run that made them")
