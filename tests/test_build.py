"""The install built what it should have."""
import os

import pytest
import torch
from torch.utils import cpp_extension

from resnet_fast import ops
from resnet_fast.backends import available_backends


def test_native_extension_is_built():
    status = available_backends()["native"]
    assert status.available, status.detail


@pytest.mark.skipif(os.environ.get("RESNET_FAST_CPU_ONLY", "0") not in ("0", ""), reason="CPU-only build requested")
def test_cuda_kernels_are_compiled_when_the_toolkit_is_present():
    """A CUDA build of torch plus nvcc means the CUDA sources were compiled:
    a failed or skipped CUDA compile must not pass unnoticed."""
    if torch.version.cuda is None:
        pytest.skip("torch is not a CUDA build")
    has_nvcc = cpp_extension.CUDA_HOME is not None or os.path.exists("/usr/local/cuda/bin/nvcc")
    if not has_nvcc:
        pytest.skip("no CUDA toolkit (nvcc) on this machine")
    for op in ("conv_bias_act", "bias_act", "bias_act_backward", "bn_act_train", "bn_act_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"resnet_fast::{op}", "CUDA"), op


@pytest.mark.skipif(os.environ.get("RESNET_FAST_CPU_ONLY", "0") not in ("0", ""), reason="CPU-only build requested")
def test_implicit_gemm_is_compiled_when_cutlass_is_installed(monkeypatch):
    """With the CUDA kernels compiled and nvidia-cutlass installed (CI installs
    it), the implicit-GEMM convolution is in the build: a CUTLASS compile that
    silently dropped out would otherwise only show as slower GPU runs."""
    import importlib.util

    if not torch._C._dispatch_has_kernel_for_dispatch_key("resnet_fast::conv_bias_act", "CUDA"):
        pytest.skip("the CUDA kernels are not compiled")
    if importlib.util.find_spec("cutlass_library") is None and not os.environ.get("CUTLASS_PATH"):
        pytest.skip("nvidia-cutlass is not installed and CUTLASS_PATH is not set")
    x = torch.randn(1, 16, 8, 8, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(16, 16, 3, 3, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    monkeypatch.delenv("RESNET_FAST_CUDA_CONV", raising=False)
    assert ops.cuda_conv_algorithm(x, weight, padding=1) == "cutlass sm80 (128x64 tiles)"
