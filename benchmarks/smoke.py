"""Every kernel family once, at a ResNet-50 layer's shape (batch 32), each in
a fresh process, one line each with its error against resnet_fast.reference
(computed in float32 on the same inputs). A crash, a hang or a sticky CUDA
error in one family leaves the others their own process and line.

    python -m benchmarks.smoke                   # every family (GPU ones skipped without a GPU)
    python -m benchmarks.smoke --family NAME     # one family, in this process
    python -m benchmarks.smoke --list

The families: the CUDA implicit GEMM's three kernels (128x128 and 128x64
tiles, the few-channel stem kernel) in bfloat16, float16 and TF32; cuDNN
followed by our epilogue; cuDNN's own fused op; the native BatchNorm
forward and backward and the bias/ReLU backward; the Triton convolution's two reduction walks and its
BatchNorm. The native conv/BN families run on the CPU too.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, NamedTuple, Optional

import torch

# (n, c, h, w, k, kernel, stride, padding, residual) of ResNet-50 layers.
LAYERS = {
    "stem 7x7/2": (32, 3, 224, 224, 64, 7, 2, 3, False),
    "layer1 3x3": (32, 64, 56, 56, 64, 3, 1, 1, False),
    "layer3 3x3": (32, 256, 14, 14, 256, 3, 1, 1, False),
    "layer2 1x1 +res": (32, 128, 28, 28, 512, 1, 1, 0, True),
}
BN_SHAPE = (32, 256, 28, 28)
TF32 = "float32 (TF32)"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, TF32: torch.float32}


class Family(NamedTuple):
    op: str  # "conv", "bn" (train forward + backward) or "bias_act_backward"
    backend: str
    dtype: str
    layer: Optional[str] = None  # conv only
    cuda_conv: Optional[str] = None  # RESNET_FAST_CUDA_CONV for the native CUDA conv
    expect_kernel: Optional[str] = None  # the start of what ops.cuda_conv_algorithm must name
    gpu_only: bool = True


def _families() -> Dict[str, Family]:
    families = {}
    tiles = {"128x128": ("layer3 3x3", "cutlass sm80 (128x128 tiles)"),
             "128x64": ("layer1 3x3", "cutlass sm80 (128x64 tiles)"),
             "few-channel": ("stem 7x7/2", "cutlass sm80 (128x64 tiles, 3 input channels zero-padded to 4)")}
    for tile, (layer, kernel) in tiles.items():
        for dtype in ("bfloat16", "float16", TF32):
            families[f"cutlass sm80 {tile}, {dtype}"] = Family("conv", "native", dtype, layer, "cutlass_sm80", kernel)
    for layer, dtype in (("layer3 3x3", "bfloat16"), ("layer2 1x1 +res", "float16")):
        families[f"cutlass sm90, {layer}, {dtype}"] = Family(
            "conv", "native", dtype, layer, "cutlass_sm90", "cutlass sm90 (128x128x64 tiles, wgmma, TMA im2col)")
    families["cudnn + epilogue, bfloat16"] = Family("conv", "native", "bfloat16", "layer2 1x1 +res", "cudnn", "cudnn")
    families["cudnn fused, bfloat16"] = Family("conv", "native", "bfloat16", "layer2 1x1 +res", "cudnn_fused",
                                               "cudnn fused")
    for dtype in ("bfloat16", "float32"):
        families[f"native conv (auto), {dtype}"] = Family("conv", "native", dtype, "layer2 1x1 +res", gpu_only=False)
        families[f"native BN train + backward, {dtype}"] = Family("bn", "native", dtype, gpu_only=False)
        families[f"native bias/ReLU backward, {dtype}"] = Family("bias_act_backward", "native", dtype,
                                                                 gpu_only=False)
    families["triton conv, channel blocks, bfloat16"] = Family("conv", "triton", "bfloat16", "layer1 3x3")
    families["triton conv, flat (stem), bfloat16"] = Family("conv", "triton", "bfloat16", "stem 7x7/2")
    families["triton BN train + backward, bfloat16"] = Family("bn", "triton", "bfloat16")
    families["triton bias/ReLU backward, bfloat16"] = Family("bias_act_backward", "triton", "bfloat16")
    return families


FAMILIES = _families()


# ------------------------------------------------------------ one family

def _namespace(backend: str):
    if backend == "triton":
        import resnet_fast.kernels.triton.ops  # noqa: F401  (registers the ops)

        return torch.ops.resnet_fast_triton
    import resnet_fast  # noqa: F401  (loads the extension)

    return torch.ops.resnet_fast


def _conv_args(layer: str, dtype: torch.dtype, device: str):
    n, c, h, w, k, r, stride, padding, residual = LAYERS[layer]
    x = torch.randn(n, c, h, w, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(k, c, r, r, device=device) / (c * r * r) ** 0.5).to(dtype)
    bias = torch.randn(k, device=device, dtype=dtype)
    out_hw = (h + 2 * padding - r) // stride + 1
    res = (torch.randn(n, k, out_hw, out_hw, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
           if residual else None)
    return x, weight, bias, res, [stride] * 2, [padding] * 2, [1, 1], 1, True


def _calls(family: Family, dtype: torch.dtype, device: str):
    """(op name, arguments) of the kernels the family runs, in order: a
    function of the previous call's outputs."""
    if family.op == "conv":
        return [("conv_bias_act", lambda _: _conv_args(family.layer, dtype, device))]
    if family.op == "bias_act_backward":
        def args(_):
            grad, out = (torch.randn(BN_SHAPE, device=device, dtype=dtype).contiguous(
                memory_format=torch.channels_last) for _ in range(2))
            return grad, out, True
        return [("bias_act_backward", args)]
    channels = BN_SHAPE[1]
    state = {}

    def train_args(_):
        x, res = ((torch.randn(BN_SHAPE, device=device) * 2 + 0.5).to(dtype).contiguous(
            memory_format=torch.channels_last) for _ in range(2))
        weight, bias = torch.rand(channels, device=device) + 0.5, torch.randn(channels, device=device)
        state.update(x=x, weight=weight)
        return x, weight, bias, res, 1e-5, True

    def backward_args(train_out):
        out, mean, invstd = train_out[:3]
        grad = torch.randn(BN_SHAPE, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        return grad, state["x"], out, state["weight"], mean, invstd, True

    return [("bn_act_train", train_args), ("bn_act_backward", backward_args)]


def _native_has_cuda() -> bool:
    from resnet_fast import backends

    return backends._NATIVE_HAS_CUDA


def _upcast(value):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.float()
    return value


def run_family(name: str, device: str) -> Dict:
    """Run one family here; its outcome as a dict (raises on a crash)."""
    from resnet_fast import reference
    from resnet_fast.testing import REL_TOL, TF32_REL_TOL, rel_err

    family = FAMILIES[name]
    dtype = DTYPES[family.dtype]
    if family.cuda_conv:
        os.environ["RESNET_FAST_CUDA_CONV"] = family.cuda_conv
    os.environ.setdefault("RESNET_FAST_TRITON_AUTOTUNE", "0")  # one compile, not a tuning run
    torch.manual_seed(0)
    ops = _namespace(family.backend)
    tol = TF32_REL_TOL if family.dtype == TF32 else REL_TOL[dtype]
    result = {"family": name, "device": device, "tol": tol, "errors": {}}
    if family.layer:
        result["shape"] = family.layer
    outputs = None
    start = time.perf_counter()
    for op_name, make_args in _calls(family, dtype, device):
        args = make_args(outputs)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = family.dtype == TF32
        if op_name == "conv_bias_act" and family.backend == "native" and _native_has_cuda():
            # The CUDA convolution the op picks (asked on any device: the
            # choice reads only dtypes, sizes and addresses).
            from resnet_fast import ops as public_ops

            x, weight, _, res, stride, padding, dilation, groups, _ = args
            # On the CPU, the choice an H200 (compute capability 9.0) would make.
            capability = None if device == "cuda" else 90
            choice = public_ops.cuda_conv_algorithm(x, weight, res, stride, padding, dilation, groups, capability)
            result["kernel" if device == "cuda" else "kernel_on_cuda"] = choice
        outputs = getattr(ops, op_name)(*args)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # exact reference
        expected = getattr(reference, op_name)(*[_upcast(a) for a in args])
        if device == "cuda":
            torch.cuda.synchronize()
        got = outputs if isinstance(outputs, tuple) else (outputs,)
        want = expected if isinstance(expected, tuple) else (expected,)
        for index, (g, e) in enumerate(zip(got, want)):
            if g.numel():
                result["errors"][f"{op_name}[{index}]"] = rel_err(g, e)
    result["seconds"] = round(time.perf_counter() - start, 2)
    result["rel_err"] = max(result["errors"].values())
    choice = result.get("kernel", result.get("kernel_on_cuda"))
    result["kernel_ok"] = family.expect_kernel is None or choice is None or choice.startswith(family.expect_kernel)
    result["ok"] = result["rel_err"] <= tol and result["kernel_ok"]
    return result


# ------------------------------------------------------------ all families

def _in_subprocess(name: str, device: str, timeout_s: float) -> Dict:
    cmd = [sys.executable, "-m", "benchmarks.smoke", "--family", name, "--device", device, "--json"]
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    except subprocess.TimeoutExpired:
        return {"family": name, "ok": False, "outcome": f"TIMED OUT after {timeout_s:.0f} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode == 0 and lines:
        return json.loads(lines[-1])
    last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
    return {"family": name, "ok": False, "seconds": round(time.perf_counter() - start, 1),
            "outcome": f"CRASHED (exit {done.returncode}): {last[:200]}", "stderr": done.stderr[-3000:]}


def line(result: Dict) -> str:
    head = f"{result['family']:<40}"
    if "outcome" in result:
        return f"{head} {result['outcome']}"
    verdict = "ok  " if result["ok"] else "FAIL"
    kernel = f"  [{result['kernel']}]" if "kernel" in result else ""
    if not result.get("kernel_ok", True):
        kernel += f"  [picked {result.get('kernel', result.get('kernel_on_cuda'))!r}, not the kernel meant]"
    shape = f" {result['shape']}," if "shape" in result else ""
    return (f"{head} {verdict} rel err {result['rel_err']:.1e} (tol {result['tol']:.0e}),{shape} "
            f"{result['device']}, {result['seconds']:.2f} s{kernel}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.smoke", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", help="run this family in this process")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--json", action="store_true", help="with --family: print the result as JSON")
    parser.add_argument("--list", action="store_true", help="the family names")
    parser.add_argument("--timeout", type=float, default=60, help="seconds per family (default 60)")
    parser.add_argument("--jobs", type=int, default=4, help="families at once (default 4)")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(FAMILIES))
        return 0
    if args.family:
        if args.family not in FAMILIES:
            parser.error(f"unknown family {args.family!r}; --list names them")
        result = run_family(args.family, args.device)
        print(json.dumps(result) if args.json else line(result))
        return 0 if result["ok"] else 1

    runnable = [n for n, f in FAMILIES.items() if args.device == "cuda" or not f.gpu_only]
    skipped = [n for n in FAMILIES if n not in runnable]
    print(f"smoke: {len(runnable)} kernel families on {args.device}, each in its own process "
          f"(at most {args.timeout:.0f} s each, {args.jobs} at a time)", flush=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        results: List[Dict] = list(pool.map(lambda n: _in_subprocess(n, args.device, args.timeout), runnable))
    for result in results:
        print(line(result), flush=True)
        if "stderr" in result:
            print("    " + result["stderr"].strip().replace("\n", "\n    ")[-1500:], file=sys.stderr)
    for name in skipped:
        print(f"{name:<40} skipped: needs a CUDA GPU")
    bad = sum(not r["ok"] for r in results)
    print(f"smoke: {len(results) - bad} ok, {bad} failed or crashed, {len(skipped)} skipped")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
