"""Speed figures: input pipeline, training and inference throughput, FLOPs and MFU.

Inputs: flags only. A small phantom data set at a realistic size (16-bit PNGs whose long
side is ``--phantom-size``; real GRAZPEDWRI-DX images are about 500x750 to 1500x2000) is
generated into ``--work-dir`` (a temporary folder, removed afterwards, unless given).

Outputs: a table on stdout and JSON at ``--out`` (machine, config, library versions, one
entry per section, the speed targets with value/needed/met). The JSON is rewritten after
every section, so a run stopped from outside still leaves what it had measured.

Sections (``--sections``; default all, ``e2e`` only on CUDA):
  data   images/s of ONE worker (one process, cv2 and torch on one thread each, as one
         DataLoader worker) over ``WristDataset`` with the TRAIN augmentations: uncached
         (full-size 16-bit PNG decode + normalise + letterbox resize every time) versus
         cached (``ImageCache`` .npy), at ``--img-size`` and the paper's 384 px; plus the
         cache's disk use (uint16: 2 bytes x size^2 per image, 0.28 MiB at 384 px, about
         5.5 GiB for 20,000 images).
  flops  FLOPs per image of one forward pass and of one training step (forward+backward),
         counted by ``torch.utils.flop_counter.FlopCounterMode``, and the device's measured
         bf16 matrix-multiply rate (square ``--matmul-n`` products) that MFU is relative to.
  train  per variant: training images/s (forward + backward + AdamW step with the project's
         optimizer and focal loss, as in ``engine.train_one_epoch``, on a synthetic batch
         already on the device), peak memory (CUDA: ``max_memory_allocated``; CPU: the
         process's peak RSS, reset per variant where Linux allows), inference images/s,
         achieved TFLOP/s and MFU = achieved / measured bf16 matmul rate. On CUDA an
         out-of-memory batch is halved and retried (said in the note).
  e2e    end to end, ``recipe.make_loader`` with ``--workers`` workers feeding the training
         step: the baseline (fp32, contiguous, uncached images) against the fast path
         (``--fast-variant`` fed from the cache); the target is >= 3x.
  onnx   inference images/s on the CPU, PyTorch (fp32, fused attention as the trainers run it)
         against onnxruntime on the ONNX export of the same weights (``bundle.export_onnx``, as
         export.py writes it), with the same number of threads, at batch 1 and ``--batch-size``;
         plus the largest probability difference between the two. In ``auto`` on the CPU.
  stage1check  stage 1's image check on ``--check-files`` full-size 16-bit PNGs (the phantom's
         images at ``--phantom-size``, copied to that many files with their own rows in a
         GRAZPEDWRI-DX-style dataset.csv under ``<work-dir>/stage1check``, kept for the next
         run): ``age_split_testset.py`` itself runs twice, with the cheap check and with
         ``--decode-check``, each after the files were dropped from the page cache (as after a
         download that did not fit in memory); reported: the seconds stage 1 prints for its
         check, its threads, files/s, and stage 1's whole wall time. Not in ``auto``: it writes
         about 0.5-1 MB per file (20,000 files: 10-20 GB).
Each timing is the median over at least ``--steps`` calls and ``--min-time`` seconds after
``--warmup`` calls (data: the median per item), so other processes on a shared CPU
disturb it little.

A variant is ``+``-joined tokens: a precision (``fp32``, ``bf16`` autocast, ``fp16``
autocast with a GradScaler), ``cl`` (channels_last), ``compile`` (torch.compile), ``fa``
(attention through SDPA, the trainers' ``--fused-attn``) and ``foreach`` (AdamW's multi-kernel
version instead of the fused kernel the trainers use on CUDA), optionally ending in ``@N``
for a batch of N instead of ``--batch-size`` (``bf16+cl+compile@96``).
Compiled variants run last; a failure, or a compile still running after
``--compile-timeout`` s, is recorded as a note, not an error. A cold compile of the demo
model takes 1-2 minutes on 2 CPU cores, so the CPU default leaves it out.

Example (CPU, demo model; about 1.5 minutes on 2 shared cores):
    python benchmark.py --out runs/benchmark.json
Stage 1's image check on 20,000 full-size files (give a --work-dir with 20 GB free):
    python benchmark.py --sections stage1check --check-files 20000 --work-dir /data/bench \
        --out runs/stage1check.json
GPU (paper model):
    python benchmark.py --device cuda --model swin_large_patch4_window12_384 --img-size 384 \\
        --batch-size 32 --workers 12 --variants fp32,bf16,bf16+cl,bf16+cl+compile \\
        --out runs/bench_gpu.json
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import math
import os
import platform
import resource
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import cv2
import numpy as np
import pandas as pd
import torch

import bundle
import columns
import config
import environment
import engine
import io_utils
import models
import phantom
import recipe
import presets
import unified_dataset
from io_utils import write_json

PAPER_SIZE = 384
TARGETS = {
    "cached_speedup_384": 5.0,  # cached / uncached images/s at 384 px
    "cached_images_per_s_384": 100.0,  # per worker, train augmentations
    "bf16_mfu": 0.30,  # H100, Swin-L 384
    "e2e_speedup": 3.0,  # fast path / fp32 contiguous uncached baseline
}
PRECISIONS = ("fp32", "bf16", "fp16")
DEFAULT_VARIANTS = {"cuda": "fp32,bf16,bf16+cl,bf16+cl+compile", "cpu": "fp32,fp32+cl,bf16,bf16+cl"}


# ---------------------------------------------------------------------------------------
# small helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def parse_variant(spec: str) -> dict[str, Any]:
    """``"bf16+cl+compile@96"`` -> {"name", "precision", "channels_last", "compile",
    "fused_attn", "fused_opt", "batch"}; ``fused_opt`` None = the trainers' default and
    ``batch`` None = ``--batch-size``."""
    body, _, batch = spec.strip().lower().partition("@")
    tokens = [t.strip() for t in body.split("+") if t.strip()]
    out: dict[str, Any] = {"name": "+".join(tokens) + (f"@{batch}" if batch else ""), "precision": "fp32",
                           "channels_last": False, "compile": False, "fused_attn": False,
                           "fused_opt": None, "batch": None}
    if batch:
        if not batch.isdigit() or int(batch) < 1:
            raise ValueError(f"--variants: batch {batch!r} in {spec!r} is not a positive integer")
        out["batch"] = int(batch)
    for tok in tokens:
        if tok in PRECISIONS:
            out["precision"] = tok
        elif tok in ("cl", "channels_last"):
            out["channels_last"] = True
        elif tok in ("compile", "compiled"):
            out["compile"] = True
        elif tok in ("fa", "fused_attn"):
            out["fused_attn"] = True
        elif tok == "foreach":
            out["fused_opt"] = False
        else:
            raise ValueError(f"--variants: unknown token {tok!r} in {spec!r} "
                             f"(use {'/'.join(PRECISIONS)}, cl, compile, fa, foreach joined by '+', "
                             "optionally @BATCH)")
    return out


def _amp(precision: str) -> str:
    """The engine's amp mode of a benchmark precision."""
    return "off" if precision == "fp32" else precision


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    return engine.autocast(device, _amp(precision))


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return
    # Linux: writing 5 to clear_refs resets VmHWM, so each variant gets its own peak;
    # elsewhere the figure stays the process's lifetime peak (said in the JSON).
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")


