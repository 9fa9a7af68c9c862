#!/usr/bin/env bash
# Install, build, and run the benchmarks on whatever device this machine has
# (CPU here; a CUDA GPU when one is visible). Extra arguments go to
# `python -m benchmarks` (see --help); results land in benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet -r requirements/bench.txt
python -m pip install --quiet --no-deps -r requirements/cutlass.txt
python -m pip install --quiet --no-build-isolation -e .
python -m benchmarks "$@"
