#!/usr/bin/env bash
# The one command for a lent GPU machine (docs/gpu.md). Phases in
# order of value, each in its own process under its own time limit, so that a
# crash, a sticky CUDA error or a hang in one still leaves the later phases
# and every log:
#   versions      what is installed; stops at once when the CUTLASS headers are missing
#   build         the extension, in place, for sm_90
#   smoke         every kernel family once at a ResNet-50 shape, a line each (benchmarks/smoke.py)
#   cuda_tests    the CUDA tests, verbose, CUDA_LAUNCH_BLOCKING=1, a time limit per test
#   memcheck      compute-sanitizer on a small model (benchmarks/memcheck.py)
#   triton_tests  the Triton tests, in parallel, autotuning off
#   bench         the benchmark with the time left: Triton autotuning off, torch.compile
#                 only when enough time is left, results saved after every layer
#   summary       last, since only the end of the output is shown
# Files in $OUT (at most 8 come back from the GPU machine): summary.txt, build.log,
# smoke.log, tests.log (cuda_tests, memcheck, triton_tests), bench.log, and the
# benchmark's cuda-<card>-<date>.json and .md.
#
#   bash benchmarks/stage_cutlass.sh   # here, once: the CUTLASS headers into .cutlass (carry it)
#   bash benchmarks/gpu_check.sh       # there
#
# Without a GPU it is a rehearsal: the same phases, the GPU-only parts skipped,
# the benchmark on the CPU at a tiny size. Environment: OUT (default
# benchmarks/out); CHECK_BUDGET_S (default 540, what the phase limits add up
# to); PHASES (default: all, in the order above); LIMIT_<PHASE> (seconds, e.g.
# LIMIT_BUILD=300); BENCH_ARGS (replaces the benchmark's model and batch
# settings); PYTHON.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/out}"
CHECK_BUDGET_S="${CHECK_BUDGET_S:-540}"
PHASES="${PHASES:-versions build smoke cuda_tests memcheck triton_tests bench summary}"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-16}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}"
# One Triton config per reduction walk instead of tuning all of them per shape.
export RESNET_FAST_TRITON_AUTOTUNE=0

mkdir -p "$OUT"
# The logs are appended to phase by phase: start them afresh (the benchmark
# rewrites its own results).
rm -f "$OUT"/{summary.txt,build.log,smoke.log,tests.log,bench.log}

wanted() { [[ " $PHASES " == *" $1 "* ]]; }
limit_of() { local var="LIMIT_${1^^}"; echo "${!var:-$2}"; }

# run_phase NAME LIMIT LOG COMMAND...: COMMAND in its own process group under
# `timeout` (which signals the whole group: pytest workers and subprocesses
# too), its output appended to $OUT/LOG; one line in summary.txt.
run_phase() {
    local name=$1 limit=$2 log=$3 start=$SECONDS rc verdict
    shift 3
    printf '\n== %s (at most %ss, log %s)\n' "$name" "$limit" "$OUT/$log"
    printf '\n== %s (at most %ss)\n' "$name" "$limit" >> "$OUT/$log"
    timeout --kill-after=5 "$limit" "$@" >> "$OUT/$log" 2>&1
    rc=$?
    case $rc in
        0) verdict="ok" ;;
        124|137) verdict="TIMED OUT at ${limit}s" ;;
        *) verdict="FAILED (exit $rc)" ;;
    esac
    printf '%-13s %-22s %4ss\n' "$name" "$verdict" "$((SECONDS - start))" >> "$OUT/summary.txt"
    tail -n 4 "$OUT/$log"
    echo "-> $name: $verdict"
}

has_gpu=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
has_module() { "$PY" -c "import $1" 2>/dev/null; }

if wanted versions; then
    echo "== versions"
    {
        echo "gpu_check $(date -u +%FT%TZ), budget ${CHECK_BUDGET_S}s, phases: $PHASES"
        timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -2
        timeout 60 "$PY" - <<'PY' 2>&1
import platform, setuptools, torch
line = f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), setuptools {setuptools.__version__}"
try:
    import triton
    line += f", triton {triton.__version__}"
except ImportError:
    line += ", triton missing"
print(line)
print("GPU:", f"{torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))})"
      if torch.cuda.is_available() else "none (a rehearsal: GPU-only parts are skipped)")
