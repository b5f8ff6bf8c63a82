"""Two runs of the same command on the same machine give the same metrics.json.

What may differ between the two runs, and is set aside: the run directory's own paths
(each run writes into its own directory) and wall times. Everything else (every metric,
threshold, CI, calibration figure, budget and note) must be equal, number for number: the
splits, sampler, augmentations, weight initialisation and bootstrap are all seeded, and the
CPU kernels are deterministic at a fixed thread count (conftest's one thread).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import columns
import run_all_training

TIMING_KEYS = {"wall_time_s"}


def _run(data_csv: Path, out: Path) -> dict[str, Any]:
    argv = ["--data-csv", str(data_csv), "--out-dir", str(out), "--preset", "demo", "--img-size", "32",
            "--epochs", "1", "--batch-size", "16", "--min-rows", "3", "--n-boot", "30", "--quiet"]
    run_all_training.main(run_all_training.get_args_parser().parse_args(argv))
    text = (out / columns.METRICS_JSON).read_text()
    return json.loads(text.replace(str(out), "<run>"))


def _differences(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b))
        return [d for k in keys if k not in TIMING_KEYS
                for d in (_differences(a.get(k), b.get(k), f"{path}.{k}") if k in a and k in b else [f"{path}.{k}"])]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (u, v) in enumerate(zip(a, b)) for d in _differences(u, v, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {str(a)[:60]} != {str(b)[:60]}"]


def test_same_command_twice_gives_the_same_metrics(tiny_phantom: Path, tmp_path: Path) -> None:
    data_csv = tiny_phantom / columns.DATASET_CSV
    first, second = _run(data_csv, tmp_path / "a"), _run(data_csv, tmp_path / "b")
    assert first["systems"] and first["calibration"]
    assert _differences(first, second) == []
    # The comparison sees a real change: the same metrics with one figure moved differ.
    moved = json.loads(json.dumps(second))
    moved["systems"]["hard"]["overall"]["auroc"] = 1.0 - (moved["systems"]["hard"]["overall"]["auroc"] or 0.0)
    assert _differences(first, moved)
    # The environment is recorded, the lock's hash with it.
    env = first["environment"]
    assert env["versions"]["torch"] and env["lock"]["sha256"] and "cpu_native_bf16" in env["machine"]
