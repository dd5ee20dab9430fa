#!/usr/bin/env bash
# The one-shot GPU check of issue 14: see scripts/device_check.py for what it runs.
#   scripts/device-check.sh              on the GPU machine (binary in device-bin/fitprune)
#   scripts/device-check.sh --dry-run    on the CPU with tiny shapes (CI)
# On the GPU machine the CUDA 13 libraries live in PyTorch's environment: put them on the
# loader path for the binary (cuBLAS, cuRAND, NVRTC; the driver brings libcuda).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${DEVICE_CHECK_PYTHON:-python3}
if [[ " $* " != *" --dry-run "* ]]; then
    libs=$("$py" - <<'PY' 2>/dev/null || true
import glob, os, site
dirs = set()
for root in site.getsitepackages():
    for lib in glob.glob(os.path.join(root, "nvidia", "**", "lib*.so*"), recursive=True):
        dirs.add(os.path.dirname(lib))
print(":".join(sorted(dirs)))
PY
)
    export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
exec "$py" scripts/device_check.py --python "$py" "$@"
