#!/usr/bin/env bash
# GPU smoke check of the real stage scripts (a check, not timings), on a small phantom with
# swin_demo at 128 px (shifted windows: SDPA attention with the shift mask, the default):
#   age      train_age_classifier.py under torchrun, one process (the NCCL code path)
#   stop     train_fracture_per_agegroup.py --pooled, Ctrl-C (SIGINT) once epoch 2 is reported
#   resume   the same under torchrun with --resume: continues from the saved epoch, with the
#            fused AdamW state
#   evaluate evaluate.py under torchrun with bf16 inference
# About 2-3 minutes on an H100. Run from the repository root: bash benchmarks/gpu_smoke.sh
# (WHEELS=0 DEVICE=cpu PY=.venv/bin/python for a dry run on a CPU machine).
set -u -o pipefail
source "$(dirname "$0")/device_env.sh" smoke_out
DEV=${DEVICE:-cuda}
RUN=${RUN_DIR:-/tmp/smoke/run}
rm -rf "$(dirname "$RUN")"
TR=($PY -m torch.distributed.run --standalone --nproc_per_node 1)
COMMON=(--out-dir "$RUN" --quiet --device "$DEV" --model swin_demo --img-size 128 --batch-size 8 --workers 2)
FRAC=(train_fracture_per_agegroup.py "${COMMON[@]}" --pooled --epochs 4 --patience 10)
step() { local name=$1; shift; echo "=== $name ==="; SECONDS=0; timeout -k 5 150 "$@"; echo "=== $name rc=$? in ${SECONDS} s ==="; }
{
    nvidia-smi -L 2>/dev/null || true
    $PY - "$RUN" <<'PYEOF' || { echo "phantom/splits failed"; exit 2; }
import sys
from pathlib import Path
sys.path.insert(0, "tests")
from conftest import run_stages_1_2
from phantom import generate_phantom
run = Path(sys.argv[1])
generate_phantom(run.parent / "data", n_patients=150, img_size=160, seed=0, progress=False)
run_stages_1_2(run.parent / "data", run)
PYEOF
    step age "${TR[@]}" train_age_classifier.py "${COMMON[@]}" --epochs 2 --result-json "$OUT/age.json"

    echo "=== stop ==="
    set -m  # job control: else a background job starts with SIGINT ignored, and Ctrl-C is lost
    $PY "${FRAC[@]}" > "$OUT/stop.log" 2>&1 &
    pid=$!
    set +m
    for _ in $(seq 1200); do
        grep -q "\[Epoch 2\] Train" "$OUT/stop.log" && break
        kill -0 $pid 2>/dev/null || break
        sleep 0.1
    done
    kill -INT $pid
    wait $pid
    echo "=== stop rc=$? (130 = interrupted) ==="
    grep -E "Epoch|Interrupted|rror" "$OUT/stop.log"
    $PY - "$RUN" <<'PYEOF'
import sys
from pathlib import Path
import torch
last = Path(sys.argv[1]) / "saved_agegroup_models" / "fracture_classifier_pooled_last.pt"
if last.exists():
    s = torch.load(last, map_location="cpu", weights_only=True)
    print("last state: epoch", s["epoch"], "| optimizer fused:", s["optimizer"]["param_groups"][0].get("fused"))
else:
    print("no last state:", sorted(p.name for p in last.parent.glob("*")))
PYEOF

    step resume "${TR[@]}" "${FRAC[@]}" --resume --result-json "$OUT/resume.json"
    step evaluate "${TR[@]}" evaluate.py --out-dir "$RUN" --device "$DEV" --amp bf16 --n-boot 50
    $PY - "$RUN" "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path
import torch
run, out = Path(sys.argv[1]), Path(sys.argv[2])
ck = torch.load(run / "saved_agegroup_models" / "fracture_classifier_pooled.pt", map_location="cpu",
                weights_only=True)
print("pooled: epochs run", ck.get("epochs_run"), "| best epoch", ck["epoch"], "| fused_attn",
      ck["config"].get("fused_attn"), "| amp", ck["config"].get("amp"))
m = json.loads((run / "metrics.json").read_text())
print("evaluate: world_size", m.get("world_size"), "| device", m.get("device"),
      "| hard AUROC", m["systems"]["hard"]["overall"]["auroc"])
for f in ("age", "resume"):
    print(f, "result json", "present" if (out / f"{f}.json").exists() else "MISSING")
PYEOF
} 2>&1 | tee "$OUT/gpu_smoke.log"