def _peak_memory_mb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_memory_allocated"
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024, "peak_rss_since_reset"
    # ru_maxrss is KiB on Linux, bytes on macOS
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 1024), "process_peak_rss"


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    """One DataLoader worker's view: cv2 and torch on one thread each."""
    cv_threads, torch_threads = cv2.getNumThreads(), torch.get_num_threads()
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(cv_threads)
        torch.set_num_threads(torch_threads)


_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


class _Timeout(BaseException):
    """A BaseException, like KeyboardInterrupt, so that no ``except Exception`` inside
    torch.compile's tracer swallows it and carries on compiling."""


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise _Timeout after ``seconds`` (main thread, POSIX); no limit elsewhere or if <= 0."""
    usable = seconds > 0 and hasattr(signal, "SIGALRM") and _is_main_thread()
    if not usable:
        yield
        return

    def _raise(signum: int, frame: Any) -> None:
        raise _Timeout(f"gave up after {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": str(device),
        "platform": platform.platform(),
        "cpu": environment.cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                    tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    return info


# ---------------------------------------------------------------------------------------
# data pipeline


def make_phantom(work_dir: Path, n_patients: int, size: int, seed: int) -> pd.DataFrame:
    """Phantom images at a realistic full size, loaded through the normal loader path."""
    csv = phantom.generate_phantom(work_dir / "phantom", n_patients=n_patients, img_size=size,
                                   seed=seed, progress=False)
    df = unified_dataset.load_dataset(csv, Path(csv).parent / columns.IMAGES_DIR)
    if "fracture" not in df.columns or df.empty:
        raise RuntimeError(f"{csv}: phantom gave no usable rows")
    return df.reset_index(drop=True)


def _items_per_second(ds: torch.utils.data.Dataset, seconds: float, min_items: int) -> tuple[float, int]:
    """1 / median time per item: robust to other processes sharing the cores."""
    n = len(ds)
    ds[0]  # first-call costs (imports, allocator) are not a worker's steady state
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_items or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        ds[len(times) % n]
        times.append(time.perf_counter() - t0)
    return 1.0 / float(np.median(times)), len(times)


def _cache_bytes(cache_dir: Path) -> tuple[int, int]:
    files = [p for p in cache_dir.rglob("*.npy")]
    return sum(p.stat().st_size for p in files), len(files)


def bench_data(df: pd.DataFrame, sizes: list[int], work_dir: Path, seconds: float,
               min_items: int, mean: float, std: float, warm_workers: int) -> dict[str, Any]:
    rows, speedup, disk = [], {}, {}
    paths = df["image_path"].tolist()
    for size in sizes:
        tf = unified_dataset.build_transforms(size, train=True, mean=mean, std=std)
        cache_dir = work_dir / f"cache_{size}"
        t0 = time.perf_counter()
        unified_dataset.ImageCache(cache_dir, size).warm(paths, num_workers=warm_workers, progress=False)
        warm_s = time.perf_counter() - t0
        nbytes, nfiles = _cache_bytes(cache_dir)
        disk[str(size)] = {
            "mb_per_image": nbytes / max(nfiles, 1) / 2**20,
            "gb_per_20000_images": nbytes / max(nfiles, 1) * 20000 / 2**30,
            "warm_s": warm_s, "images": nfiles, "warm_workers": warm_workers,
        }
        rate = {}
        for mode, cdir in (("uncached", None), ("cached", cache_dir)):
            ds = unified_dataset.WristDataset(df, "fracture", tf, size, cache_dir=cdir)
            with _single_thread():
                ips, n = _items_per_second(ds, seconds, min_items)
            rate[mode] = ips
            rows.append({"img_size": size, "mode": mode, "images_per_s": ips,
                         "ms_per_image": 1000.0 / ips, "items_timed": n})
        speedup[str(size)] = rate["cached"] / rate["uncached"]
    return {"rows": rows, "cached_speedup": speedup, "cache_disk": disk,
            "full_size": _image_shape(paths[0])}


def _drop_from_page_cache(paths: list[Path]) -> bool:
    """Ask the kernel to forget the files' cached pages (no root needed), so the next read
    comes from the disk; False where the platform cannot."""
    if not hasattr(os, "posix_fadvise"):
        return False
    os.sync()  # dirty pages cannot be dropped
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def make_check_files(df: pd.DataFrame, n_files: int, folder: Path) -> tuple[Path, list[Path]]:
    """``n_files`` full-size files made from the phantom's images (real files, not links: each
    is read from disk) with one dataset.csv row each; reused when ``folder`` already holds them.
    Each copy differs from the others in two corner pixels: stage 1 refuses one image under two
    patients, pixel-identical copies included, when it decodes."""
    images = folder / columns.IMAGES_DIR
    csv = folder / columns.DATASET_CSV
    marker = folder / "files.json"
    src = [Path(p) for p in df["image_path"]]
    want = {"n_files": n_files, "sources": [p.name for p in src], "bytes": [p.stat().st_size for p in src],
            "distinct": True}
    meta = pd.read_csv(Path(df.attrs["source"]), encoding="utf-8-sig", dtype=str, keep_default_na=False)
    meta = meta.set_index("filestem").loc[[p.stem for p in src]].reset_index()
    paths = [images / f"{src[i % len(src)].stem}_{i:06d}.png" for i in range(n_files)]
    if marker.is_file() and json.loads(marker.read_text()) == want and csv.is_file():
        return csv, paths
    shutil.rmtree(folder, ignore_errors=True)
    images.mkdir(parents=True)
    originals = [cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in src]

    def write(i: int) -> None:
        img = originals[i % len(src)].copy()
        copy_round = i // len(src)
        img[0, 0], img[0, 1] = copy_round & 0xFFFF, copy_round >> 16
        ok, buf = cv2.imencode(".png", img)
        if not ok:
            raise OSError(f"{paths[i]}: PNG encoding failed")
        paths[i].write_bytes(buf.tobytes())

    unified_dataset.run_threaded(write, range(n_files), io_utils.default_workers(), lambda i, result: None,
                                 chunksize=16)
    rows = []
    for i, path in enumerate(paths):
        row = meta.iloc[i % len(src)].copy()
        row["filestem"] = path.stem
        row["patient_id"] = f"{row['patient_id']}{i // len(src):05d}"  # each copy round: new patients
        rows.append(row)
    pd.DataFrame(rows).to_csv(csv, index=False, encoding="utf-8-sig")
    write_json(want, marker)
    return csv, paths


def bench_stage1check(df: pd.DataFrame, n_files: int, work_dir: Path) -> dict[str, Any]:
    """Stage 1 (age_split_testset.main, in this process) on ``n_files`` full-size files,
    with the cheap image check and with --decode-check."""
    stage1 = importlib.import_module("age_split_testset")
    folder = work_dir / "stage1check"
    t0 = time.perf_counter()
    csv, paths = make_check_files(df, n_files, folder)
    out: dict[str, Any] = {"files": n_files, "distinct_images": len(df), "image": _image_shape(str(paths[0])),
                           "mb_per_file": sum(p.stat().st_size for p in paths[:200]) / min(200, n_files) / 2**20,
                           "prepare_s": time.perf_counter() - t0, "rows": []}
    for check, extra in (("cheap", []), ("decode", ["--decode-check"])):
        run_dir = folder / f"run_{check}"
        argv = ["--data-csv", str(csv), "--image-root", str(folder / columns.IMAGES_DIR), "--out-dir", str(run_dir),
                "--force", *extra]
        cold = _drop_from_page_cache(paths)
        print(f"[benchmark] stage 1, {check} image check on {n_files} files ...", flush=True)
        log = folder / f"stage1_{check}.log"
        t0 = time.perf_counter()
        with log.open("w") as fh, contextlib.redirect_stdout(fh):
            stage1.main(stage1.get_args_parser().parse_args(argv))
        wall = time.perf_counter() - t0
        ran = json.loads((run_dir / columns.TEST_MANIFEST).read_text())["image_check"]
        out["rows"].append({"check": check, "seconds": ran["seconds"], "threads": ran["threads"],
                            "files": ran["files"], "files_per_s": ran["files"] / max(ran["seconds"], 1e-9),
                            "stage1_wall_s": wall, "page_cache_dropped": cold, "log": str(log)})
    return out


def _image_shape(path: str) -> list[int]:
    img = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    return [int(img.shape[0]), int(img.shape[1]), int(img.dtype.itemsize * 8)] if img is not None else []


# ---------------------------------------------------------------------------------------
# model: FLOPs, matmul peak, training and inference


def _build_model(args: argparse.Namespace, device: torch.device, channels_last: bool,
                 fused_attn: bool = False) -> torch.nn.Module:
    torch.manual_seed(args.seed)
    model = models.create_model(args.model, num_classes=args.num_classes, in_chans=1,
                                img_size=args.img_size,
                                weights=models.WeightsOptions(grad_checkpointing=args.grad_checkpointing,
                                                              fused_attn=fused_attn))
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _batch(args: argparse.Namespace, device: torch.device, batch: int,
           channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(batch, 1, args.img_size, args.img_size, generator=g).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, max(args.num_classes, 2), (batch,), generator=g).to(device)
    return x, y


def _train_step_fn(model: torch.nn.Module, step_model: Callable, device: torch.device,
                   precision: str, num_classes: int, fused_opt: bool | None = None) -> Callable:
    """engine.train_step, the trainers' own, with the project's optimizer and focal loss."""
    criterion = recipe.make_criterion("focal", num_classes)
    opt = recipe.build_optimizer(model, lr=1e-5, weight_decay=0.05, fused=fused_opt)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    context = engine.StepContext(criterion, opt, engine.Compute(device, _amp(precision)), scaler)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        engine.train_step(step_model, x, y, context)

    return step


def _timed(fn: Callable[[], None], device: torch.device, warmup: int, steps: int,
           min_time: float) -> tuple[float, int, float, float]:
    """(median seconds per call, calls timed, seconds of the first call, median CPU seconds
    of this process per call).

    Each call is synchronised and timed alone; the median keeps a shared CPU's hiccups out.
    The CPU seconds (all threads of this process) count what a call costs even where other
    processes share the cores, but include the threads' spinning while they wait for each other.
    """
    t0 = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - t0
    for _ in range(max(warmup - 1, 0)):
        fn()
    _sync(device)
    times: list[float] = []
    cpu: list[float] = []
    start = time.perf_counter()
    while len(times) < max(steps, 1) or time.perf_counter() - start < min_time:
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return float(np.median(times)), len(times), first, float(np.median(cpu))


def count_flops(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """FLOPs per image (batch of 2, divided) for one forward and one training step."""
    from torch.utils.flop_counter import FlopCounterMode

    model = _build_model(args, device, channels_last=False)
    model.train()
    x, y = _batch(args, device, 2, channels_last=False)
    with FlopCounterMode(display=False) as fc:
        with torch.no_grad():
            model(x)
    fwd = fc.get_total_flops() / 2
    with FlopCounterMode(display=False) as fc:
        model(x).float().sum().backward()
    train = fc.get_total_flops() / 2
    params = sum(p.numel() for p in model.parameters())
    del model
    return {"forward_flops_per_image": float(fwd), "train_flops_per_image": float(train),
            "train_over_forward": float(train / fwd) if fwd else float("nan"),
            "params_m": params / 1e6}


def matmul_peak(device: torch.device, n: int, seconds: float) -> dict[str, float]:
    """Measured bf16 matmul rate (FLOP/s) on square n x n operands."""
    dtype = torch.bfloat16
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    per, reps, _, _ = _timed(lambda: torch.mm(a, b), device, warmup=3, steps=5, min_time=seconds)
    return {"matmul_n": n, "matmul_dtype": "bf16", "matmul_reps": reps,
            "peak_tflops": 2 * n**3 / per / 1e12}


def bench_variant(args: argparse.Namespace, device: torch.device, spec: dict[str, Any],
                  flops: dict[str, float] | None, peak_tflops: float | None) -> dict[str, Any]:
    """Train + inference speed of one variant; on CUDA OOM the batch is halved and retried."""
    batch = spec.get("batch") or args.batch_size
    notes: list[str] = []
    while True:
        try:
            row = _bench_variant_once(args, device, spec, batch)
            break
        except _OOM as exc:
            notes.append(f"OOM at batch {batch}")
            if batch <= 1:
                return {"variant": spec["name"], "batch_size": batch, "error": _first_line(exc),
                        "note": "; ".join(notes)}
            batch //= 2
        finally:
            _cleanup(device)
    row["note"] = "; ".join(notes + [row.pop("note", "")]).strip("; ")
    if flops and row.get("train_images_per_s"):
        achieved = flops["train_flops_per_image"] * row["train_images_per_s"]
        row["achieved_tflops"] = achieved / 1e12
        if peak_tflops:
            row["mfu"] = row["achieved_tflops"] / peak_tflops
    return row


def _cleanup(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _bench_variant_once(args: argparse.Namespace, device: torch.device, spec: dict[str, Any],
                        batch: int) -> dict[str, Any]:
    cl = spec["channels_last"]
    _cleanup(device)
    _reset_peak_memory(device)
    model = _build_model(args, device, cl, spec.get("fused_attn", False))
    model.train()
    step_model: Callable = model
    row: dict[str, Any] = {"variant": spec["name"], "batch_size": batch}
    if spec["compile"]:
        import torch._dynamo as dynamo

        dynamo.reset()
        step_model = torch.compile(model)
    step = _train_step_fn(model, step_model, device, spec["precision"], args.num_classes,
                          spec.get("fused_opt"))
    x, y = _batch(args, device, batch, cl)
    try:
        with _time_limit(args.compile_timeout if spec["compile"] else 0):
            per, n, first, cpu = _timed(lambda: step(x, y), device, args.warmup, args.steps, args.min_time)
    except _OOM:
        raise
    except (_Timeout, Exception) as exc:  # a failed compile is a result, not an error
        if not spec["compile"]:
            raise
        row.update(error=_first_line(exc), note="torch.compile failed or timed out; skipped")
        return row
    mem, mem_kind = _peak_memory_mb(device)
    row.update(train_images_per_s=batch / per, train_step_ms=per * 1000, steps_timed=n,
               first_step_s=first, peak_mem_mb=mem, mem_kind=mem_kind)
    if device.type == "cpu":
        row["train_images_per_cpu_s"] = batch / cpu if cpu > 0 else None
    if spec["compile"]:
        row["note"] = f"first step (compile) {first:.1f} s; inference not compiled, not timed"
        return row
    model.eval()
    with torch.inference_mode():
        per_inf, _, _, cpu_inf = _timed(lambda: _infer(model, x, device, spec["precision"]), device,
                                        args.warmup, args.steps, args.min_time)
    row["infer_images_per_s"] = batch / per_inf
    if device.type == "cpu":
        row["infer_images_per_cpu_s"] = batch / cpu_inf if cpu_inf > 0 else None
    return row


def _infer(model: torch.nn.Module, x: torch.Tensor, device: torch.device, precision: str) -> None:
    with _autocast(device, precision):
        model(x)


def bench_onnx(args: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    """Inference images/s on the CPU: the PyTorch model and its ONNX export in onnxruntime."""
    cpu = torch.device("cpu")
    model = _build_model(args, cpu, channels_last=False, fused_attn=True).eval()
    path = bundle.export_onnx(model, work_dir / "bench.onnx", args.img_size)
    ort = bundle.OnnxModel(path)
    rows, diffs = [], []
    for batch in sorted({1, args.batch_size}):
        x, _ = _batch(args, cpu, batch, channels_last=False)
        diffs.append(float(np.abs(bundle.probabilities(model, x) - bundle.probabilities(ort, x)).max()))
        for name, m in (("pytorch", model), ("onnxruntime", ort)):
            print(f"[benchmark] onnx: {name} at batch {batch} ...", flush=True)
            with torch.no_grad():
                per, _, _, cpu_s = _timed(lambda m=m: m(x), cpu, args.warmup, args.steps, args.min_time)
            rows.append({"backend": name, "batch_size": batch, "images_per_s": batch / per,
                         "images_per_cpu_s": batch / cpu_s if cpu_s > 0 else None})
    return {"rows": rows, "threads": torch.get_num_threads(), "opset": bundle.ONNX_OPSET,
            "onnx_mb": path.stat().st_size / 2**20, "max_abs_prob_diff": max(diffs)}


# ---------------------------------------------------------------------------------------
# end to end: DataLoader -> device -> training step


def bench_e2e(args: argparse.Namespace, device: torch.device, df: pd.DataFrame, spec: dict[str, Any],
              cache_dir: Path | None, batch: int) -> dict[str, Any]:
    """Images/s of the training loop fed by the project's own DataLoader (recipe.make_loader)."""
    cl = spec["channels_last"]
    total = args.warmup + args.steps
    # the phantom is a few dozen images: repeat its rows so that one epoch (one loader
    # start) covers every step and no epoch boundary drains the prefetch queue
    reps = math.ceil(batch * (total + 1) / len(df))
    rows = pd.concat([df] * reps, ignore_index=True)
    rows.attrs = dict(df.attrs)
    tf = unified_dataset.build_transforms(args.img_size, train=True, mean=args.mean, std=args.std)
    ds = unified_dataset.WristDataset(rows, "fracture", tf, args.img_size, cache_dir=cache_dir)
    loader = recipe.make_loader(ds, batch, train=True, sampler="random", seed=args.seed,
                                feed=recipe.Feed(workers=args.workers, device=device, persistent=False))
    _cleanup(device)
    model = _build_model(args, device, cl, spec.get("fused_attn", False))
    model.train()
    step = _train_step_fn(model, model, device, spec["precision"], args.num_classes,
                          spec.get("fused_opt"))
    t_start = time.perf_counter()
    t0, timed = None, 0
    for i, (x, y) in enumerate(loader):
        if i >= total:
            break
        x = x.to(device, non_blocking=True)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        step(x, y.to(device, non_blocking=True))
        if i + 1 == args.warmup:
            _sync(device)
            t0 = time.perf_counter()
        elif t0 is not None:
            timed += 1
    _sync(device)
    if t0 is None or timed == 0:  # warmup >= steps run: time everything
        t0, timed = t_start, i + 1
    elapsed = time.perf_counter() - t0
    del model, loader
    _cleanup(device)
    return {"variant": spec["name"], "loader": "cached" if cache_dir else "uncached",
            "workers": args.workers, "batch_size": batch, "steps_timed": timed,
            "images_per_s": batch * timed / elapsed, "startup_s": t0 - t_start}


