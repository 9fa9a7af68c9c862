"""The install built what it should have."""
import os

import pytest
import torch
from torch.utils import cpp_extension

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
