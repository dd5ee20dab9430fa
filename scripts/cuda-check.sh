#!/usr/bin/env bash
# `cargo check --features cuda` on a machine without a GPU, so CUDA-only code cannot rot
# (../shared/CUDA.md). Installs NVIDIA's nvcc 13.0 from PyPI into a venv outside the clone
# (FITPRUNE_CUDA_TOOLCHAIN, default /opt/cuda13) and checks into a target dir outside the clone
# (FITPRUNE_CUDA_TARGET_DIR), so candle-kernels' PTX build (~15 min on 2 cores) is paid once per
# machine rather than once per run. Nothing is linked: no driver library is needed.
#
# Then the `flash-attn` feature. Its dependency's build script compiles 53 flash-attention
# kernels (about 4 CPU minutes each here, some 3.5 CPU hours in all) and a check links nothing,
# so our code is type-checked against candle-flash-attn's real API with that build script
# replaced by a no-op, in a scratch copy of the tree (the patch rewrites Cargo.lock there, not
# here). Building the kernels for real: README, "GPU".
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

echo "flash-attn feature: type check against candle-flash-attn without compiling its kernels"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
cfa=$(cargo metadata --locked --format-version 1 --features flash-attn | python3 -c '
import json, sys
pkgs = json.load(sys.stdin)["packages"]
print(next(p["manifest_path"] for p in pkgs if p["name"] == "candle-flash-attn").rsplit("/", 1)[0])')
cp -r "$cfa" "$scratch/candle-flash-attn"
echo 'fn main() {}' >"$scratch/candle-flash-attn/build.rs"
# Without its build dependencies too: their features (anyhow's backtrace) would otherwise unify
# into candle-kernels' build script and rebuild its PTX (15 minutes) for nothing.
python3 - "$scratch/candle-flash-attn/Cargo.toml" <<'PY'
import sys
path, out, skip = sys.argv[1], [], False
for line in open(path).read().splitlines(keepends=True):
    if line.startswith("["):
        skip = line.startswith("[build-dependencies")
    if not skip:
        out.append(line)
open(path, "w").write("".join(out))
PY
mkdir "$scratch/tree"
git ls-files -z | xargs -0 cp --parents -t "$scratch/tree"
(cd "$scratch/tree" && CARGO_TARGET_DIR="$target" cargo check --features flash-attn --lib --bins \
    --config "patch.crates-io.candle-flash-attn.path='$scratch/candle-flash-attn'")
