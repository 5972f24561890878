#!/usr/bin/env bash
# The GPU check of the one-forward issue, prepared to run once on a machine with one H100/H200, < 8 min:
#   1. CUDA tests (tests/test_cuda.py): bf16 grouped-GEMM MoE vs the per-expert loop and the formula,
#      the engine on CUDA vs the CPU engine, compiled decode (CUDA graphs) vs eager on the GPU;
#   2. decode tok/s at batch 1/8/64 for `small` and a ~1B config, eager and compiled, vs the HBM roofline;
#   3. a training step (AdamW, bf16 autocast) of `small`.
# Usage (from the repository root):  bash benchmarks/gpu_check.sh [OUT_DIR]
#   PYTHON=... a Python whose torch has CUDA (default: .venv/bin/python if it has CUDA, else python3)
# Every part has its own time limit and prints its table rows as they finish; a part that fails or
# times out is reported and the next one runs. Output: OUT_DIR/gpu_check.md (default: gpu_check_out).
set -u
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check_out}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.md"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$PWD/$OUT/inductor}"

has_cuda() { "$1" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; }
CANDIDATES=${PYTHON:-".venv/bin/python python3"}
PYTHON=
for py in $CANDIDATES; do
  if command -v "$py" >/dev/null && has_cuda "$py"; then PYTHON=$py; break; fi
done
if [ -z "$PYTHON" ]; then
  for py in $CANDIDATES; do
    command -v "$py" >/dev/null && "$py" -c 'import torch; print(f"gpu_check: torch {torch.__version__} (CUDA build: {torch.version.cuda}) sees no CUDA device; nothing to check")' 2>/dev/null && exit 0
  done
  echo "gpu_check: none of ($CANDIDATES) imports torch; set PYTHON to a Python with a CUDA build of torch"
  exit 0
fi

START=$(date +%s)
part() {  # part NAME SECONDS COMMAND...: run with a time limit, tee into the log, report how it ended
  local name=$1 limit=$2; shift 2
  echo -e "\n## $name\n" | tee -a "$LOG"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then echo "($name stopped at its ${limit} s limit; rows above are complete)" | tee -a "$LOG"
  elif [ "$rc" != 0 ]; then echo "($name failed with exit code $rc)" | tee -a "$LOG"; fi
}

{
  echo "# stepflash GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
  "$PYTHON" -c 'import torch; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}, capability {torch.cuda.get_device_capability()}")'
  "$PYTHON" -c 'import triton; print(f"triton {triton.__version__}")' 2>/dev/null || echo "triton missing: compiled decode runs eager"
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null
} | tee "$LOG"

part "CUDA tests" 120 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_cuda.py
part "decode: small" 140 "$PYTHON" benchmarks/gpu_bench.py decode --config small --batches 1 8 64
part "decode: ~1B" 140 "$PYTHON" benchmarks/gpu_bench.py decode --config 1b --batches 1 64
part "training step: small" 40 "$PYTHON" benchmarks/gpu_bench.py train --config small --batch 8 --seq 512
echo -e "\ntotal $(( $(date +%s) - START )) s; results in $LOG" | tee -a "$LOG"
