"""Projected wall time of the paper preset on the full GRAZPEDWRI-DX data: 1 GPU, 8 GPUs, 2x8 GPUs.

Prints the Markdown table of README "Scale: the full dataset on paper". Every rate comes from
a measured benchmark JSON in this folder (``benchmark.py`` on one H100 and its host CPU) or
from the flags below, which hold the assumptions; the table says which is which.

The model, per run of ``run_all_training.py --preset paper`` (add ``--init-from-pooled`` for
the control model):
  stage 1 check  header and tail of every listed file (cheap; ``--check-rate`` files/s)
  cache warm-up  rank 0 decodes the train + val images into the 384 px cache with
                 ``--warm-threads`` threads before the age classifier's first epoch (the
                 test images are decoded during stage 3's predictions, by every rank's loader)
  training       per model and epoch: the training images at the projected batch-16 rate
                 (eager bf16 + channels_last + fused attention, the paper preset) times the
                 GPU count times the DDP efficiency, plus validation at the inference rate
  stage 3        predictions for every image (train, val, test) with the age classifier
  evaluation     5 models (age, 3 groups, pooled) on val + test; evaluate.py's defaults:
                 fp32 (``--amp off``), images loaded in the main process (``--workers 0``);
                 then rank 0's patient bootstrap (``--bootstrap-cpu-s``)
  startup        process start, model build and pretrained weights, per model (assumed)
The batch-16 rates are projected from the measured batch-32 and batch-64 rates: halving the
batch from 32 to 16 is assumed to cost what halving it from 64 to 32 cost, and fused
attention is assumed to give at batch 16 the gain it gave at batch 64.
DDP efficiency: a ring all-reduce of the fp32 gradients (4 bytes x parameters) each step,
hidden behind the backward pass (2/3 of the step) as far as it fits, times 0.95 for
everything else (stragglers, the sampler, logging). The link speeds are assumptions.

Example:
    python benchmarks/scale_projection.py                  # the README table
    python benchmarks/scale_projection.py --epochs 25 --inter-node-gbs 12.5
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# Stage 1 + 2 with default flags on the real dataset.csv (20,327 rows, 708 with metal excluded),
# run with --no-image-check: the split sizes the paper preset trains and evaluates on.
REAL_ROWS = 20_327
REAL_SPLITS = {"train": 13_452, "val": 3_364, "test": 2_803}
CONFIGS = (("1 GPU", 1, 1), ("8 GPUs (1 node)", 8, 1), ("2x8 GPUs (2 nodes)", 8, 2))


def _load(folder: Path, name: str) -> dict[str, Any]:
    return json.loads((folder / name).read_text())


def _train_row(result: dict[str, Any], variant: str) -> dict[str, Any]:
    for row in result.get("train", []):
        if row["variant"] == variant:
            return row
    raise SystemExit(f"no train variant {variant!r} in the benchmark JSON")


def measured_rates(folder: Path) -> dict[str, Any]:
    """The H100 figures the projection starts from (each with the file it came from)."""
    bs32 = _load(folder, "h100_swin_large_384_bs32.json")
    eager = _load(folder, "h100_swin_large_384_eager_fa.json")
    compiled = _load(folder, "h100_swin_large_384_compile_fa.json")
    cl32, cl64 = _train_row(bs32, "bf16+cl"), _train_row(eager, "bf16+cl")
    fa64, fp32 = _train_row(eager, "bf16+cl+fa"), _train_row(bs32, "fp32")
    comp = _train_row(compiled, "bf16+cl+fa+compile")
    compile_s = [float(x) for d in (compiled, _load(folder, "h100_swin_large_384_bs64_compile.json"))
                 for r in d["train"] for x in re.findall(r"first step \(compile\) ([0-9.]+) s", r.get("note", ""))]
    data = [r for d in (bs32, eager) for r in d["data"]["rows"] if r["img_size"] == 384]
    return {
        "train_cl32": cl32["train_images_per_s"], "train_cl64": cl64["train_images_per_s"],
        "train_fa64": fa64["train_images_per_s"], "train_compile_fa64": comp["train_images_per_s"],
        "infer_cl32": cl32["infer_images_per_s"], "infer_cl64": cl64["infer_images_per_s"],
        "infer_fa64": fa64["infer_images_per_s"], "infer_fp32_32": fp32["infer_images_per_s"],
        "decode_per_worker": min(r["images_per_s"] for r in data if r["mode"] == "uncached"),
        "cached_per_worker": min(r["images_per_s"] for r in data if r["mode"] == "cached"),
        "cache_mb_per_image": bs32["data"]["cache_disk"]["384"]["mb_per_image"],
        "params": bs32["flops"]["params_m"] * 1e6, "compile_s": max(compile_s),
        "gpu": bs32["machine"]["gpu"], "host_cpus": bs32["machine"]["cpu_count"],
    }


def batch16(rate32: float, rate64: float, fa_gain: float) -> float:
    """Projected batch-16 rate: 32 -> 16 loses what 64 -> 32 lost; fused attention's gain as at 64."""
    return rate32 * (rate32 / rate64) * fa_gain


