#!/usr/bin/env bash
# Prepared GPU benchmark: builds the `1b` preset (PLM-1B dimensions, random weights, bf16) and runs
# the engine benchmark against HF generate on CUDA, writing the figures to $OUT (default: ./gpu-out).
#   OUT=/tmp/out bash benchmarks/gpu_bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
bash scripts/setup.sh
PY=.venv/bin/python
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" | tee "$OUT/device.txt"
[ -f .cache/checkpoints/1b/config.json ] || $PY -m plm_core.testing.make_checkpoint --preset 1b --out .cache/checkpoints/1b --overwrite
$PY benchmarks/bench_engine.py --checkpoint .cache/checkpoints/1b --device cuda --dtype bfloat16 \
    --concurrency 16 --max-tokens 256 --chunk 2048 --encoder-tiles 16 --throughput-chunk 8192 \
    --out "$OUT/bench_engine_1b_gpu.json" 2>&1 | tee "$OUT/bench_engine_1b_gpu.txt"
# the same with decode steps replayed as CUDA graphs (HF's side is unchanged, so skip it)
$PY benchmarks/bench_engine.py --checkpoint .cache/checkpoints/1b --device cuda --dtype bfloat16 \
    --concurrency 16 --max-tokens 256 --chunk 2048 --encoder-tiles 16 --throughput-chunk 8192 --skip-hf \
    --cuda-graphs --out "$OUT/bench_engine_1b_gpu_graphs.json" 2>&1 | tee "$OUT/bench_engine_1b_gpu_graphs.txt"
