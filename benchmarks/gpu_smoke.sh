#!/usr/bin/env bash
# GPU checks in one call (for a session that is lent a GPU machine), about 6 to 8 minutes on
# one H200: the paper variant's training step (images/s, TFLOP/s against the card's measured
# matmul rate, peak GPU memory) in fp32, TF32 and bf16 at batch 32, bf16 at batch 64, and bf16
# with torch.compile and with the fused Adam; then the real loop (`vtadl.runs.fit`: data,
# validation, checkpoints) on a 200-image demo category for 20 epochs: single in bf16 with the
# default checkpoint policy, again with checkpoints written on the training thread, and DDP on
# one GPU; a torch.profiler breakdown of the bf16 step. Prints the profile and one table at
# the end; record them in benchmarks/RESULTS.md.
# Not yet run on a GPU: no device was lent to the sessions that wrote it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-/tmp}/gpu_smoke
mkdir -p "$OUT"
# VARIANT, DEVICE, LOOP_IMAGES and LOOP_EPOCHS change the sizes (a dry run on a CPU:
# VARIANT=vtadl_tiny DEVICE=cpu LOOP_IMAGES=12 LOOP_EPOCHS=2 benchmarks/gpu_smoke.sh).
DEVICE=${DEVICE:-cuda}
[ "$DEVICE" = cpu ] || nvidia-smi --query-gpu=name,memory.total --format=csv
TT="$PY benchmarks/train_throughput.py --variant ${VARIANT:-vtadl_paper} --device $DEVICE"
TT="$TT --steps 30 --warmup 5"
LOOP="--loop-images ${LOOP_IMAGES:-200} --epochs ${LOOP_EPOCHS:-20} --loop-precision bf16"
run() {  # name, arguments: one invocation, its JSON rows kept for the table
    echo "== $1" >&2
    shift
    $TT "$@" | grep '^{' >>"$OUT/rows.jsonl"
}
: >"$OUT/rows.jsonl"
run "step fp32 tf32 bf16, batch 32; real loop, single" \
    --precision fp32 tf32 bf16 --batch-size 32 --loop $LOOP
run "step bf16, batch 64" --precision bf16 --batch-size 64
run "step bf16 + torch.compile" --precision bf16 --batch-size 32 --compile
run "step bf16 + fused Adam" --precision bf16 --batch-size 32 --fused-adam
run "real loop, checkpoints on the training thread" --strategy single --batch-size 32 \
    $LOOP --checkpoint-in-loop
run "real loop, DDP on one GPU" --strategy ddp --num-workers 1 --batch-size 32 $LOOP
echo "== profile of the bf16 step, batch 32" >&2
$TT --precision bf16 --batch-size 32 --profile 5 | grep -v '^{' >"$OUT/profile.md"
cat "$OUT/profile.md"
$PY - "$OUT/rows.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
sys.path.insert(0, "benchmarks")
from train_throughput import print_table
print_table(rows)
PY