def ddp_efficiency(step_s: float, grad_bytes: float, gpus: int, link_gbs: float) -> tuple[float, float]:
    """(efficiency, all-reduce seconds) of one DDP step of ``step_s`` on ``gpus`` GPUs whose
    slowest ring link moves ``link_gbs`` GB/s."""
    if gpus == 1:
        return 1.0, 0.0
    comm = 2 * (gpus - 1) / gpus * grad_bytes / (link_gbs * 1e9)
    exposed = max(0.0, comm - 2 / 3 * step_s)
    return 0.95 * step_s / (step_s + exposed), comm


def _fmt_time(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def project(args: argparse.Namespace, m: dict[str, Any]) -> dict[str, Any]:
    n_train, n_val, n_test = REAL_SPLITS["train"], REAL_SPLITS["val"], REAL_SPLITS["test"]
    fa_train, fa_infer = m["train_fa64"] / m["train_cl64"], m["infer_fa64"] / m["infer_cl64"]
    r_train = batch16(m["train_cl32"], m["train_cl64"], fa_train)
    r_infer = batch16(m["infer_cl32"], m["infer_cl64"], fa_infer)
    r_eval = m["infer_fp32_32"] if args.eval_amp == "off" else m["infer_fa64"]
    models = 5 + int(args.control)  # age, pooled, 3 groups (+ the control)
    grad_bytes = 4 * m["params"]
    step_s = args.batch_size / r_train
    out: dict[str, Any] = {"r_train": r_train, "r_infer": r_infer, "r_eval": r_eval, "step_s": step_s,
                           "grad_gb": grad_bytes / 1e9, "configs": []}
    for label, per_node, nodes in CONFIGS:
        g = per_node * nodes
        link = args.intra_node_gbs if nodes == 1 else args.inter_node_gbs
        eff, comm = ddp_efficiency(step_s, grad_bytes, g, link)
        epoch = n_train / (g * r_train * eff) + n_val / (g * r_infer)
        # evaluate.py loads in the main process: loading and inference take turns
        per_eval_image = 1 / r_eval + 1 / m["cached_per_worker"]
        rows = {
            "check": REAL_ROWS / args.check_rate,
            "warm": (n_train + n_val) / (args.warm_threads * m["decode_per_worker"]),
            "age": args.epochs * epoch + (n_train + n_val + n_test) / (g * r_infer)
                   + n_test / (g * args.workers * m["decode_per_worker"]),
            "pooled": args.epochs * epoch,
            "groups": args.epochs * epoch,  # the three groups partition the training images
            "control": args.epochs * epoch if args.control else 0.0,
            "eval": 5 * (n_val + n_test) * per_eval_image / g + args.bootstrap_cpu_s,
            "startup": models * args.startup_s,
        }
        total = sum(rows.values())
        training = sum(rows[k] for k in ("age", "pooled", "groups", "control"))
        # --compile: the training steps at the compiled/eager ratio measured at batch 64, and a
        # cold compile per model (the slowest measured); validation and inference stay eager
        compiled = (total - training * (1 - m["train_fa64"] / m["train_compile_fa64"])
                    + models * m["compile_s"])
        trained = 3 + int(args.control)  # age, pooled, the groups together, the control
        cap = total + (args.cap_epochs - args.epochs) * epoch * trained
        demand = r_train * eff  # images/s each GPU consumes while training
        out["configs"].append({
            "label": label, "gpus": g, "nodes": nodes, "efficiency": eff, "allreduce_s": comm,
            "rows": rows, "total": total, "total_cap": cap, "total_compile": compiled,
            "training_share": training / total,
            "fixed_share": (rows["check"] + rows["warm"] + rows["startup"] + args.bootstrap_cpu_s) / total,
            "loader_cores_per_node": per_node * demand / m["cached_per_worker"],
            "decode_cores_per_node": per_node * demand / m["decode_per_worker"],
            "cache_read_mb_s_per_node": per_node * demand * m["cache_mb_per_image"],
        })
    return out


def markdown(args: argparse.Namespace, m: dict[str, Any], p: dict[str, Any]) -> str:
    cfgs = p["configs"]
    e, cap = args.epochs, args.cap_epochs
    names = [
        ("check", f"stage 1 check ({REAL_ROWS:,} files, headers only)"),
        ("warm", f"cache warm-up ({REAL_SPLITS['train'] + REAL_SPLITS['val']:,} decodes on rank 0)"),
        ("age", f"age classifier ({e} epochs) + predictions for all {sum(REAL_SPLITS.values()):,} images"),
        ("pooled", f"pooled fracture model ({e} epochs)"),
        ("groups", f"3 age-group models ({e} epochs each, {REAL_SPLITS['train']:,} images in all)"),
    ]
    if args.control:
        names.append(("control", f"pooled, continued control ({e} epochs; --init-from-pooled)"))
    names += [("eval", f"evaluation (5 models x {REAL_SPLITS['val'] + REAL_SPLITS['test']:,} images, "
                        f"{'fp32' if args.eval_amp == 'off' else 'bf16'}) + bootstrap"),
              ("startup", "start-up and weights, per model")]
    head = "| part | " + " | ".join(c["label"] for c in cfgs) + " |"
    lines = [head, "|" + " --- |" * (len(cfgs) + 1)]
    for key, name in names:
        lines.append(f"| {name} | " + " | ".join(_fmt_time(c["rows"][key]) for c in cfgs) + " |")
    lines.append(f"| **total, {e} epochs per model** | "
                 + " | ".join(f"**{_fmt_time(c['total'])}**" for c in cfgs) + " |")
    lines.append(f"| total at the {cap}-epoch cap | " + " | ".join(_fmt_time(c["total_cap"]) for c in cfgs) + " |")
    lines.append(f"| total with `--compile`, {e} epochs | "
                 + " | ".join(_fmt_time(c["total_compile"]) for c in cfgs) + " |")
    lines.append("| DDP efficiency (all-reduce per step) | "
                 + " | ".join("-" if c["gpus"] == 1 else f"{c['efficiency']:.0%} ({1000 * c['allreduce_s']:.0f} ms)"
                              for c in cfgs) + " |")
    lines.append("| share: training / fixed (check, warm-up, start-up, bootstrap) | "
                 + " | ".join(f"{c['training_share']:.0%} / {c['fixed_share']:.0%}" for c in cfgs) + " |")
    lines.append("| cores per node to feed training: cached / uncached | "
                 + " | ".join(f"{c['loader_cores_per_node']:.1f} / {c['decode_cores_per_node']:.0f}" for c in cfgs)
                 + " |")
    lines.append("| cache reads per node while training | "
                 + " | ".join(f"{c['cache_read_mb_s_per_node']:.0f} MB/s" for c in cfgs) + " |")
    lines.append("| **limited by** | " + " | ".join(_limit(c) for c in cfgs) + " |")
    src = (f"Measured ({m['gpu']}, `benchmark.py`, JSON in `benchmarks/`): Swin-L 384 training "
           f"{m['train_cl32']:.0f} images/s (bf16 + channels_last, batch 32), {m['train_cl64']:.0f} (batch 64), "
           f"{m['train_fa64']:.0f} (+ fused attention, batch 64); inference {m['infer_cl32']:.0f} / "
           f"{m['infer_cl64']:.0f} / {m['infer_fa64']:.0f}, fp32 {m['infer_fp32_32']:.0f}; host CPU per worker at "
           f"384 px: {m['decode_per_worker']:.0f} images/s decoding full-size 16-bit PNGs, "
           f"{m['cached_per_worker']:.0f} from the cache, {m['cache_mb_per_image']:.2f} MB per cached image. "
           f"Split sizes: stages 1-2 on the real `dataset.csv`.")
    proj = (f"Projected: batch 16 (the paper preset, eager) trains {p['r_train']:.0f} and infers {p['r_infer']:.0f} "
            f"images/s per GPU ({1000 * p['step_s']:.0f} ms per step); {p['grad_gb']:.2f} GB of fp32 gradients "
            f"all-reduced per step over {args.intra_node_gbs:g} GB/s (NVLink) within a node and "
            f"{args.inter_node_gbs:g} GB/s per GPU between nodes (a ring whose slowest link carries the whole "
            f"gradient: pessimistic where NCCL spreads its rings over one network card per GPU); `--compile` "
            f"trains {m['train_compile_fa64'] / m['train_fa64']:.2f}x faster (measured at batch 64) after a "
            f"{m['compile_s']:.0f} s compile per model.")
    assumed = (f"Assumed: {e} epochs per model (early stopping, patience 5; the cap is {cap}); "
               f"{args.warm_threads} warm-up threads and {args.workers} loader workers per process on free "
               f"cores; {args.startup_s:g} s start-up per model; stage 1 check {args.check_rate:,.0f} files/s and "
               f"bootstrap {args.bootstrap_cpu_s:g} CPU-s (both measured on the 2-core development CPU); "
               f"the global batch grows with the GPU count (16 per GPU) and the epochs to converge are "
               f"assumed not to change with it.")
    return "\n".join(lines) + "\n\n" + src + "\n\n" + proj + "\n\n" + assumed + "\n"


def _limit(c: dict[str, Any]) -> str:
    if c["fixed_share"] > 0.4:
        return "the fixed costs (start-up, rank 0's cache warm-up); training itself: GPU compute"
    if c["nodes"] > 1 and c["efficiency"] < 0.85:
        return "GPU compute and the inter-node all-reduce"
    return "GPU compute"


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=add_help,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--bench-dir", type=Path, default=HERE, help="folder of the benchmark JSON files")
    p.add_argument("--epochs", type=int, default=15, help="epochs each model runs before early stopping")
    p.add_argument("--cap-epochs", type=int, default=50, help="the paper preset's --epochs")
    p.add_argument("--batch-size", type=int, default=16, help="images per GPU and step (the paper preset's)")
    p.add_argument("--control", action=argparse.BooleanOptionalAction, default=True,
                   help="include the pooled, continued control model (--init-from-pooled)")
    p.add_argument("--eval-amp", choices=("off", "bf16"), default="off", help="evaluate.py --amp")
    p.add_argument("--workers", type=int, default=8, help="DataLoader workers per process (paper preset)")
    p.add_argument("--warm-threads", type=int, default=8, help="threads decoding the cache on rank 0")
    p.add_argument("--intra-node-gbs", type=float, default=300.0, help="all-reduce bandwidth within a node, GB/s")
    p.add_argument("--inter-node-gbs", type=float, default=25.0,
                   help="all-reduce bandwidth per GPU between nodes, GB/s (25 = one 200 Gb/s link per GPU)")
    p.add_argument("--startup-s", type=float, default=30.0, help="seconds to start and load each model")
    p.add_argument("--check-rate", type=float, default=4000.0, help="stage 1 file checks per second")
    p.add_argument("--bootstrap-cpu-s", type=float, default=11.0,
                   help="CPU seconds of evaluate.py's bootstrap at the real test-set size")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON instead")
    return p


def main(args: argparse.Namespace) -> dict[str, Any]:
    if args.epochs < 1 or args.cap_epochs < args.epochs:
        raise SystemExit("--epochs must be >= 1 and <= --cap-epochs")
    m = measured_rates(args.bench_dir)
    p = project(args, m)
    if args.json:
        print(json.dumps({"measured": m, "projected": p}, indent=2, default=str))
    else:
        print(markdown(args, m, p))
    return {"measured": m, "projected": p}


if __name__ == "__main__":
    main(get_args_parser().parse_args())
