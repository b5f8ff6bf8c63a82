#!/usr/bin/env bash
# Issue 5 GPU benchmark: Swin-L 384 on one H100, in one call of at most about 8 minutes.
#   1. data, FLOPs, eager variants (fp32 baseline; bf16+channels_last with foreach and with
#      fused AdamW; + SDPA attention) and end to end (fp32 uncached vs the fastest eager
#      variant fed from the cache)
#   2. the compiled variants at batch 64, with and without SDPA attention
#   3. the faster compiled one at batch 96, if batch 64's peak memory leaves room
# Each step is its own benchmark.py process under a hard time cap, and writes its JSON as
# soon as each variant is measured, so a cap that fires keeps what was measured.
# Run from the repository root:  bash benchmarks/h100_bench.sh   (results in $OUT or ./bench_out)
# Wheels of packages the GPU image lacks (albumentations and its needs) may sit in .whl/.
# WHEELS=0 skips them; DEVICE/MODEL/IMG/BATCH/BIG override the defaults for a dry run on a CPU machine.
set -u -o pipefail
source "$(dirname "$0")/device_env.sh" bench_out
BATCH=${BATCH:-64}
BIG=${BIG:-96}
COMMON=(--device "${DEVICE:-cuda}" --model "${MODEL:-swin_large_patch4_window12_384}" --img-size "${IMG:-384}"
        --batch-size "$BATCH" --workers "${WORKERS:-12}" --warmup 2 --steps 4 --min-time 1 --data-seconds 2
        --phantom-patients 12 --phantom-size 1024 --compile-timeout "${COMPILE_CAP:-150}")
run() {  # cap, name, benchmark args...
    local cap=$1 name=$2; shift 2
    echo "=== $name (cap ${cap} s) ==="
    SECONDS=0
    timeout -k 10 "$cap" $PY benchmark.py "${COMMON[@]}" "$@" --out "$OUT/$name.json"
    echo "=== $name rc=$? in ${SECONDS} s ==="
}
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv,noheader || true
    $PY -c "import torch, timm; print('torch', torch.__version__, '| timm', timm.__version__, '| cuda', torch.cuda.is_available())" \
        && $PY -c "import benchmark" || { echo "import check failed"; exit 3; }

    run 200 eager --sections data,flops,train,e2e --fast-variant best \
        --variants fp32@32,bf16+cl+foreach,bf16+cl,bf16+cl+fa
    run 340 compiled --sections flops,train --variants bf16+cl+compile,bf16+cl+fa+compile

    # the faster compiled variant again at a larger batch, when 1.5x its memory fits
    big=$($PY - "$OUT/compiled.json" "$BATCH" "$BIG" <<'PYEOF'
import json, sys
import torch
rows = [r for r in json.load(open(sys.argv[1])).get("train", []) if r.get("train_images_per_s")]
if rows:
    best = max(rows, key=lambda r: r["train_images_per_s"])
    total = torch.cuda.get_device_properties(0).total_memory / 2**20 if torch.cuda.is_available() else float("inf")
    if best["peak_mem_mb"] * int(sys.argv[3]) / int(sys.argv[2]) < 0.92 * total:
        print(f"{best['variant']}@{sys.argv[3]}")
PYEOF
)
    if [ -n "$big" ]; then run 200 compiled_big --sections flops,train --variants "$big"; else echo "no larger batch run"; fi
    date -u
} 2>&1 | tee "$OUT/h100_bench.log"