# ---------------------------------------------------------------------------------------
# report


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"
    return str(v)


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_report(result: dict[str, Any]) -> str:
    m = result["machine"]
    where = m.get("gpu") or f"{m['cpu']} ({m['cpu_count']} cores)"
    out = [f"== benchmark on {where}; model {result['config']['model']} at "
           f"{result['config']['img_size']} px =="]
    data = result.get("data")
    if data:
        out.append(f"\nData pipeline, one worker, train augmentations (phantom "
                   f"{'x'.join(map(str, data['full_size'][:2]))} px, {data['full_size'][2:][0] if data['full_size'][2:] else '?'}-bit):")
        rows = []
        for r in data["rows"]:
            s = str(r["img_size"])
            rows.append([r["img_size"], r["mode"], r["images_per_s"], r["ms_per_image"],
                         data["cached_speedup"][s] if r["mode"] == "cached" else None,
                         data["cache_disk"][s]["gb_per_20000_images"] if r["mode"] == "cached" else None])
        out.append(_table(["size", "loader", "img/s", "ms/img", "speed-up", "cache GB/20k img"], rows))
    fl = result.get("flops")
    if fl:
        out.append(f"\nFLOPs/image: forward {_fmt(fl['forward_flops_per_image'] / 1e9)} G, "
                   f"training step {_fmt(fl['train_flops_per_image'] / 1e9)} G "
                   f"({fl['train_over_forward']:.2f}x); params {fl['params_m']:.1f} M; "
                   f"measured bf16 matmul peak {_fmt(fl.get('peak_tflops'))} TFLOP/s "
                   f"(n={fl.get('matmul_n')})")
    train = result.get("train")
    if train:
        out.append(f"\nTraining (synthetic batch on {m['device']}, {m['torch_threads']} torch threads):")
        rows = [[r["variant"], r["batch_size"], r.get("train_images_per_s"),
                 r.get("infer_images_per_s"), r.get("peak_mem_mb"), r.get("achieved_tflops"),
                 (100 * r["mfu"]) if r.get("mfu") is not None else None,
                 r.get("note") or r.get("error") or ""] for r in train]
        headers = ["variant", "batch", "train img/s", "infer img/s", "peak MB", "TFLOP/s", "MFU %", "note"]
        if m["device"] == "cpu":  # images per CPU-second: comparable on a shared machine
            for row, r in zip(rows, train):
                row[4:4] = [r.get("train_images_per_cpu_s"), r.get("infer_images_per_cpu_s")]
            headers[4:4] = ["train img/CPU-s", "infer img/CPU-s"]
        out.append(_table(headers, rows))
    e2e = result.get("e2e")
    if e2e:
        out.append("\nEnd to end (DataLoader -> training step):")
        rows = [[r["variant"], r["loader"], r["workers"], r["batch_size"], r["images_per_s"],
                 (100 * r["mfu"]) if r.get("mfu") is not None else None] for r in e2e["rows"]]
        out.append(_table(["variant", "loader", "workers", "batch", "img/s", "MFU %"], rows))
        out.append(f"speed-up fast / baseline: {e2e['speedup']:.2f}x")
    ox = result.get("onnx")
    if ox:
        out.append(f"\nInference on the CPU, PyTorch vs onnxruntime ({ox['threads']} threads, ONNX opset "
                   f"{ox['opset']}, {ox['onnx_mb']:.1f} MB; max |probability difference| "
                   f"{ox['max_abs_prob_diff']:.2g}):")
        out.append(_table(["backend", "batch", "img/s", "img/CPU-s"],
                          [[r["backend"], r["batch_size"], r["images_per_s"], r["images_per_cpu_s"]]
                           for r in ox["rows"]]))
    s1 = result.get("stage1check")
    if s1:
        out.append(f"\nStage 1 image check, {s1['files']} files of {'x'.join(map(str, s1['image'][:2]))} px "
                   f"{s1['image'][2] if len(s1['image']) > 2 else '?'}-bit ({s1['mb_per_file']:.2f} MB each, "
                   f"page cache {'dropped' if s1['rows'][0]['page_cache_dropped'] else 'NOT dropped'} before each):")
        rows = [[r["check"], r["threads"], r["seconds"], r["files_per_s"], r["stage1_wall_s"]] for r in s1["rows"]]
        out.append(_table(["check", "threads", "check s", "files/s", "stage 1 wall s"], rows))
    tg = result.get("targets")
    if tg:
        out.append("\nTargets:")
        out.append(_table(["target", "value", "needed", "met"],
                          [[k, v["value"], v["target"], v["met"]] for k, v in tg.items()]))
    out.append(f"\nwall time {result.get('wall_s', 0):.1f} s")
    return "\n".join(out)


