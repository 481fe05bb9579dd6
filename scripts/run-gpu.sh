#!/usr/bin/env bash
# Runs on the GPU machine (one H100/H200, CUDA 13 libraries, no Rust, no network), from the
# checkout root, the binaries scripts/build-gpu.sh put in .gpu/:
#   1. nvidia-smi (GPU name, memory, driver);
#   2. the `cuda` integration tests (CUDA vs the reference and the CPU, f32/bf16/f16);
#   3. `generate` on CUDA (bf16) with the gret test fixture, a Phi-4-mini-flash fixture, and
#      models/shakespeare if present (also with its projections quantized to Q8_0);
#   4. gpu_bench: YOCO-3B-shaped model vs its Transformer twin at 4K/32K/128K tokens.
# Every log and JSON file goes to $OUT (default ./gpu-out). Each step is time-boxed, so the whole
# run stays under about 8 minutes even if something hangs (typically 2-4 minutes); a failing step
# does not stop the next one. Exit status: 0 when every step succeeded, else 1.
#
#   OUT=/some/dir bash scripts/run-gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./gpu-out}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
T_START=$(date +%s)
note() { echo "$*" | tee -a "$SUMMARY"; }

export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/nvidia/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
# The first CUDA use in a process JIT-compiles candle's PTX (~15 s); the driver caches the result
# on disk, so later processes start fast. Keep the cache large enough for all of candle's kernels.
export CUDA_CACHE_PATH=${CUDA_CACHE_PATH:-${TMPDIR:-/tmp}/yoco-cuda-jit-cache}
export CUDA_CACHE_MAXSIZE=${CUDA_CACHE_MAXSIZE:-2147483648}
export RUST_BACKTRACE=1

# Decompress into a scratch folder (.gpu stays as it came, so the script can be rerun).
BIN=${TMPDIR:-/tmp}/yoco-gpu-bin
rm -rf "$BIN" && mkdir -p "$BIN"
for f in gpu_bench generate cuda-tests; do
  if [ -f ".gpu/$f.xz" ]; then
    xz -dc ".gpu/$f.xz" > "$BIN/$f" && chmod +x "$BIN/$f"
  elif [ -f ".gpu/$f" ]; then
    cp ".gpu/$f" "$BIN/$f" && chmod +x "$BIN/$f"
  else
    note "missing .gpu/$f(.xz): run scripts/build-gpu.sh on the build machine and carry .gpu"
  fi
done
[ -f .gpu/MANIFEST ] && cp .gpu/MANIFEST "$OUT/MANIFEST" && note "binaries: $(head -n 1 .gpu/MANIFEST)"

FAILED=0
# step NAME TIMEOUT_S LOG COMMAND...: runs COMMAND with a time limit, output to LOG and the console.
step() {
  local name=$1 limit=$2 log=$3
  shift 3
  local t0 rc
  t0=$(date +%s)
  echo "=== $name (limit ${limit}s): $*" | tee "$log"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  [ "$rc" -ne 0 ] && FAILED=1
  local what="ok"
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && what="TIMED OUT"
  [ "$rc" -ne 0 ] && [ "$what" = ok ] && what="FAILED"
  note "$(printf '%-28s %-9s rc=%-3s %4ss  %s' "$name" "$what" "$rc" "$(( $(date +%s) - t0 ))" "$log")"
}

# 1. The GPU.
{
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.max.memory --format=csv
  echo
  nvidia-smi
} > "$OUT/nvidia-smi.txt" 2>&1
note "gpu: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -n 1)"

# 2. Correctness on CUDA (YOCO_REQUIRE_CUDA: a missing GPU is a failure here, not a skip).
YOCO_REQUIRE_CUDA=1 step "cuda tests" 120 "$OUT/cuda-tests.log" \
  "$BIN/cuda-tests" --test-threads=1 --nocapture

# 3. generate on CUDA, bf16: the gret fixture (no tokenizer: token ids in and out).
PROMPT=3,17,42,99,7,128,200,5,64,33,250,11,90,150,77,21
step "generate gret bf16" 40 "$OUT/generate-gret-bf16.log" \
  "$BIN/generate" --model tests/fixtures/gret --device cuda --dtype bf16 \
  --prompt-tokens "$PROMPT" --max-new-tokens 64 --greedy --json
grep '^{' "$OUT/generate-gret-bf16.log" > "$OUT/generate-gret-bf16.json" 2>/dev/null || true
if [ -d models/shakespeare ]; then
  step "generate shakespeare bf16" 40 "$OUT/generate-shakespeare-bf16.log" \
    "$BIN/generate" --model models/shakespeare --device cuda --dtype bf16 \
    --prompt "ROMEO." --max-new-tokens 200 --seed 7
  # The same with the projections quantized to Q8_0 (candle's CUDA quantized kernels).
  step "generate shakespeare q8_0" 40 "$OUT/generate-shakespeare-q8_0.log" \
    "$BIN/generate" --model models/shakespeare --device cuda --dtype bf16 --quant q8_0 \
    --prompt "ROMEO." --max-new-tokens 200 --seed 7
fi

# 3b. Phi-4-mini-flash (the reference's 12-layer fixture) through generate on CUDA, bf16; its
# exactness in f32 and bf16 is in the cuda tests above.
step "generate phi4flash bf16" 40 "$OUT/generate-phi4flash-bf16.log" \
  "$BIN/generate" --model tests/fixtures/phi4flash/b_l12_w8 --device cuda --dtype bf16 \
  --prompt-tokens "$PROMPT" --max-new-tokens 64 --greedy --json

# 4. The benchmark (its own time budget ends new runs after 180 s; the limit is the backstop).
step "gpu_bench" 260 "$OUT/bench.log" \
  "$BIN/gpu_bench" --json "$OUT/bench.json" --markdown "$OUT/bench.md" --time-budget-s 180

note "total $(( $(date +%s) - T_START ))s; logs and JSON in $OUT"
[ -f "$OUT/bench.md" ] && cat "$OUT/bench.md"
exit "$FAILED"
