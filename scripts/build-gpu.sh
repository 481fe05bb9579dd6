#!/usr/bin/env bash
# Builds yoco's CUDA binaries here (no GPU needed) for the GPU machine (no Rust, no network):
# the gpu_bench and generate examples and the `cuda` integration-test binary, compressed into
# .gpu/ (git-ignored), which travels with the checkout; scripts/run-gpu.sh runs them there.
#
#   bash scripts/build-gpu.sh          # from anywhere in the checkout
#
# Needs the CUDA 13.0 build toolchain once per machine (nvcc, headers and link libraries from
# PyPI): bash ../shared/cuda/setup-toolchain.sh (or wherever the shared folder is), which writes
# ${YOCO_CUDA_DIR:-$HOME/.cache/yoco-cuda}/env.sh. The first build compiles candle's CUDA kernels
# with nvcc (about 10 minutes); later builds take a minute or two.
set -euo pipefail
cd "$(dirname "$0")/.."

ENV_SH="${YOCO_CUDA_DIR:-$HOME/.cache/yoco-cuda}/env.sh"
if [ ! -f "$ENV_SH" ]; then
  echo "build-gpu: no CUDA toolchain ($ENV_SH missing): run the shared cuda/setup-toolchain.sh first" >&2
  exit 1
fi
# shellcheck disable=SC1090
source "$ENV_SH"
export CARGO_TARGET_DIR=target-cuda   # keeps the CPU build in target/ untouched

echo "== cargo build --release --features cuda --example gpu_bench --example generate"
cargo build --release --features cuda --example gpu_bench --example generate

echo "== cargo test --release --features cuda --test cuda --no-run"
# The test binary's path (target-cuda/release/deps/cuda-<hash>) comes from cargo's JSON messages.
TEST_BIN=$(cargo test --release --features cuda --test cuda --no-run --message-format=json \
  | sed -n 's/.*"executable":"\([^"]*\/deps\/cuda-[0-9a-f]*\)".*/\1/p' | tail -n 1)
if [ -z "$TEST_BIN" ] || [ ! -x "$TEST_BIN" ]; then
  echo "build-gpu: could not find the cuda test binary in cargo's output" >&2
  exit 1
fi

rm -rf .gpu
mkdir -p .gpu
cp "$CARGO_TARGET_DIR/release/examples/gpu_bench" .gpu/gpu_bench
cp "$CARGO_TARGET_DIR/release/examples/generate" .gpu/generate
cp "$TEST_BIN" .gpu/cuda-tests
{
  echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ) from $(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
       "($(git status --porcelain 2>/dev/null | wc -l | tr -d ' ') uncommitted changes)"
  echo "CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-?} CUDARC_CUDA_VERSION=${CUDARC_CUDA_VERSION:-?}"
  (cd .gpu && sha256sum gpu_bench generate cuda-tests)
} > .gpu/MANIFEST
echo "== uncompressed"
ls -l .gpu
xz -f -T2 -6 .gpu/gpu_bench .gpu/generate .gpu/cuda-tests
echo "== compressed (.gpu travels with the checkout: keep it well under 64 MiB)"
ls -l .gpu
du -sh .gpu
