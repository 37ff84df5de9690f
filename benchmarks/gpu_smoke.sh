#!/usr/bin/env bash
# GPU checks in one call (for a session that is lent a GPU machine): the paper variant's
# training step in fp32 and bf16 (images/s, peak GPU memory, achieved TFLOP/s against the
# card's measured matmul rate), then the real loop under single, DDP (1 GPU) and DeepSpeed
# (bf16) on a demo category. Prints figures; record them in benchmarks/RESULTS.md.
# Not yet run on a GPU: no device was lent to the session that wrote it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total --format=csv
echo "== training step, paper variant (K=150), batch 32"
$PY benchmarks/train_throughput.py --variant vtadl_paper --batch-size 32 --steps 50 --warmup 5 \
    --device cuda --precision fp32 bf16
echo "== training step, paper variant, K=10 (the published code's default), batch 32"
$PY benchmarks/train_throughput.py --variant vtadl_paper --n-gaussians 10 --batch-size 32 \
    --steps 50 --warmup 5 --device cuda --precision bf16
echo "== the real loop: single vs ddp (1 GPU) vs deepspeed bf16, 512 px demo data"
$PY - <<'PY'
import json, tempfile, time
from pathlib import Path
from vtadl.config import default_config
from vtadl.data.demo import make_demo_dataset
from vtadl.training import fit
tmp = Path(tempfile.mkdtemp())
make_demo_dataset(tmp / "data", categories=["brick"], image_size=512, n_train=256)
for strategy, extra in [("single", {}), ("ddp", {"num_workers": 1, "gpus_per_worker": 1}),
                        ("deepspeed", {"num_workers": 1, "gpus_per_worker": 1, "precision": "bf16"})]:
    cfg = default_config("vtadl_paper").override(
        data={"root": str(tmp / "data"), "category": "brick"},
        train={"epochs": 4, "batch_size": 32, "strategy": strategy, "out": str(tmp / "runs"),
               "device": "cuda", **extra})
    tic = time.time(); run = fit(cfg)
    h = [json.loads(l) for l in (run / "history.jsonl").read_text().splitlines()]
    print(json.dumps({"strategy": strategy, "wall_s": round(time.time() - tic, 1),
                      "images_per_second_after_epoch1": [r["images_per_second"] for r in h[1:]]}))
PY