def _targets(result: dict[str, Any]) -> dict[str, Any]:
    tg: dict[str, Any] = {}

    def put(key: str, value: float | None, note: str = "") -> None:
        if value is not None:
            tg[key] = {"value": value, "target": TARGETS[key], "met": bool(value >= TARGETS[key])}
            if note:
                tg[key]["note"] = note

    data = result.get("data") or {}
    if str(PAPER_SIZE) in data.get("cached_speedup", {}):
        put("cached_speedup_384", data["cached_speedup"][str(PAPER_SIZE)])
        cached = [r for r in data["rows"] if r["img_size"] == PAPER_SIZE and r["mode"] == "cached"]
        put("cached_images_per_s_384", cached[0]["images_per_s"])
    if result["machine"]["device"].startswith("cpu"):
        return tg  # the MFU and end-to-end targets are H100 targets
    for r in result.get("train") or []:
        if r.get("mfu") is not None and r["variant"].startswith("bf16"):
            put("bf16_mfu", max(r["mfu"], tg.get("bf16_mfu", {}).get("value", 0.0)),
                note=f"best bf16 variant on {result['machine'].get('gpu') or 'cpu'}")
    if result.get("e2e"):
        put("e2e_speedup", result["e2e"]["speedup"])
    return tg


# ---------------------------------------------------------------------------------------


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=add_help,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    demo = presets.PRESETS["demo"]
    p.add_argument("--model", default=demo["model"], help="models.create_model name; default: the demo preset's")
    p.add_argument("--img-size", type=int, default=demo["img_size"], help="model input size (square); default: the demo preset's")
    p.add_argument("--batch-size", type=int, default=16, help="training/inference batch")
    p.add_argument("--num-classes", type=int, default=2, help="classifier outputs")
    p.add_argument("--grad-checkpointing", action="store_true", help="timm gradient checkpointing")
    p.add_argument("--variants", default="auto",
                   help="comma list of '+'-joined tokens fp32|bf16|fp16, cl, compile, fa, foreach, "
                        "each optionally @BATCH; auto: "
                        f"{DEFAULT_VARIANTS['cuda']} on CUDA, {DEFAULT_VARIANTS['cpu']} on the CPU "
                        "(a cold torch.compile takes about 2 min on 2 cores)")
    p.add_argument("--sections", default="auto",
                   help="comma list of data,flops,train,e2e,stage1check; auto = data,flops,train, "
                        "and e2e on CUDA")
    p.add_argument("--check-files", type=int, default=300,
                   help="stage1check: full-size files stage 1 checks (each a copy of a phantom image)")
    p.add_argument("--data-sizes", default="auto",
                   help=f"comma list of sizes for the data section; auto: --img-size and {PAPER_SIZE}")
    p.add_argument("--fast-variant", default="bf16+cl",
                   help="e2e fast path (fed from the cache); 'best': the fastest uncompiled variant "
                        "of the train section")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per measurement")
    p.add_argument("--steps", type=int, default=6, help="timed steps per measurement (at least)")
    p.add_argument("--min-time", type=float, default=1.0, help="timed seconds per measurement (at least)")
    p.add_argument("--data-seconds", type=float, default=2.0, help="seconds per data measurement")
    p.add_argument("--compile-timeout", type=float, default=120.0,
                   help="give up a compile variant after this many seconds (0 = no limit)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (torch.set_num_threads) [default: torch's, one per core]")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="DataLoader workers in e2e (and for warming the cache)")
    p.add_argument("--phantom-patients", type=int, default=12, help="phantom patients (about 3.3 images each)")
    p.add_argument("--phantom-size", type=int, default=1024, help="phantom image long side (px)")
    p.add_argument("--matmul-n", type=int, default=0, help="matmul size for the peak (0: 8192 on CUDA, 1024 on CPU)")
    p.add_argument("--mean", type=float, default=demo["mean"], help="normalisation mean")
    p.add_argument("--std", type=float, default=demo["std"], help="normalisation std")
    p.add_argument("--seed", type=int, default=0, help="seed of phantom, weights and batches")
    p.add_argument("--quick", action="store_true",
                   help="fewest steps and shortest timings (tests, smoke runs)")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="phantom + caches here (kept); default: a temporary folder, removed")
    p.add_argument("--out", type=Path, default=Path("benchmark.json"), help="JSON result")
    return p


