#!/usr/bin/env bash
# The package as a user receives it: an sdist made from this tree, a wheel
# built from that sdist alone (so the sdist holds every source the build
# needs) with `pip wheel --no-build-isolation`, the wheel holding the compiled
# extension, and the wheel installed into a new virtual environment that sees
# the builder's torch, where it imports and runs its CPU kernels from outside
# the source tree.
#
#   bash scripts/check_wheel.sh [PYTHON]
#
# PYTHON (default: python) has torch installed; CI runs it with the GPU
# machine's versions (Python 3.12 and setuptools 69, older than 77 and 70.1). The
# extension is built without its CUDA sources (RESNET_FAST_CPU_ONLY=1): the
# packaging is the same, and the CUDA build is what the test command's
# install checks.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${1:-python}"
work="$(pwd)/build/wheel-check"
rm -rf "$work" && mkdir -p "$work/dist"

# The README's first install line, less torch (already there).
"$python" -m pip install --quiet ninja "setuptools>=64" wheel
"$python" setup.py -q sdist --dist-dir "$work/dist" > "$work/sdist.log" 2>&1 ||
    { tail -30 "$work/sdist.log"; echo "sdist failed"; exit 1; }
sdist=$(ls "$work"/dist/resnet_fast-*.tar.gz)
tar -xzf "$sdist" -C "$work"
unpacked=$(ls -d "$work"/resnet_fast-*/)

RESNET_FAST_CPU_ONLY=1 "$python" -m pip wheel --quiet --no-build-isolation --no-deps \
    --wheel-dir "$work/dist" "$unpacked" > "$work/wheel.log" 2>&1 ||
    { tail -40 "$work/wheel.log"; echo "building a wheel from the sdist failed"; exit 1; }
wheel=$(ls "$work"/dist/resnet_fast-*.whl)

# A venv of its own, seeing the builder's site-packages (its torch) after its own.
"$python" -m venv "$work/venv"
site_of() { "$1" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"; }
site_of "$python" > "$(site_of "$work/venv/bin/python")/builder-site-packages.pth"
"$work/venv/bin/python" -m pip install --quiet --no-deps "$wheel"

cd "$work"  # away from the source tree, which must not be what gets imported
"$work/venv/bin/python" - "$wheel" <<'PY'
import os, sys, zipfile

wheel = sys.argv[1]
names = zipfile.ZipFile(wheel).namelist()
extension = [n for n in names if n.startswith("resnet_fast/_C") and n.endswith((".so", ".pyd"))]
assert extension, f"{os.path.basename(wheel)} has no compiled extension: {names}"
assert "resnet_fast/py.typed" in names, "py.typed is missing from the wheel"

import torch
import resnet_fast
from resnet_fast import ops, reference

home = os.path.dirname(resnet_fast.__file__)
assert home.startswith(sys.prefix), f"resnet_fast was imported from {home}, not from the wheel's install"
native = resnet_fast.available_backends()["native"]
assert native.available, f"the wheel's extension does not load: {native}"
x = torch.randn(2, 5, 9, 7)
w = torch.randn(6, 5, 3, 3)
b = torch.randn(6)
out = ops.conv_bias_act(x, w, b, stride=2, padding=1, backend="native")
torch.testing.assert_close(out, reference.conv_bias_act(x, w, b, stride=(2, 2), padding=(1, 1)))
print(f"wheel check: {os.path.basename(wheel)} ({len(names)} files, extension {extension[0]}) "
      f"installs and runs with torch {torch.__version__}")
PY
test -x "$work/venv/bin/resnet-fast" && "$work/venv/bin/resnet-fast" --help > /dev/null
echo "wheel check passed"
