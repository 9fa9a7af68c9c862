"""The Triton kernels compiled ahead of time for NVIDIA GPU architectures,
on a machine without a GPU: what every launchable specialisation needs and
what it became (shared memory, registers, local memory, whether tl.dot
lowered to Hopper's wgmma or to mma.sync).

    python -m resnet_fast.kernels.triton.aot            # sm_90 and sm_80, table on stdout
    python -m resnet_fast.kernels.triton.aot --markdown resnet_fast/kernels/triton/KERNELS.md --json out.json

The launches are the launchers' own: each launcher runs on fake CUDA
tensors at a ResNet-50 layer's shape with its launches recorded instead of
made, so the argument types, constexprs and launch options are exactly
those a GPU run would compile; an autotuned kernel contributes every config
it can pick. Needs triton, not a GPU, and TRITON_INTERPRET unset (the
interpreter has nothing to compile).
"""
import argparse
import contextlib
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, List, NamedTuple, Optional

import torch
import triton

from . import batch_norm, conv, epilogue
from .runtime import INTERPRET

# The modules whose launchers launch kernels (each imports runtime.traceable).
LAUNCHING_MODULES = (conv, batch_norm, epilogue)

# Largest shared memory one block may use (opt-in dynamic shared memory).
SHARED_MEMORY_LIMIT = {80: 166912, 90: 232448}
ARCH_NAMES = {80: "sm_80 (A100)", 90: "sm_90 (H100, H200)"}

_TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64",
                 torch.int32: "i32"}


class Specialization(NamedTuple):
    """One compile: a kernel, the call it came from, one launch config and
    the architecture it is compiled for."""
    arch: int
    case: str
    dtype: str
    kernel: str
    config: str
    args: Dict[str, object]  # argument name -> a tensor's Triton pointer type, or the scalar value
    constexprs: Dict[str, object]
    num_warps: int
    num_stages: int
    uses_dot: bool  # whether the kernel multiplies matrices (tl.dot)


# ------------------------------------------------------------ recording

class _Recorder:
    """Stands in for traceable(kernel): kernel[grid](...) records one
    Specialization per config the launch could run with."""

    def __init__(self, kernel, sink: List[Specialization], arch: int, case: str, dtype: str):
        self.kernel, self.sink, self.arch, self.case, self.dtype = kernel, sink, arch, case, dtype

    def __getitem__(self, grid):
        return self.launch

    def launch(self, *args, **kwargs):
        autotuned = isinstance(self.kernel, triton.runtime.autotuner.Autotuner)
        fn = self.kernel.fn if autotuned else self.kernel
        options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
        bound = dict(zip(fn.arg_names, args), **kwargs)
        if autotuned:
            configs = [(dict(c.kwargs), c.num_warps, c.num_stages) for c in self.kernel.configs]
        else:
            configs = [({}, options.get("num_warps", 4), options.get("num_stages", 3))]
        for meta, num_warps, num_stages in configs:
            values = dict(bound, **meta)
            constexprs = {p.name: values[p.name] for p in fn.params if p.is_constexpr}
            args = {p.name: _argument_type(values[p.name]) for p in fn.params if not p.is_constexpr}
            self.sink.append(Specialization(
                self.arch, self.case, self.dtype, fn.__name__, _config_label(meta, num_warps, num_stages), args, constexprs,
                num_warps, num_stages, "tl.dot" in fn.src or ".dot(" in fn.src,
            ))


def _argument_type(value):
    if isinstance(value, torch.Tensor):
        return "*" + _TRITON_TYPES[value.dtype]
    return value