def _resolve(args: argparse.Namespace) -> tuple[torch.device, list[str], list[dict[str, Any]]]:
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible to torch")
    if args.check_files < 1:
        raise SystemExit(f"error: --check-files must be >= 1, got {args.check_files}")
    if args.quick:
        args.warmup, args.steps, args.min_time = 1, 1, 0.0
        args.data_seconds = min(args.data_seconds, 0.3)
        args.phantom_patients = min(args.phantom_patients, 3)
        args.phantom_size = min(args.phantom_size, 512)
    if not args.matmul_n:
        args.matmul_n = 8192 if device.type == "cuda" else (256 if args.quick else 1024)
    known = ("data", "flops", "train", "e2e", "onnx", "stage1check")
    if args.sections == "auto":
        sections = ["data", "flops", "train"] + (["e2e"] if device.type == "cuda" else ["onnx"])
    else:
        sections = [s.strip() for s in args.sections.split(",") if s.strip()]
        bad = [s for s in sections if s not in known]
        if bad:
            raise SystemExit(f"--sections: unknown {bad}; choose from {known}")
    if args.variants == "auto":
        args.variants = DEFAULT_VARIANTS["cuda" if device.type == "cuda" else "cpu"]
    try:
        variants = [parse_variant(v) for v in args.variants.split(",") if v.strip()]
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    # compiling changes global dynamo state and can take minutes: run those last
    variants.sort(key=lambda v: v["compile"])
    return device, sections, variants


