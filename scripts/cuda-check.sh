#!/usr/bin/env bash
# `cargo check --features cuda` on a machine without a GPU, so CUDA-only code cannot rot
# (../shared/CUDA.md). Installs NVIDIA's nvcc 13.0 from PyPI into a venv outside the clone
# (FITPRUNE_CUDA_TOOLCHAIN, default /opt/cuda13) and checks into a target dir outside the clone
# (FITPRUNE_CUDA_TARGET_DIR), so candle-kernels' PTX build (~15 min on 2 cores) is paid once per
# machine rather than once per run. Nothing is linked: no driver library is needed.
set -euo pipefail
cd "$(dirname "$0")/.."
toolchain="${FITPRUNE_CUDA_TOOLCHAIN:-/opt/cuda13}"
target="${FITPRUNE_CUDA_TARGET_DIR:-/var/tmp/fitprune-cuda-check}"
if [ ! -x "$toolchain/bin/python" ] || ! ls "$toolchain"/lib/python3.*/site-packages/nvidia/cu13/bin/nvcc >/dev/null 2>&1; then
    echo "installing nvcc 13.0 from PyPI into $toolchain"
    python3 -m venv "$toolchain"
    "$toolchain/bin/pip" install --quiet --disable-pip-version-check \
        nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-crt==13.0.88 \
        'nvidia-cuda-cccl==13.0.*'
fi
cuda=$(echo "$toolchain"/lib/python3.*/site-packages/nvidia/cu13)
export PATH="$cuda/bin:$PATH" CUDA_COMPUTE_CAP=90 CUDA_ROOT="$cuda" CUDA_PATH="$cuda" CUDA_HOME="$cuda"
mkdir -p "$target"
CARGO_TARGET_DIR="$target" cargo check --locked --features cuda --lib --bins