def _config_label(meta: Dict, num_warps: int, num_stages: int) -> str:
    tile = "x".join(str(meta[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if k in meta)
    return f"{tile + ' ' if tile else ''}w{num_warps} s{num_stages}"


@contextlib.contextmanager
def _recording(sink: List[Specialization], arch: int, case: str, dtype: str):
    """Launches recorded, not made, as on a GPU of compute capability arch
    (the launchers pick their configs by it)."""
    saved = [module.traceable for module in LAUNCHING_MODULES], conv.capability
    for module in LAUNCHING_MODULES:
        module.traceable = lambda kernel: _Recorder(kernel, sink, arch, case, dtype)
    conv.capability = lambda device: divmod(arch, 10)
    try:
        yield
    finally:
        for module, original in zip(LAUNCHING_MODULES, saved[0]):
            module.traceable = original
        conv.capability = saved[1]


def _conv_calls(fake):
    """The convolution's two reduction walks at ResNet layers (batch 32):
    the 7x7/2 RGB stem walks the flat reduction, a 1x1 bottleneck conv with
    its residual the channel blocks, and so does a 3x3 conv of
    ResNeXt-50 32x4d's layer4 (32 channels per group: too shallow for a
    16-bit weight tile by TMA, which the others get on sm_90)."""
    def stem(dtype):
        x, w, b = fake(32, 3, 224, 224, dtype=dtype), fake(64, 3, 7, 7, dtype=dtype), fake(64, dtype=dtype)
        conv.conv_bias_act(x, w, b, None, [2, 2], [3, 3], [1, 1], 1, True)

    def expand(dtype):
        x, w, b = fake(32, 64, 56, 56, dtype=dtype), fake(256, 64, 1, 1, dtype=dtype), fake(256, dtype=dtype)
        conv.conv_bias_act(x, w, b, fake(32, 256, 56, 56, dtype=dtype), [1, 1], [0, 0], [1, 1], 1, True)

    def grouped(dtype):
        x, w, b = fake(32, 1024, 7, 7, dtype=dtype), fake(1024, 32, 3, 3, dtype=dtype), fake(1024, dtype=dtype)
        conv.conv_bias_act(x, w, b, None, [1, 1], [1, 1], [1, 1], 32, True)

    return {"stem 7x7/2, C=3 (flat reduction)": stem, "1x1 + residual, C=64 (channel blocks)": expand,
            "3x3, 32 groups of 32 channels (channel blocks)": grouped}


def _per_channel_calls(fake):
    """BatchNorm and the bias/ReLU backward at a bottleneck's 256 channels
    and at 3 channels (the narrowest channel tile)."""
    calls = {}
    for channels in (256, 3):
        def train(dtype, c=channels):
            x = fake(32, c, 56, 56, dtype=dtype)
            batch_norm.bn_act_train(x, fake(c), fake(c), fake(32, c, 56, 56, dtype=dtype), 1e-5, True)

        def backward(dtype, c=channels):
            x = fake(32, c, 56, 56, dtype=dtype)
            batch_norm.bn_act_backward(x, x, x, fake(c), fake(c), fake(c), True)
            epilogue.bias_act_backward(x, x, True)

        calls[f"bn_act_train + residual, C={channels}"] = train
        calls[f"bn_act_backward and bias_act_backward, C={channels}"] = backward
    return calls


def specializations(archs=(90, 80)) -> List[Specialization]:
    """Every kernel x launch config x dtype the launchers can run on each
    architecture, recorded from the launchers on fake CUDA tensors."""
    if INTERPRET:
        raise RuntimeError("TRITON_INTERPRET=1 is set: the kernels are interpreted, there is nothing to compile")
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()

    def fake(*shape, dtype=torch.float32):
        with mode:
            t = torch.empty(shape, device="cuda", dtype=dtype)
            return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t

    conv_dtypes = {"float32": (torch.float32, False), "float32 (TF32)": (torch.float32, True),
                   "float16": (torch.float16, False), "bfloat16": (torch.bfloat16, False)}
    other_dtypes = {"float32": (torch.float32, False), "float16": (torch.float16, False),
                    "bfloat16": (torch.bfloat16, False)}
    found: List[Specialization] = []
    saved_tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        for arch in archs:
            for calls, dtypes in ((_conv_calls(fake), conv_dtypes), (_per_channel_calls(fake), other_dtypes)):
                for case, call in calls.items():
                    for label, (dtype, tf32) in dtypes.items():
                        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
                        with mode, _recording(found, arch, case, label):  # the launchers' own tensors fake too
                            call(dtype)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved_tf32
    # One compile per distinct specialisation (the backward calls share a kernel).
    unique = {}
    for spec in found:
        key = (spec.arch, spec.kernel, spec.dtype, spec.config, repr(sorted(spec.args.items())),
               repr(sorted(spec.constexprs.items())))
        unique.setdefault(key, spec)
    return list(unique.values())


def _kernels() -> Dict[str, "triton.runtime.jit.JITFunction"]:
    """Every kernel (a @triton.jit function named *_kernel) that the
    launching modules define, by name."""
    return {
        value.__name__: value for module in LAUNCHING_MODULES for value in vars(module).values()
        if isinstance(value, triton.runtime.jit.JITFunction) and value.__name__.endswith("_kernel")
    }


def kernels_defined() -> List[str]:
    return sorted(_kernels())


# ------------------------------------------------------------ compiling

def _signature_and_attrs(fn, spec: Specialization):
    """ASTSource's signature and the specialisation Triton's launcher makes
    at run time: 16-byte aligned pointers (PyTorch's allocations are), and
    integers that are multiples of 16 marked as such."""
    signature, attrs = {}, {}
    for index, param in enumerate(fn.params):
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            continue
        value = spec.args[param.name]
        if isinstance(value, str):  # a tensor's pointer type
            signature[param.name] = value
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[param.name] = "i1"
        elif isinstance(value, int):
            signature[param.name] = "i64" if not -2**31 <= value < 2**31 else "i32"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            signature[param.name] = "fp32"
    return signature, attrs


def _registers_and_local(cubin: bytes, name: str):
    """(registers, local memory bytes per thread) from cuobjdump, the one
    that comes with triton; (None, None) where it cannot run."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        try:
            out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, timeout=60).stdout
        except OSError:
            return None, None
    found = re.search(rf"Function {re.escape(name)}:\s*REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", out)
    if not found:
        return None, None
    registers, stack, local = (int(v) for v in found.groups())
    return registers, stack + local


def compile_one(spec: Specialization) -> Dict:
    """Compile spec for its architecture and read off what it needs."""
    from triton.backends.compiler import GPUTarget

    fn = _kernels()[spec.kernel]
    signature, attrs = _signature_and_attrs(fn, spec)
    arch = spec.arch
    row = {"kernel": spec.kernel, "case": spec.case, "dtype": spec.dtype, "config": spec.config, "arch": arch,
           "num_warps": spec.num_warps, "uses_dot": spec.uses_dot,
           **{k: spec.constexprs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "FLAT_REDUCTION", "WEIGHT_TMA")
              if k in spec.constexprs}}
    start = time.perf_counter()
    try:
        target = GPUTarget("cuda", arch, 32)
        backend = triton.compiler.make_backend(target)
        options = backend.parse_options({"num_warps": spec.num_warps, "num_stages": spec.num_stages})
        source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=spec.constexprs, attrs=attrs)
        compiled = triton.compile(source, target=target, options=options.__dict__)
    except Exception as exc:  # reported per row: one bad config must not hide the others
        return row | {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}
    ptx = compiled.asm["ptx"]
    registers, local = _registers_and_local(compiled.asm["cubin"], compiled.metadata.name)
    shared = int(compiled.metadata.shared)
    return row | {
        "error": None,
        "compile_s": round(time.perf_counter() - start, 2),
        "shared_bytes": shared,
        "fits_shared_memory": shared <= SHARED_MEMORY_LIMIT[arch],
        "registers": registers,
        "local_bytes": local,
        "wgmma": "wgmma.mma_async" in ptx,
        "mma_sync": bool(re.search(r"\bmma\.sync\.aligned", ptx)),
        "tma_load": "cp.async.bulk.tensor" in ptx,
    }


@functools.lru_cache(maxsize=None)
def _specializations_once(archs) -> List[Specialization]:
    return specializations(archs)


def _compile_job(job):  # in a worker process: record once, compile one
    archs, index = job
    return compile_one(_specializations_once(archs)[index])


def compile_all(archs=(90, 80), workers: Optional[int] = None) -> List[Dict]:
    """Every specialisation for every arch, in parallel processes."""
    archs = tuple(archs)
    specs = specializations(archs)
    workers = workers or os.cpu_count() or 1
    if workers == 1:
        return [compile_one(spec) for spec in specs]
    import multiprocessing

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_compile_job, [(archs, i) for i in range(len(specs))], chunksize=4))


# ------------------------------------------------------------ report

def markdown(rows: List[Dict]) -> str:
    lines = [
        "# Triton kernels compiled ahead of time",
        "",
        "Written by `python -m resnet_fast.kernels.triton.aot --markdown resnet_fast/kernels/triton/KERNELS.md`"
        f" (triton {triton.__version__}, no GPU). Every launch config the launchers can pick, at a ResNet-50 "
        "layer's shape. Shared memory is per block (limits: "
        + ", ".join(f"{ARCH_NAMES[a]} {SHARED_MEMORY_LIMIT[a] // 1024} KB" for a in sorted(SHARED_MEMORY_LIMIT))
        + "); local memory is per thread (spills or stack). The convolution's configs are chosen by the "
        "device's compute capability (`GPU_TILES` in conv.py): the sm_90 rows are the Hopper set, whose tiles "
        "suit a warp group (wgmma), the sm_80 rows the set for every other GPU.",
        "",
    ]
    for arch in sorted({r["arch"] for r in rows}, reverse=True):
        mine = [r for r in rows if r["arch"] == arch]
        lines += [f"## {ARCH_NAMES[arch]}", "",
                  "| kernel | call | dtype | config | shared KB | registers | local B | tl.dot lowered to | TMA loads |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in mine:
            if r["error"]:
                lines.append(f"| {r['kernel']} | {r['case']} | {r['dtype']} | {r['config']} | compile failed: "
                             f"{r['error'][:120]} | | | | |")
                continue
            op = "wgmma" if r["wgmma"] else "mma.sync" if r["mma_sync"] else ("FMA" if r["uses_dot"] else "–")
            over = "" if r["fits_shared_memory"] else " (over the limit)"
            lines.append(f"| {r['kernel']} | {r['case']} | {r['dtype']} | {r['config']} | "
                         f"{r['shared_bytes'] / 1024:.1f}{over} | {r['registers']} | {r['local_bytes']} | {op} | "
                         f"{'weight' if r['tma_load'] else '–'} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m resnet_fast.kernels.triton.aot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="90,80", help="comma-separated compute capabilities (default: 90,80)")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--markdown", help="write the report here")
    parser.add_argument("--workers", type=int, default=None, help="compile processes (default: one per core)")
    args = parser.parse_args(argv)
    archs = [int(a) for a in args.arch.split(",")]
    unknown = [a for a in archs if a not in SHARED_MEMORY_LIMIT]
    if unknown:
        parser.error(f"--arch: {unknown} not among {sorted(SHARED_MEMORY_LIMIT)}")
    rows = compile_all(archs, args.workers)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "torch": torch.__version__, "rows": rows}, f, indent=1)
    report = markdown(rows)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(report + "\n")
    else:
        print(report)
    failed = [r for r in rows if r["error"]]
    for r in failed:
        print(f"compile failed: {r['kernel']} {r['dtype']} {r['config']} sm_{r['arch']}: {r['error']}",
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
