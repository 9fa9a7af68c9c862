#!/usr/bin/env bash
# The test suite once more, on this machine's CPU, against the lent GPU
# machine's versions (requirements/gpu-machine.txt: torch 2.11, triton 3.6,
# torchvision 0.26, an old setuptools; Python 3.12 where this machine has
# it), with the extension built against them the way benchmarks/gpu_check.sh
# builds it there. Code that only works on newer releases fails here instead
# of costing GPU minutes. CI runs it after the README's test command; extra
# arguments go to pytest.
#
# Its own virtual environment (GPU_VERSIONS_VENV, default build/venv-gpu-versions,
# kept between runs) and its own copy of the source tree (build/gpu-versions-tree),
# so the extension built here never replaces the one in the working tree.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${GPU_VERSIONS_VENV:-build/venv-gpu-versions}"
tree=build/gpu-versions-tree

# The GPU machine runs Python 3.12: so does this venv, where this machine has
# one (GPU_VERSIONS_PYTHON names another).
base=""
for candidate in "${GPU_VERSIONS_PYTHON:-}" python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12 python3 python; do
    if [ -n "$candidate" ] && "$candidate" -c "import venv" 2>/dev/null; then base=$candidate; break; fi
done
[ -x "$venv/bin/python" ] || "$base" -m venv "$venv"
python="$(cd "$venv" && pwd)/bin/python"
"$python" -m pip install --quiet -r requirements/gpu-machine.txt
"$python" -m pip install --quiet --no-deps -r requirements/cutlass.txt
"$python" - <<'PY'
import platform, setuptools, torch, torchvision, triton
print(f"GPU machine's versions: Python {platform.python_version()}, torch {torch.__version__}, "
      f"triton {triton.__version__}, torchvision {torchvision.__version__}, setuptools {setuptools.__version__}")
PY

# The tracked and the new (not ignored) files of the working tree.
rm -rf "$tree" && mkdir -p "$tree"
git ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done | xargs -0 cp --parents -t "$tree"
cd "$tree"
# The GPU machine builds for its own card only (gpu_check.sh): sm_90.
TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}" "$python" setup.py build_ext --inplace \
    > build.log 2>&1 || { tail -40 build.log; echo "build against the GPU machine's versions failed"; exit 1; }
"$python" -m pytest -p no:cacheprovider "$@"
