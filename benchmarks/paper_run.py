"""The paper preset end to end through the driver at a chosen size: one command, one log.

``run_all_training.py --preset paper`` as it is (Swin-L 384, the preset's workers, amp,
plateau scheduler, drop path, channels_last, fused attention, weights from a local file),
changed only in size. The defaults are the CPU proof: a 384 px phantom just large enough
for every age group in every split, one epoch, batch 2, one training seed
(``make paper-cpu``, ``tests/test_paper_cpu.py``). benchmarks/gpu_paper.sh runs it larger
on a GPU. A randomly initialised Swin-L in the ImageNet-22k file's layout (3 channels,
21,841 classes), saved as safetensors, stands in for that file, so the weights-from-a-file
path runs as it would with the real one.

The driver runs through stage 5 (age classifier, the three group models, the pooled model,
the evaluation and its report) as a child process with its output piped (no terminal:
progress comes as lines every 30 s). Its output goes into ``--log`` with a time stamp per
line, followed by per stage its wall time and peak resident memory (and GPU memory where
``nvidia-smi`` answers), and per model its seconds per training step and per validation
image; ``<out-dir>/paper_run.json`` holds the same. Stage 6 (ONNX export) is left out: five
0.8 GB Swin-L exports with their parity checks would double the CPU time and prove nothing
about training.

Stage 4 trains on the true age groups (``--group-column age_group``): a Swin-L trained for
an epoch or two from random weights routes nearly every image to one group, which would
leave the other group models without data.

    python benchmarks/paper_run.py --out-dir runs/paper_cpu --log benchmarks/paper_cpu.log
"""
from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import columns  # noqa: E402
import environment  # noqa: E402
import io_utils  # noqa: E402

MODEL = "swin_large_patch4_window12_384"
# The ImageNet-22k classifier's size: the stand-in file has the real file's shapes.
IN22K_CLASSES = 21841
STAGE_LINE = re.compile(r"^-- stage (\d) \(")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", type=Path, required=True, help="the run directory (the driver's --out-dir)")
    p.add_argument("--log", type=Path, default=None, help="the log [default: <out-dir>/paper_run.log]")
    p.add_argument("--weights", type=Path, default=None,
                   help="the stand-in pretrained file [default: <out-dir>/<model>_in22k_standin.safetensors]")
    # The smallest phantom found (of 12-24 patients, phantom seeds 0-5) in which every age
    # group has both classes in the training split and every group is in every split:
    # 28 training, 12 validation and 18 test images.
    p.add_argument("--phantom-patients", type=int, default=24)
    p.add_argument("--phantom-seed", type=int, default=1)
    p.add_argument("--test-frac", type=float, default=0.3)
    p.add_argument("--val-frac", type=float, default=0.3)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=2)
    # A quick dry run of the same path: --model swin_demo --img-size 64 (its stand-in weights too)
    p.add_argument("--model", default=MODEL, help="the timm model [default: the paper's Swin-L]")
    p.add_argument("--img-size", type=int, default=384, help="the training size [default: the paper's 384]")
    return p


def standin_weights(path: Path, model: str = MODEL) -> Path:
    """A randomly initialised ``model`` in the ImageNet-22k file's layout, as safetensors."""
    if path.is_file():
        return path
    import safetensors.torch
    import timm
    import torch

    import models  # noqa: F401 - registers the demo models with timm

    torch.manual_seed(0)
    net = timm.create_model(model, pretrained=False, num_classes=IN22K_CLASSES)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    safetensors.torch.save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp))
    tmp.replace(path)
    return path


def driver_argv(args: argparse.Namespace, weights: Path) -> list[str]:
    return [sys.executable, str(ROOT / "run_all_training.py"), "--preset", "paper", "--out-dir", str(args.out_dir),
            "--pretrained-file", str(weights), "--phantom-patients", str(args.phantom_patients),
            "--phantom-img-size", "384", "--phantom-seed", str(args.phantom_seed),
            "--test-frac", str(args.test_frac), "--val-frac", str(args.val_frac),
            "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--seeds", "1",
            "--min-rows", "1", "--group-column", "age_group", "--to-stage", "5"] + (
                [] if args.model == MODEL else ["--model", args.model]) + (
                [] if args.img_size == 384 else ["--img-size", str(args.img_size)])


