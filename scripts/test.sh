#!/usr/bin/env bash
# Install what the tests need, build resnet_fast with its compiled extension
# (CUDA kernels too when torch is a CUDA build and nvcc is found), run the tests.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet -r requirements/test.txt
python -m pip install --quiet --no-deps -r requirements/cutlass.txt
python -m pip install --quiet --no-build-isolation -e .
python -m pytest "$@"
