"""Registers, stack, spills and static shared memory of every CUDA kernel,
as ptxas reports them, written to csrc/cuda/KERNELS.md.

Rebuilds the extension in place with ptxas in verbose mode (NVCC_APPEND_FLAGS)
and reads the per-kernel lines from the build log; ninja prints each
compile's output in one piece, so lines belong to the file compiled above
them. Needs nvcc, not a GPU:
    python scripts/kernel_report.py
"""
import glob
import os
import re
import subprocess
import sys
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPORT = os.path.join(ROOT, "csrc", "cuda", "KERNELS.md")

COMPILE = re.compile(r"^\[\d+/\d+\] .*nvcc .* -c (?:-c )?(\S+\.cu) ")
ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\d+a?)'")
FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers(?:, used \d+ barriers)?(?:, (\d+) bytes smem)?")


def build_log() -> str:
    # ninja rebuilds only what is out of date: drop the CUDA objects first.
    for obj in glob.glob(os.path.join(ROOT, "build", "temp*", "csrc", "cuda", "*.o")):
        os.remove(obj)
    env = dict(os.environ, NVCC_APPEND_FLAGS="-Xptxas=-v")
    cmd = [sys.executable, "setup.py", "build_ext", "--inplace"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"build failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout + done.stderr


def demangle(names):
    done = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
    return done.stdout.splitlines() if done.returncode == 0 else list(names)


# The first GemmShape in a CUTLASS kernel's mangled name is its block tile.
CUTLASS_TILE = re.compile(r"GemmShapeILi(\d+)ELi(\d+)ELi(\d+)E")


def short_name(mangled: str, demangled: str) -> str:
    """The kernel's name with its namespaces dropped and long template
    arguments elided; CUTLASS kernels, named by their whole type, by their
    block tile (M x N x reduction depth) and activation iterator."""
    name = re.sub(r"^void ", "", demangled)
    if "ConvUniversal" in mangled:  # the Hopper family: one tile shape, a kernel per dtype and activation
        dtype = "bfloat16" if "bfloat16_t" in mangled else "float16" if "half_t" in mangled else "?"
        activation = "ReLU" if "ReluKeepingNan" in mangled else "no activation"
        return f"cutlass sm90 conv, 128x128x64 tile, {dtype}, {activation}"
    if name.startswith(("cutlass::Kernel", "_ZN7cutlass6Kernel")):  # c++filt gives up on some of these
        tile = CUTLASS_TILE.search(mangled)
        shape = "x".join(tile.groups()) if tile else "?"
        iterator = "FixedChannels" if "FixedChannels" in mangled else "Optimized"
        return f"cutlass implicit GEMM, {shape} tile, {iterator} iterator"
    name = name.replace("resnet_fast::gpu::", "").replace("(anonymous namespace)::", "")
    name = re.sub(r"\(.*\)$", "", name)
    return name if len(name) <= 100 else name[:97] + "..."


def parse(log: str):
    rows = defaultdict(dict)  # (file, kernel, arch) -> properties
    source, key = None, None
    for line in log.splitlines():
        if (m := COMPILE.search(line)):
            source = os.path.relpath(m.group(1), ROOT)
        elif (m := ENTRY.search(line)) and source:
            key = (source, m.group(1), m.group(2))
        elif (m := FRAME.search(line)) and key:
            rows[key].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif (m := USED.search(line)) and key:
            rows[key].update(registers=int(m.group(1)), smem=int(m.group(2) or 0))
    return rows


def write(rows) -> None:
    keys = sorted(rows)
    names = dict(zip((k[1] for k in keys), demangle([k[1] for k in keys])))
    lines = [
        "# CUDA kernel resources",
        "",
        "What ptxas reports for every kernel of the extension (regenerate with",
        "`python scripts/kernel_report.py`). Spills are local-memory traffic the",
        "register allocator added; every count here should stay 0. Static shared",
        "memory excludes dynamic shared memory: the implicit-GEMM convolution",
        "(csrc/cuda/conv_cutlass.cuh) runs 128 threads per block and takes 4",
        "stages of a 128-pixel and a 128- or 64-channel tile, each 64 bytes deep",
        "in the reduction (32 16-bit or 16 TF32 values): 64 KiB per block for",
        "128x128 tiles, 48 KiB for 128x64. The Hopper convolution",
        "(csrc/cuda/conv_cutlass_sm90.cuh) runs 256 threads (a producer and a",
        "consumer warp group) on as many pipeline stages as fit beside its",
        "epilogue, all in dynamic shared memory; its sm_80 build is an empty",
        "stub (CUTLASS compiles its body for sm_90a only).",
        "",
        "| source | kernel | arch | registers | stack (B) | spill stores (B) | spill loads (B) | static smem (B) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key in keys:
        source, mangled, arch = key
        r = rows[key]
        lines.append(f"| {source} | `{short_name(mangled, names[mangled])}` | {arch} | {r.get('registers', '?')} | "
                     f"{r.get('stack', '?')} | {r.get('spill_stores', '?')} | {r.get('spill_loads', '?')} | "
                     f"{r.get('smem', 0)} |")
    with open(REPORT, "w") as f:
        f.write("\n".join(lines) + "\n")
    spilled = [k for k in keys if rows[k].get("spill_stores") or rows[k].get("spill_loads")]
    print(f"{len(keys)} kernel builds, {len(spilled)} with spills; written to {os.path.relpath(REPORT, ROOT)}")


if __name__ == "__main__":
    write(parse(build_log()))
