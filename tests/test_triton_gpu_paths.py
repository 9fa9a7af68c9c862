"""What the Triton backend does on a GPU that the interpreter never runs,
checked without one: the backend choice when torch sees a GPU, the ops
registered as triton_op over compiled (not interpreted) kernels, and their
decomposition, the graph torch.compile receives, traced on fake CUDA tensors.

A fresh interpreter stands in for the GPU machine (the backends are decided
at import): torch.cuda reports an H200 while resnet_fast imports, and
Triton's driver reports an sm_90 target, which is all that tracing asks of
the GPU. Nothing is launched.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from resnet_fast.backends import available_backends

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import json
import torch

cuda_is_available = torch.cuda.is_available
torch.cuda.is_available = lambda: True
torch.cuda.get_device_capability = lambda device=None: (9, 0)
torch.cuda.get_device_name = lambda device=None: "NVIDIA H200 (simulated)"
import resnet_fast
from resnet_fast import backends
from resnet_fast.kernels.triton import conv
torch.cuda.is_available = cuda_is_available  # fake CUDA tensors need the truth

import triton
from triton.backends.compiler import GPUTarget


class Sm90Driver:
    # What tracing asks of the driver: the target that the analysis of which
    # tensors a kernel writes compiles the kernel's TTIR for.
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


triton.runtime.driver.set_active(Sm90Driver())

from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
from torch._subclasses.fake_tensor import FakeTensorMode
from torch._subclasses.functional_tensor import dispatch_functionalize
from torch.fx.experimental.proxy_tensor import make_fx

mode = FakeTensorMode()


def nhwc(*shape, dtype=torch.bfloat16):
    with mode:
        return torch.empty(shape, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)


def vec(n, dtype=torch.float32):
    with mode:
        return torch.empty(n, device="cuda", dtype=dtype)


def trace(fn, *args):
    # triton_op decomposes under FunctionalTensorMode, as in AOTDispatcher.
    graph = make_fx(dispatch_functionalize(fn), tracing_mode="fake")(*args)
    inputs = {n for n in graph.graph.nodes if n.op == "placeholder"}
    launches = []
    for node in graph.graph.nodes:
        if node.op == "call_function" and "triton_kernel_wrapper" in str(node.target):
            kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
            kernel = getattr(kernel, "fn", kernel)  # an Autotuner's JITFunction
            cloned = node.kwargs["tensors_to_clone"]
            launches.append({
                "kernel": kernel.__name__,
                "writes": sorted(cloned),
                "writes_an_input": sorted(k for k in cloned if node.kwargs["kwargs"][k] in inputs),
            })
    outs = fn(*args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    meta = [[list(o.shape), list(o.stride()), str(o.dtype), o.device.type] for o in outs]
    return {"launches": launches, "outputs": meta}


x, w, b = nhwc(2, 64, 14, 14), nhwc(128, 64, 3, 3), vec(128, torch.bfloat16)
res = nhwc(2, 128, 7, 7)
x32, w32, b32 = nhwc(2, 3, 15, 15, dtype=torch.float32), nhwc(16, 3, 7, 7, dtype=torch.float32), vec(16)
g, y = nhwc(2, 128, 7, 7), nhwc(2, 128, 7, 7)
cuda, cpu = torch.device("cuda"), torch.device("cpu")
T = torch.ops.resnet_fast_triton
report = {
    "status": {k: [v.available, v.detail] for k, v in backends.available_backends().items()},
    "kernel_type": type(conv._conv_bias_act_kernel).__name__,
    "default_on_cuda": backends.resolve_backend(None, cuda),
    "triton_on_cuda": backends._unavailable_reason("triton", cuda),
    "triton_on_cpu": backends._unavailable_reason("triton", cpu),
    "traces": {
        "conv bf16 3x3/2 +res": trace(lambda x, w, b, r: T.conv_bias_act(x, w, b, r, [2, 2], [1, 1], [1, 1], 1, True),
                                      x, w, b, res),
        "conv fp32 stem 7x7/2": trace(lambda x, w, b: T.conv_bias_act(x, w, b, None, [2, 2], [3, 3], [1, 1], 1, True),
                                      x32, w32, b32),
        "bn_act_train": trace(lambda y, r: T.bn_act_train(y, vec(128), vec(128), r, 1e-5, True), y, res),
        "bn_act_backward": trace(
            lambda g, y: T.bn_act_backward(g, y, y, vec(128), vec(128), vec(128), True), g, y),
        "bias_act_backward relu": trace(lambda g, y: T.bias_act_backward(g, y, True), g, y),
        "bias_act_backward no relu": trace(lambda g, y: T.bias_act_backward(g, y, False), g, y),
    },
}
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def report():
    try:
        import triton  # noqa: F401
    except ImportError:
        pytest.skip("triton is not installed")
    env = dict(os.environ, PYTHONPATH=ROOT, TRITON_INTERPRET="0")
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(CHILD)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_backend_choice_when_a_gpu_is_present(report):
    available, detail = report["status"]["triton"]
    assert available, detail
    assert "NVIDIA H200 (simulated)" in detail and "interpreter" not in detail
    assert report["triton_on_cuda"] is None
    assert "CUDA tensors" in report["triton_on_cpu"] and "TRITON_INTERPRET=1" in report["triton_on_cpu"]
    native_cuda = available_backends()["native"].detail.endswith("CUDA kernels for CUDA tensors")
    assert report["default_on_cuda"] == ("native" if native_cuda else "reference")


def test_kernels_are_compiled_not_interpreted(report):
    # (That the ops are triton_ops shows below: only those decompose into launches.)
    assert report["kernel_type"] == "JITFunction"


EXPECTED_LAUNCHES = {
    "conv bf16 3x3/2 +res": ["_conv_bias_act_kernel"],
    "conv fp32 stem 7x7/2": ["_conv_bias_act_kernel"],
    "bn_act_train": ["_partial_stats_kernel", "_finalize_stats_kernel", "_apply_kernel"],
    "bn_act_backward": ["relu_grad_partial_sums_kernel", "_finalize_grads_kernel", "_grad_input_kernel"],
    "bias_act_backward relu": ["relu_grad_partial_sums_kernel", "_sum_chunks_kernel"],
    "bias_act_backward no relu": ["relu_grad_partial_sums_kernel", "_sum_chunks_kernel"],
}


@pytest.mark.parametrize("case", list(EXPECTED_LAUNCHES))
def test_decomposition_shows_each_launch_and_writes_no_input(case, report):
    """torch.compile sees every kernel launch of the op, and the analysis of
    what each kernel writes succeeds and finds no input of the op among
    them: where it fails, Inductor assumes every argument is written and
    copies them all before each launch."""
    trace = report["traces"][case]
    assert [launch["kernel"] for launch in trace["launches"]] == EXPECTED_LAUNCHES[case]
    for launch in trace["launches"]:
        assert launch["writes"], f"{launch['kernel']} writes nothing?"
        assert launch["writes_an_input"] == [], launch
    # Outputs on the GPU, activations channels_last.
    for shape, stride, _dtype, device in trace["outputs"]:
        assert device == "cuda"
        if len(shape) == 4 and shape[0] > 0:
            n, c, h, w = shape
            assert stride == [h * w * c, 1, w * c, c], (shape, stride)


def test_conv_output_metadata(report):
    (shape, _, dtype, _), = report["traces"]["conv bf16 3x3/2 +res"]["outputs"]
    assert shape == [2, 128, 7, 7] and dtype == "torch.bfloat16"
    (shape, _, dtype, _), = report["traces"]["conv fp32 stem 7x7/2"]["outputs"]
    assert shape == [2, 16, 8, 8] and dtype == "torch.float32"
