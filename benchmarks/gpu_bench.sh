#!/usr/bin/env bash
# Prepared GPU benchmark: builds the `1b` preset (PLM-1B dimensions, random weights, bf16) and runs,
# on CUDA, the parts named in $PARTS (default: all three), writing every figure to $OUT:
#   engine  benchmarks/bench_engine.py against HF generate (throughput, cached-image TTFT, ITL)
#   graphs  the same engine run with decode steps replayed as CUDA graphs (HF side skipped)
#   serve   benchmarks/serve_bench.py over HTTP: plm-serve vs the HF one-at-a-time baseline
# Each part fits a 10-minute device call on an H200; run them in separate calls if needed:
#   OUT=/tmp/out PARTS="engine graphs" bash benchmarks/gpu_bench.sh
#   OUT=/tmp/out PARTS=serve bash benchmarks/gpu_bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
PARTS=${PARTS:-engine graphs serve}
mkdir -p "$OUT"
bash scripts/setup.sh
PY=.venv/bin/python
CKPT=.cache/checkpoints/1b
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" | tee "$OUT/device.txt"
[ -f $CKPT/config.json ] || $PY -m plm_core.testing.make_checkpoint --preset 1b --out $CKPT --overwrite
ENGINE_ARGS=(--checkpoint $CKPT --device cuda --dtype bfloat16 --concurrency 16 --max-tokens 256 --chunk 2048
             --encoder-tiles 16 --throughput-chunk 8192)
for part in $PARTS; do
  case $part in
    engine)
      $PY benchmarks/bench_engine.py "${ENGINE_ARGS[@]}" --out "$OUT/bench_engine_1b_gpu.json" 2>&1 \
        | tee "$OUT/bench_engine_1b_gpu.txt" ;;
    graphs)
      $PY benchmarks/bench_engine.py "${ENGINE_ARGS[@]}" --skip-hf --cuda-graphs \
        --out "$OUT/bench_engine_1b_gpu_graphs.json" 2>&1 | tee "$OUT/bench_engine_1b_gpu_graphs.txt" ;;
    serve)
      $PY benchmarks/serve_bench.py --launch plm-serve --launch hf-baseline --model $CKPT --device cuda \
        --num-prompts 48 --image-detail auto --num-frames 16 --max-tokens 128 --concurrency 1,8,32 \
        --baseline-concurrency 1,8 --no-progress --out "$OUT/serve" \
        --note "one NVIDIA GPU (see device.txt), bf16, the 1b preset (PLM-1B dimensions, random weights)" 2>&1 \
        | tee "$OUT/serve_bench_1b_gpu.txt" ;;
    *) echo "unknown part: $part (engine, graphs, serve)" >&2; exit 2 ;;
  esac
done
