#!/usr/bin/env bash
# The paper preset on one GPU in one call, then Swin-L's MFU variants; every log and JSON in $OUT.
#   paper     benchmarks/paper_run.py: run_all_training.py --preset paper through stage 5 (age
#             classifier, three group models, pooled model, evaluation, report) on a 384 px
#             phantom of 600 patients (~2,000 images), 2 epochs, the preset's batch 16 and workers,
#             Swin-L from a stand-in ImageNet-22k file; per stage wall time, RAM and GPU memory
#   eager     benchmark.py, Swin-L 384 training and inference: fp32@32, bf16+cl, bf16+cl+fa at batch 64
#   compiled  benchmark.py: bf16+cl+fa+compile at batch 64
# Estimated from the committed H100 figures (benchmarks/h100_*.json: bf16+cl+fa eager 213 train /
# 640 inference img/s at batch 64): paper ~4 min (3 x 2 epochs x ~1,350 training images at
# ~180 img/s = 45 s, inference ~15 s, phantom, decoding, weights loading and report ~3 min),
# eager ~1 min, compiled ~2 min (its compile alone ~90 s): ~7 min. The caps add up to 9 min.
# Run from the repository root:  bash benchmarks/gpu_paper.sh   (results in $OUT or ./gpu_paper_out)
# Dry run on a CPU, the same steps at toy size (swin_demo at 64 px, 1 epoch, batch 2):
#   WHEELS=0 DEVICE=cpu TINY=1 PY=.venv/bin/python bash benchmarks/gpu_paper.sh
set -u -o pipefail
source "$(dirname "$0")/device_env.sh" gpu_paper_out
if [ "${TINY:-0}" = 1 ]; then
    PAPER=(--phantom-patients 24 --phantom-seed 1 --test-frac 0.3 --val-frac 0.3 --epochs 1 --batch-size 2
           --model swin_demo --img-size 64)
    BENCH=(--device "${DEVICE:-cpu}" --model swin_demo --img-size 64 --batch-size 2 --workers 0)
    EAGER=fp32,bf16+cl,bf16+cl+fa
    CAPS=(1800 600 600)  # a shared 2-core CPU is slower than an H100, even at toy size
else
    PAPER=(--phantom-patients 600 --phantom-seed 0 --test-frac 0.15 --val-frac 0.2 --epochs 2 --batch-size 16)
    BENCH=(--device "${DEVICE:-cuda}" --model swin_large_patch4_window12_384 --img-size 384 --batch-size 64
           --workers 12)
    EAGER=fp32@32,bf16+cl,bf16+cl+fa
    CAPS=(290 100 150)
fi
BENCH+=(--warmup 2 --steps 4 --min-time 1 --sections flops,train --compile-timeout "${COMPILE_CAP:-120}")
step() {  # cap, name, command...
    local cap=$1 name=$2; shift 2
    echo "=== $name (cap ${cap} s) ==="
    SECONDS=0
    timeout -k 10 "$cap" "$@"
    echo "=== $name rc=$? in ${SECONDS} s ==="
}
{
    date -u
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU"
    $PY -c "import torch, timm; print('torch', torch.__version__, '| timm', timm.__version__, '| cuda', torch.cuda.is_available())" \
        && $PY -c "import benchmark, run_all_training" || { echo "import check failed"; exit 3; }
    rm -rf "$OUT/paper"
    step "${PAPER_CAP:-${CAPS[0]}}" paper $PY benchmarks/paper_run.py --out-dir "$OUT/paper" --log "$OUT/paper.log" "${PAPER[@]}"
    step "${EAGER_CAP:-${CAPS[1]}}" eager $PY benchmark.py "${BENCH[@]}" --variants "$EAGER" --out "$OUT/eager.json"
    step "${COMPILED_CAP:-${CAPS[2]}}" compiled $PY benchmark.py "${BENCH[@]}" --variants bf16+cl+fa+compile \
        --out "$OUT/compiled.json"
    $PY - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def load(name):
    try:
        return json.loads((out / name).read_text())
    except (OSError, ValueError):
        return None
paper = load("paper/paper_run.json")
print("\n== paper preset (%s) ==" % (f"exit code {paper['rc']}, {paper['total_s'] / 60:.1f} min" if paper else "no result"))
for k, v in sorted((paper or {}).get("stages", {}).items(), key=lambda kv: int(kv[0])):
    print(f"stage {k}: {v['wall_s']:7.1f} s | RAM {v['peak_rss_gb']:.1f} GB | GPU {v.get('peak_gpu_gb', '-')} GB")
for m in (paper or {}).get("models", []):
    print(f"{m['model']:30s} {m['s_per_train_step']} s/step, {m['s_per_val_image']} s per validation image")
print("\n== Swin-L MFU ==\nvariant                   batch  train img/s  infer img/s  MFU %  peak GB")
for name in ("eager.json", "compiled.json"):
    for r in (load(name) or {}).get("train", []):
        if isinstance(r, dict):
            def fmt(x, width, scale=1.0, digits=1):
                return f"{x * scale:{width}.{digits}f}" if isinstance(x, (int, float)) else "-".rjust(width)
            print(f"{r.get('variant', '?'):25s} {r.get('batch_size', '-'):>5}  {fmt(r.get('train_images_per_s'), 11)}"
                  f"  {fmt(r.get('infer_images_per_s'), 11)}  {fmt(r.get('mfu'), 5, 100)}"
                  f"  {fmt(r.get('peak_mem_mb'), 7, 1 / 1024)}  {r.get('note') or ''}")
PYEOF
    date -u
} 2>&1 | tee "$OUT/gpu_paper.log"
