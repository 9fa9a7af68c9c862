#!/usr/bin/env bash
# Copies the CUTLASS headers of the installed nvidia-cutlass wheel into
# .cutlass/include and .cutlass/tools/util/include, for a machine that cannot pip install the wheel (the lent
# GPU machine has no network): send .cutlass with the working tree and
# gpu_check.sh builds the implicit-GEMM convolution from it.
set -euo pipefail
cd "$(dirname "$0")/.."
src="$(python - <<'PY'
import importlib.util, os
spec = importlib.util.find_spec("cutlass_library")
if spec is None:
    raise SystemExit("nvidia-cutlass is not installed: pip install --no-deps -r requirements/cutlass.txt")
print(os.path.join(spec.submodule_search_locations[0], "source"))
PY
)"
rm -rf .cutlass && mkdir -p .cutlass
cp -r "$src/include" .cutlass/include
mkdir -p .cutlass/tools/util
cp -r "$src/tools/util/include" .cutlass/tools/util/include
echo "CUTLASS headers in .cutlass/include ($(du -sh .cutlass | cut -f1))"