PY
        echo "nvcc: $(nvcc --version 2>/dev/null | tail -1 || echo missing)"
        echo "pytest plugins: xdist $(has_module xdist && echo yes || echo no), timeout $(has_module pytest_timeout && echo yes || echo no)"
    } | tee "$OUT/summary.txt"
    # The implicit GEMM needs CUTLASS's headers, and the GPU machine cannot
    # download them: staged here (.cutlass), or an explicit CUTLASS_PATH, or
    # the nvidia-cutlass wheel where it is installed.
    if [ -z "${CUTLASS_PATH:-}" ] && [ -d .cutlass/include ]; then export CUTLASS_PATH="$PWD/.cutlass"; fi
    header=cutlass/conv/device/implicit_gemm_convolution.h
    if [ -n "${CUTLASS_PATH:-}" ]; then
        found=$([ -f "$CUTLASS_PATH/include/$header" ] && echo "$CUTLASS_PATH/include")
    else
        found=$("$PY" -c "
import importlib.util, os
spec = importlib.util.find_spec('cutlass_library')
for base in (spec.submodule_search_locations if spec else []):
    include = os.path.join(base, 'source', 'include')
    if os.path.exists(os.path.join(include, '$header')):
        print(include)" 2>/dev/null)
    fi
    if [ -z "$found" ]; then
        echo "CUTLASS headers missing (CUTLASS_PATH=${CUTLASS_PATH:-unset}, no .cutlass/include, no nvidia-cutlass):" \
             "run 'bash benchmarks/stage_cutlass.sh' before sending the tree, and carry .cutlass" | tee -a "$OUT/summary.txt"
        exit 3
    fi
    echo "CUTLASS headers: $found" | tee -a "$OUT/summary.txt"
fi

if wanted build; then
    run_phase build "$(limit_of build 150)" build.log "$PY" setup.py build_ext --inplace
fi

if wanted smoke; then
    run_phase smoke "$(limit_of smoke 60)" smoke.log "$PY" -m benchmarks.smoke --timeout 40 --jobs 5
fi

pytest_args=(-p no:cacheprovider -ra)
has_module pytest_timeout && pytest_args+=(-p timeout --timeout=60)
if wanted cuda_tests; then
    CUDA_LAUNCH_BLOCKING=1 run_phase cuda_tests "$(limit_of cuda_tests 90)" tests.log \
        "$PY" -m pytest -v "${pytest_args[@]}" tests/test_cuda.py tests/test_cuda_conv.py tests/test_build.py
fi

if wanted memcheck; then
    if [ "$has_gpu" = 1 ]; then
        sanitizer="$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)"
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 run_phase memcheck "$(limit_of memcheck 60)" tests.log \
            "$sanitizer" --tool memcheck --error-exitcode 1 "$PY" -m benchmarks.memcheck
    else
        run_phase memcheck "$(limit_of memcheck 60)" tests.log "$PY" -c "print('memcheck: skipped, no CUDA GPU')"
    fi
fi

if wanted triton_tests; then
    workers=()
    has_module xdist && workers=(-n 8)
    run_phase triton_tests "$(limit_of triton_tests 80)" tests.log \
        "$PY" -m pytest -q "${pytest_args[@]}" "${workers[@]}" tests/test_triton.py
fi

if wanted bench; then
    # What is left of the budget, less the summary's few seconds.
    bench_s=$(limit_of bench $(( CHECK_BUDGET_S - SECONDS - 10 )))
    (( bench_s < 60 )) && bench_s=60
    if [ "$has_gpu" = 1 ]; then
        default_args="--device cuda --dtype bfloat16 --models resnet50 --batches 1,32,256 --batch 256 --train-batch 128"
        # Inductor compiles resnet50 several times (30-60 s each): only when there is time for them.
        (( bench_s < 300 )) && default_args+=" --no-compile"
    else
        default_args="--device cpu --models resnet18 --layers resnet18 --batch 1 --batches 1 --size 64 --train-batch 0 --no-compile --repeats 2"
    fi
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of words
    run_phase bench "$bench_s" bench.log "$PY" -m benchmarks --out "$OUT" --no-plot ${BENCH_ARGS:-$default_args}
fi

if wanted summary; then
    {
        echo
        echo "== smoke"
        grep -E "^(cutlass|cudnn|native|triton) .* (ok  |FAIL|CRASHED|TIMED OUT)|^smoke: [0-9]+ ok" "$OUT/smoke.log" 2>/dev/null
        echo
        echo "== tests"
        grep -E "^(FAILED|ERROR) |^=+ .*(passed|failed|error|skipped).* in [0-9.]+s|^memcheck: |ERROR SUMMARY" \
            "$OUT/tests.log" 2>/dev/null | head -40
        echo
        echo "== benchmark"
        # The per-layer summary, then the whole-model rows (eval and training).
        grep -h -E "^\| (model|contender|ours|folded|eager|conv\+|cudnn|resnet|wide)" "$OUT"/cuda-*.md "$OUT"/cpu-*.md \
            2>/dev/null | head -60
        echo
        echo "files: $(cd "$OUT" && ls | tr '\n' ' ')"
        echo "total: ${SECONDS}s of a ${CHECK_BUDGET_S}s budget"
    } >> "$OUT/summary.txt"
    echo
    echo "== summary ($OUT/summary.txt)"
    cat "$OUT/summary.txt"
fi