def main(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.perf_counter()
    device, sections, variants = _resolve(args)
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit("error: --threads must be >= 1")
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    else:
        # inductor's pool of compile processes only adds start-up cost on a few cores
        import torch._inductor.config as inductor_config

        inductor_config.compile_threads = 1
    cfg = config.to_dict(args)
    config.print_config(cfg, "benchmark")
    result: dict[str, Any] = {"machine": _machine(device), "config": cfg,
                              "versions": environment.versions(), "lock": environment.lock_state(), "sections": sections}

    def save(stage: str) -> None:
        result["wall_s"] = time.perf_counter() - t_start
        result["targets"] = _targets(result)
        write_json(result, args.out)
        print(f"[benchmark] {stage} done at {result['wall_s']:.1f} s", flush=True)

    own_tmp = args.work_dir is None
    work_dir = Path(tempfile.mkdtemp(prefix="benchmark_")) if own_tmp else Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    try:
        df = None
        if {"data", "e2e", "stage1check"} & set(sections):
            t0 = time.perf_counter()
            df = make_phantom(work_dir, args.phantom_patients, args.phantom_size, args.seed)
            result["phantom"] = {"images": len(df), "long_side": args.phantom_size,
                                 "generate_s": time.perf_counter() - t0}
        if "data" in sections:
            sizes = (sorted({args.img_size, PAPER_SIZE}) if args.data_sizes == "auto"
                     else sorted({int(v) for v in args.data_sizes.split(",") if v.strip()}))
            result["data"] = bench_data(df, sizes, work_dir, args.data_seconds,
                                        min_items=2 if args.quick else 10,
                                        mean=args.mean, std=args.std,
                                        warm_workers=max(args.workers, 1))
            save("data")
        flops, peak = None, None
        if "flops" in sections:
            flops = count_flops(args, device)
            flops.update(matmul_peak(device, args.matmul_n, args.min_time))
            peak = flops["peak_tflops"]
            result["flops"] = flops
            _cleanup(device)
            save("flops")
        if "train" in sections:
            result["train"] = []
            for spec in variants:
                print(f"[benchmark] variant {spec['name']} ...", flush=True)
                result["train"].append(bench_variant(args, device, spec, flops, peak))
                save(f"variant {spec['name']}")
        if "e2e" in sections:
            result["e2e"] = _run_e2e(args, device, df, work_dir, result)
            save("e2e")
        if "onnx" in sections:
            result["onnx"] = bench_onnx(args, work_dir)
            save("onnx")
        if "stage1check" in sections:
            result["stage1check"] = bench_stage1check(df, args.check_files, work_dir)
            save("stage1check")
    finally:
        if own_tmp:
            shutil.rmtree(work_dir, ignore_errors=True)
    result["wall_s"] = time.perf_counter() - t_start
    result["targets"] = _targets(result)
    write_json(result, args.out)
    print(format_report(result), flush=True)
    return result


def _run_e2e(args: argparse.Namespace, device: torch.device, df: pd.DataFrame, work_dir: Path,
             result: dict[str, Any]) -> dict[str, Any]:
    base, fast = parse_variant("fp32"), parse_variant(_fast_variant(args.fast_variant, result))
    # the same batch for both; the largest that fitted fp32 in the train section, if known
    batch = args.batch_size
    for r in result.get("train") or []:
        if r["variant"] == "fp32" and r.get("batch_size"):
            batch = r["batch_size"]
    cache_dir = work_dir / f"cache_{args.img_size}"
    unified_dataset.ImageCache(cache_dir, args.img_size).warm(df["image_path"].tolist(),
                                                 num_workers=max(args.workers, 1), progress=False)
    rows = []
    for spec, cdir in ((base, None), (fast, cache_dir)):
        print(f"[benchmark] e2e {spec['name']} ({'cached' if cdir else 'uncached'}) ...", flush=True)
        rows.append(bench_e2e(args, device, df, spec, cdir, batch))
    fl = result.get("flops")
    if fl:
        for r in rows:
            r["achieved_tflops"] = fl["train_flops_per_image"] * r["images_per_s"] / 1e12
            r["mfu"] = r["achieved_tflops"] / fl["peak_tflops"]
    return {"rows": rows, "speedup": rows[1]["images_per_s"] / rows[0]["images_per_s"]}


def _fast_variant(name: str, result: dict[str, Any]) -> str:
    """``name``, or for 'best' the uncompiled train variant with the most images/s."""
    if name != "best":
        return name
    measured = [r for r in result.get("train") or []
                if r.get("train_images_per_s") and "compile" not in r["variant"]]
    if not measured:
        raise SystemExit("--fast-variant best: no uncompiled variant was measured in the train section")
    return max(measured, key=lambda r: r["train_images_per_s"])["variant"].partition("@")[0]


if __name__ == "__main__":
    main(get_args_parser().parse_args())
