#!/usr/bin/env bash
# Prepared GPU benchmark, one command on a CUDA host; every figure and log line lands in $OUT.
#
#   bash benchmarks/gpu_wheels.sh                 # here, with the registry: wheels into .whl/ (if the host is offline)
#   OUT=/tmp/out bash benchmarks/gpu_bench.sh     # there (default OUT: benchmarks/out/gpu, git-ignored)
#
# Python: on a CUDA host with .whl/ present the host's own python3 (its PyTorch) runs, the wheels
# installed beside it in /tmp/plm-site; else (and always with DEVICE=cpu) .venv/bin/python; else
# scripts/setup.sh makes .venv (needs the registry).
# Parts ($PARTS, default "engine check serve", most important first), each under its own time limit
# so one stuck part cannot eat the others':
#   engine  the `1b` preset (PLM-1B dimensions, random weights) in bf16: benchmarks/bench_engine.py,
#           eager and CUDA-graph decode against HF generate one request at a time (limit 300 s)
#   check   the `bench` preset in fp32 on the GPU: CUDA-graph decode vs eager vs HF generate, token
#           for token (fp32, so all three should agree), plus the tests with a CUDA variant (180 s)
#   serve   benchmarks/serve_bench.py over HTTP on the 1b preset: plm-serve vs the HF baseline server (200 s)
# With setup and checkpoint builds that can exceed one 10-minute device call, so on a lent H200 run
# PARTS="engine check" first (timeout_s ~560, carry .whl) and PARTS=serve right after, while the
# machine is still warm. DEVICE=cpu DTYPE=float32 PRESET=bench runs the same plumbing on a CPU (a dry
# run: 8 serving prompts instead of 32, and every part's time limit 4x, since a CPU is that slow).
# $OUT gets two files, rewritten after each part: gpu_bench.log (everything printed) and results.tgz
# (each part's output and JSON, env.txt, summary.txt, the serving report and plots), since a device
# call brings back only a few files; $WORK holds them unpacked.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(mkdir -p "${OUT:-benchmarks/out/gpu}" && cd "${OUT:-benchmarks/out/gpu}" && pwd)
WORK=${WORK:-/tmp/plm-gpu-bench}
rm -rf "$WORK" && mkdir -p "$WORK"
PARTS=${PARTS:-engine check serve}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bfloat16}
PRESET=${PRESET:-1b}
if [ "$DEVICE" = cpu ]; then SLOW=4 PROMPTS=${PROMPTS:-8}; else SLOW=1 PROMPTS=${PROMPTS:-32}; fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
exec > >(tee -a "$OUT/gpu_bench.log") 2>&1
echo "== $(date -u +%FT%TZ) gpu_bench: parts [$PARTS] on $DEVICE $DTYPE, preset $PRESET"

if [ -d .whl ] && [ "$DEVICE" = cuda ]; then  # the wheels are for the GPU host's Python
  PY=${PY:-python3}
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/plm-site .whl/*.whl
  export PYTHONPATH=/tmp/plm-site:$PWD${PYTHONPATH:+:$PYTHONPATH}
elif [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
else
  bash scripts/setup.sh
  PY=.venv/bin/python
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
DEVICE=$DEVICE $PY - <<'EOF' | tee "$WORK/env.txt"
import os, platform, sys
import torch, torchvision, transformers, timm, fastapi, uvicorn, pydantic, av, httpx, matplotlib
print("python", platform.python_version(), sys.executable)
for mod in (torch, torchvision, transformers, timm, fastapi, uvicorn, pydantic, av, httpx):
    print(f"{mod.__name__} {mod.__version__}")
try:  # structured outputs only: its absence must not stop the benchmark
    import xgrammar  # noqa: F401  (it has no __version__: the installed distribution's is used)
    from importlib.metadata import version
    print(f"xgrammar {version('xgrammar')}")
except Exception as e:
    print(f"xgrammar does not import: {e!r}")
if os.environ["DEVICE"] == "cuda":
    assert torch.cuda.is_available(), "no CUDA device"
    p = torch.cuda.get_device_properties(0)
    print(f"gpu {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, CUDA {torch.version.cuda}")
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv \
  | tee -a "$WORK/env.txt" || true

checkpoint() {  # checkpoint PRESET -> prints its directory, building it once
  local dir=${CKPT_ROOT:-/tmp/plm-serve-ckpt}/$1
  if [ ! -f "$dir/config.json" ]; then
    local t0=$SECONDS
    $PY -m plm_core.testing.make_checkpoint --preset "$1" --out "$dir" --overwrite >&2
    echo "built the $1 checkpoint in $((SECONDS - t0)) s" >&2
  fi
  echo "$dir"
}

run_part() {  # run_part NAME SECONDS CMD...: a part's failure or timeout is logged, the next part still runs
  local name=$1 limit=$2 t0=$SECONDS rc=0
  shift 2
  echo "== part $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$WORK/$name.txt" || rc=$?
  echo "== part $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$WORK/summary.txt"
  tar -czf "$OUT/results.tgz" -C "$WORK" .
}

for part in $PARTS; do
  case $part in
    check)
      small=$(checkpoint bench)
      run_part check "${CHECK_LIMIT:-$((120 * SLOW))}" $PY benchmarks/bench_engine.py --checkpoint "$small" --device "$DEVICE" \
        --dtype float32 --concurrency 4 --max-tokens 48 --itl-streams 4 --cuda-graphs both --out "$WORK/check.json"
      run_part cuda-tests "${CUDA_TESTS_LIMIT:-$((60 * SLOW))}" $PY -m pytest -q -p no:cacheprovider -rs tests/test_sampler.py \
        tests/test_engine.py tests/test_structured_output.py -k "cuda or profile or budget" ;;
    engine)
      big=$(checkpoint "$PRESET")
      run_part engine "${ENGINE_LIMIT:-$((300 * SLOW))}" $PY benchmarks/bench_engine.py --checkpoint "$big" --device "$DEVICE" \
        --dtype "$DTYPE" --concurrency 16 --max-tokens 128 --chunk 2048 --encoder-tiles 16 --throughput-chunk 8192 \
        --cuda-graphs both --out "$WORK/engine.json" ;;
    serve)
      big=$(checkpoint "$PRESET")
      run_part serve "${SERVE_LIMIT:-$((200 * SLOW))}" $PY benchmarks/serve_bench.py --launch plm-serve --launch hf-baseline \
        --model "$big" --device "$DEVICE" --num-prompts "$PROMPTS" --image-detail auto --num-frames 16 --max-tokens 64 \
        --concurrency 1,16 --baseline-concurrency 1 --no-progress --out "$WORK/serve" \
        --note "$(head -c 300 "$WORK/env.txt" | tr '\n' ' ')" ;;
    *) echo "unknown part: $part (check, engine, serve)" >&2; exit 2 ;;
  esac
done
echo "== $(date -u +%FT%TZ) done"; cat "$WORK/summary.txt"