def _rss_gb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def _gpu_used_gb() -> float | None:
    """Memory in use on the first GPU (nvidia-smi), None without one."""
    try:
        text = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=5).stdout
        return float(text.split()[0]) / 1024
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def run_driver(argv: Sequence[str], log: Any) -> tuple[int, dict[int, dict[str, float]], float]:
    """Run the driver, teeing its output into ``log``; returns its exit code, per stage
    {wall_s, peak_rss_gb} and the whole run's seconds. Memory is the driver process's
    resident set, sampled every second (DataLoader workers share its pages)."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    stages: dict[int, dict[str, float]] = {}
    current = [0]
    done = threading.Event()

    gpu = _gpu_used_gb() is not None

    def sample() -> None:
        while not done.wait(1.0):
            rss = _rss_gb(proc.pid)
            row = stages.setdefault(current[0], {"start": time.perf_counter(), "peak_rss_gb": 0.0})
            row["peak_rss_gb"] = max(row["peak_rss_gb"], rss)
            used = _gpu_used_gb() if gpu else None
            if used is not None:
                row["peak_gpu_gb"] = max(row.get("peak_gpu_gb", 0.0), used)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for line in proc.stdout:
        m = STAGE_LINE.match(line)
        if m:
            current[0] = int(m.group(1))
            stages.setdefault(current[0], {"start": time.perf_counter(), "peak_rss_gb": 0.0})
        stamp = time.strftime("%H:%M:%S")
        log.write(f"{stamp} {line}")
        log.flush()
        sys.stdout.write(f"{stamp} {line}")
        sys.stdout.flush()
    rc = proc.wait()
    done.set()
    sampler.join()
    end = time.perf_counter()
    ordered = sorted(k for k in stages if k)
    for k, nxt in zip(ordered, ordered[1:] + [None]):
        stages[k]["wall_s"] = (stages[nxt]["start"] if nxt else end) - stages[k]["start"]
    return rc, {k: {key: round(v[key], 2) for key in ("wall_s", "peak_rss_gb", "peak_gpu_gb") if key in v}
                for k, v in stages.items() if k}, end - started


def model_rates(out_dir: Path, batch_size: int) -> list[dict[str, Any]]:
    """Per trained model: images, seconds per training step and per validation image, from
    its per-epoch metrics CSV (train time = images / img/s; validation = the rest)."""
    run = columns.RunDir(out_dir)
    val = pd.read_csv(run.val_csv)
    rows = []
    for csv in sorted(run.models_dir.glob("*" + columns.HISTORY_SUFFIX)):
        stem = csv.name[: -len(columns.HISTORY_SUFFIX)]
        hist = pd.read_csv(csv)
        m = re.search(r"agegroup(\d+)", stem)
        n_val = int((val["age_group"] == int(m.group(1))).sum()) if m else len(val)
        train_images = float(hist["train_images"].sum())
        train_s = float((hist["train_images"] / hist["images_per_s"]).sum())
        steps = float(sum(math.ceil(n / batch_size) for n in hist["train_images"]))
        val_s = float(hist["seconds"].sum()) - train_s
        rows.append({"model": stem, "train_images": int(train_images), "val_images": n_val * len(hist),
                     "s_per_train_step": round(train_s / steps, 2) if steps else None,
                     "s_per_val_image": round(val_s / (n_val * len(hist)), 2) if n_val else None})
    return rows


def table(rows: Sequence[dict[str, Any]]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    cells = [[str(r.get(k, "-")) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    lines = [" | ".join(k.ljust(w) for k, w in zip(keys, widths)), "-|-".join("-" * w for w in widths)]
    lines += [" | ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def summary(rc: int, stages: dict[int, dict[str, float]], total_s: float, rates: list[dict[str, Any]]) -> str:
    names = {1: "split test set", 2: "split train/val", 3: "age classifier", 4: "fracture classifiers",
             5: "evaluation + report"}
    rows = [{"stage": f"{k} {names.get(k, '')}", **v} for k, v in sorted(stages.items())]
    peak = max((v["peak_rss_gb"] for v in stages.values()), default=0.0)
    out = ["", f"== paper preset: exit code {rc}, {total_s / 60:.1f} min, peak resident memory "
               f"{peak:.2f} GB ==", table(rows)]
    if rates:
        out += ["", table(rates)]
    return "\n".join(out)


def main(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log_path = args.log or out / "paper_run.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    weights = standin_weights(args.weights or out / f"{args.model}_in22k_standin.safetensors", args.model)
    weights_s = time.perf_counter() - t0
    argv = driver_argv(args, weights)
    with open(log_path, "w", encoding="utf-8") as log:
        mach = environment.machine()
        log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S %Z')}: {mach['cpu']}, {io_utils.default_workers()} cores, "
                  f"native bf16: {environment.cpu_has_native_bf16()}, torch {environment.versions().get('torch')}\n"
                  f"# stand-in weights {weights} ({weights.stat().st_size / 1e9:.2f} GB) in {weights_s:.0f} s\n"
                  f"$ {' '.join(argv[1:])}\n")
        rc, stages, total_s = run_driver(argv, log)
        # an interrupted or failed run still reports the models it finished
        rates = model_rates(out, args.batch_size) if columns.RunDir(out).val_csv.is_file() else []
        text = summary(rc, stages, total_s, rates)
        log.write(text + "\n")
    print(text, flush=True)
    result = {"rc": rc, "total_s": round(total_s, 1), "stages": stages, "models": rates, "log": str(log_path),
              "peak_rss_gb": max((v["peak_rss_gb"] for v in stages.values()), default=0.0)}
    io_utils.write_json(result, out / "paper_run.json")
    return result


if __name__ == "__main__":
    res = main(get_args_parser().parse_args())
    sys.exit(0 if res["rc"] == 0 else 1)
