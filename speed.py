"""Measuring speed for benchmark.py: the input pipeline, stage 1's image check, the training
and inference steps, FLOPs and MFU, ONNX Runtime, end to end.

Each ``bench_*`` function measures one section of benchmark.py's report and returns its
JSON entry; benchmark.py holds the command line, the order of the sections and the report.
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
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import cv2
import numpy as np
import pandas as pd
import torch

import bundle
import columns
import environment
import engine
import image_io
import io_utils
import models
import phantom
import recipe
import tables
import unified_dataset
from io_utils import write_json
# ---------------------------------------------------------------------------------------
# small helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def machine(device: torch.device) -> dict[str, Any]:
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
    df = tables.load_dataset(csv, Path(csv).parent / columns.IMAGES_DIR)
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


def bench_data(args: argparse.Namespace, df: pd.DataFrame, sizes: list[int], work_dir: Path) -> dict[str, Any]:
    """The data section: one worker's images/s over ``WristDataset``, uncached and cached, at
    each of ``sizes``, for ``args.data_seconds`` (at least 2 items with ``--quick``, else 10)
    per mode; and the cache's disk use."""
    seconds, min_items = args.data_seconds, 2 if args.quick else 10
    mean, std, warm_workers = args.mean, args.std, max(args.workers, 1)
    rows, speedup, disk = [], {}, {}
    paths = df["image_path"].tolist()
    for size in sizes:
        tf = unified_dataset.build_transforms(size, train=True, mean=mean, std=std)
        cache_dir = work_dir / f"cache_{size}"
        t0 = time.perf_counter()
        image_io.ImageCache(cache_dir, size).warm(paths, num_workers=warm_workers, progress=False)
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

    io_utils.run_threaded(write, range(n_files), io_utils.default_workers(), lambda i, result: None,
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
            cleanup(device)
    row["note"] = "; ".join(notes + [row.pop("note", "")]).strip("; ")
    if flops and row.get("train_images_per_s"):
        achieved = flops["train_flops_per_image"] * row["train_images_per_s"]
        row["achieved_tflops"] = achieved / 1e12
        if peak_tflops:
            row["mfu"] = row["achieved_tflops"] / peak_tflops
    return row


def cleanup(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _bench_variant_once(args: argparse.Namespace, device: torch.device, spec: dict[str, Any],
                        batch: int) -> dict[str, Any]:
    cl = spec["channels_last"]
    cleanup(device)
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
    cleanup(device)
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
    cleanup(device)
    return {"variant": spec["name"], "loader": "cached" if cache_dir else "uncached",
            "workers": args.workers, "batch_size": batch, "steps_timed": timed,
            "images_per_s": batch * timed / elapsed, "startup_s": t0 - t_start}
