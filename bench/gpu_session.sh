#!/usr/bin/env bash
# The first GPU session in one command (under 8 minutes on one H200), tables to $OUT when it is set.
#
#   bench/gpu_session.sh --download-wheels   # here, once, with network: bench/gpu_wheels.txt into .whl/
#   bench/gpu_session.sh                     # on the GPU machine (the device tool: carry .whl)
#   bench/gpu_session.sh --smoke             # anywhere, on the CPU: the same steps on a tiny config
#
# Steps, each under its own time limit so that one slow step cannot eat the session:
#   1. environment: nvidia-smi, python, torch/CUDA, transformers, whether torch.compile's toolchain is there;
#   2. bench.gpu: bare forward by dtype and batch size, automatic batch size, end to end (threshold 0, so
#      every query is kept and post-processed: instances per image are printed) against the bare forward;
#   3. bench.gpu --compile at one batch size (skipped with a line when the toolchain is missing);
#   4. bench.host_budget --model full: host CPU per image by stage around the real model (local disk, no Redis:
#      the GPU machine has no S3 server or redis-server), the old input path beside the new one.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=gpu
case "${1:-}" in
  --smoke) mode=smoke ;;
  --download-wheels) mode=download ;;
  "") ;;
  *) echo "usage: $0 [--smoke | --download-wheels]" >&2; exit 2 ;;
esac

if [ "$mode" = download ]; then
  mkdir -p .whl
  grep -v '^#' bench/gpu_wheels.txt | xargs python3 -m pip download -q --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl
  ls .whl
  exit 0
fi

out="${OUT:-$(mktemp -d)}"
mkdir -p "$out"
if [ "$mode" = gpu ] && compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/sam3-compile/inductor}"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/sam3-compile/triton}"

if [ "$mode" = smoke ]; then
  device=(--device cpu --smoke)
  main=(--dtypes float32,autocast-bf16 --batch-sizes 1,2 --e2e-images 4 --chunk-size 4 --io-workers 2
        --io-mode threads --photo-size 320x240 --min-seconds 0)
  compiled=()  # compiling on two shared CPU cores takes minutes: the smoke run proves the rest
  budget=(--model smoke --device cpu --services local --quick --images 4 --batch-size 2 --chunk-size 4
          --io-workers 2)
  limits=(120 240 0 240)
else
  device=(--device cuda)
  main=(--dtypes bfloat16,autocast-bf16,float16,float32 --batch-sizes 1,4,8,16,32 --e2e-images 128)
  compiled=(--compile --dtypes bfloat16 --batch-sizes 8 --e2e-images 64 --e2e-batch 8)
  budget=(--model full --device cuda --services local --quick --images 64 --io-workers 6)
  limits=(40 220 110 100)
fi

{
  echo "# GPU session $(date -u +%Y-%m-%dT%H:%MZ) ($mode)"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  else
    echo "nvidia-smi: not installed"
  fi
  timeout "${limits[0]}" python3 - <<'PY'
import sys, torch, transformers
from sam3_batch.worker.compile_toolchain import missing_for_compile
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"transformers {transformers.__version__}, cuda available: {torch.cuda.is_available()}")
device = "cuda" if torch.cuda.is_available() else "cpu"
print(f"torch.compile toolchain for {device}: {missing_for_compile(device) or 'complete'}")
PY
} 2>&1 | tee "$out/environment.txt"

status=0
timeout "${limits[1]}" python3 -m bench.gpu "${device[@]}" "${main[@]}" 2>&1 | tee "$out/gpu_bench.md" || status=$?
if [ "${#compiled[@]}" -gt 0 ]; then
  timeout "${limits[2]}" python3 -m bench.gpu "${device[@]}" "${compiled[@]}" 2>&1 | tee "$out/gpu_compile.md" \
    || echo "compiled run ended with status $?" | tee -a "$out/gpu_compile.md"
fi
timeout "${limits[3]}" python3 -m bench.host_budget "${budget[@]}" 2>&1 | tee "$out/host_budget.md" \
  || echo "host budget run ended with status $?" | tee -a "$out/host_budget.md"
echo "tables in $out"
exit "$status"
