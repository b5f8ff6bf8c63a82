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
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch

import config
import environment
import image_io
import presets
import speed
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
    result: dict[str, Any] = {"machine": speed.machine(device), "config": cfg,
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
            df = speed.make_phantom(work_dir, args.phantom_patients, args.phantom_size, args.seed)
            result["phantom"] = {"images": len(df), "long_side": args.phantom_size,
                                 "generate_s": time.perf_counter() - t0}
        if "data" in sections:
            sizes = (sorted({args.img_size, PAPER_SIZE}) if args.data_sizes == "auto"
                     else sorted({int(v) for v in args.data_sizes.split(",") if v.strip()}))
            result["data"] = speed.bench_data(args, df, sizes, work_dir)
            save("data")
        flops, peak = None, None
        if "flops" in sections:
            flops = speed.count_flops(args, device)
            flops.update(speed.matmul_peak(device, args.matmul_n, args.min_time))
            peak = flops["peak_tflops"]
            result["flops"] = flops
            speed.cleanup(device)
            save("flops")
        if "train" in sections:
            result["train"] = []
            for spec in variants:
                print(f"[benchmark] variant {spec['name']} ...", flush=True)
                result["train"].append(speed.bench_variant(args, device, spec, flops, peak))
                save(f"variant {spec['name']}")
        if "e2e" in sections:
            result["e2e"] = _run_e2e(args, device, df, work_dir, result)
            save("e2e")
        if "onnx" in sections:
            result["onnx"] = speed.bench_onnx(args, work_dir)
            save("onnx")
        if "stage1check" in sections:
            result["stage1check"] = speed.bench_stage1check(df, args.check_files, work_dir)
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
    image_io.ImageCache(cache_dir, args.img_size).warm(df["image_path"].tolist(),
                                                 num_workers=max(args.workers, 1), progress=False)
    rows = []
    for spec, cdir in ((base, None), (fast, cache_dir)):
        print(f"[benchmark] e2e {spec['name']} ({'cached' if cdir else 'uncached'}) ...", flush=True)
        rows.append(speed.bench_e2e(args, device, df, spec, cdir, batch))
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
