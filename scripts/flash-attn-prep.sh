#!/usr/bin/env bash
# Supplies the CUTLASS headers that `candle-flash-attn` (the `flash-attn` feature) compiles its
# kernels against, without GitHub. Its build script (cudaforge) wants a git checkout of
# NVIDIA/cutlass at commit 7d49e6c7e2f8896c47f586706e67e1fb215529dc ("Updates for CUTLASS 3.5.0")
# in $CUDAFORGE_HOME/git/checkouts/cutlass-7d49e6c7e2f8896c and clones it from GitHub otherwise.
# The build machines reach PyPI, not GitHub, and PyPI's nvidia-cutlass 3.5.0.0 wheel ships that
# commit's include/ and tools/util/include/ byte for byte (checked on 2026-12-02 against a mirror
# of the repository: the digest below is of those 699 files at that commit). So this script
# unpacks the wheel there, checks the digest, and points the checkout's HEAD at the pinned
# commit, which is all cudaforge reads of it (`git rev-parse HEAD`).
#
#   CUDAFORGE_HOME  the cache root cudaforge reads (default /var/tmp/fitprune-cudaforge);
#                   export the same value for the cargo build.
set -euo pipefail
home="${CUDAFORGE_HOME:-/var/tmp/fitprune-cudaforge}"
commit=7d49e6c7e2f8896c47f586706e67e1fb215529dc
digest=783242f1b0ff544e2a75390bea25544014a3b84cf0dddd110048cd460abf8eda
wheel_sha=4ec3ab4820dd4ae3ebc2c5ddf23352b0dc90f779435284e7dce822006adc51f6
dir="$home/git/checkouts/cutlass-${commit:0:16}"

tree_digest() { (cd "$1" && find include tools/util/include -type f | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -d' ' -f1); }

if [ -d "$dir/include" ] && [ "$(git -C "$dir" rev-parse HEAD 2>/dev/null)" = "$commit" ] && [ "$(tree_digest "$dir")" = "$digest" ]; then
    echo "CUTLASS $commit already in $dir"
    exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --disable-pip-version-check --no-deps --dest "$tmp" nvidia-cutlass==3.5.0.0
whl=$(echo "$tmp"/nvidia_cutlass-3.5.0.0-*.whl)
[ "$(sha256sum "$whl" | cut -d' ' -f1)" = "$wheel_sha" ] || { echo "unexpected nvidia-cutlass wheel: $whl" >&2; exit 1; }
python3 -m zipfile -e "$whl" "$tmp/wheel"
src="$tmp/wheel/cutlass_library/source"
[ "$(tree_digest "$src")" = "$digest" ] || { echo "nvidia-cutlass 3.5.0.0 headers differ from CUTLASS $commit" >&2; exit 1; }
rm -rf "$dir" && mkdir -p "$dir/tools/util"
cp -r "$src/include" "$dir/include"
cp -r "$src/tools/util/include" "$dir/tools/util/include"
git -C "$dir" init --quiet
echo "$commit" >"$dir/.git/HEAD"
[ "$(git -C "$dir" rev-parse HEAD)" = "$commit" ]
echo "CUTLASS $commit (from nvidia-cutlass 3.5.0.0) in $dir"
