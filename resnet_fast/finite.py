"""One scan for NaN and Inf per network forward instead of one per layer.

On the CPU, conv_bias_act fuses ReLU into oneDNN's convolution, whose ReLU
turns NaN into 0 where torch.relu keeps it; so by itself each layer scans its
input and residual and fuses the ReLU only when they are finite: a full pass
over every activation, about a tenth of a layer's time. Inside a network
whose modules are all known (convolutions, norms, ReLU, pooling), a finite
input and finite weights can only give finite activations, so the forward
checks its input once and vouches for the activations of its layers
(csrc/cpu/conv.cpp: a layer whose weight or bias is not finite withdraws
that, and the layers after it look again). A float32 overflow inside the
network (activations beyond about 3.4e38) is not looked for, as neither
torch.compile's nor oneDNN's own fused kernels look for it. The same holds
for bfloat16 activations (float32's exponent range; the layers compute in
float32 where oneDNN has no bfloat16 kernels, ops.cpu_compute_dtype), but not
for float16, whose activations overflow to Inf from 65504: there every layer
scans for itself.
"""
import contextlib
from typing import Iterator

import torch
from torch import Tensor

from .backends import native_loaded


# Activation dtypes that overflow no sooner than float32 does.
_VOUCHED_DTYPES = (torch.float32, torch.bfloat16)


@contextlib.contextmanager
def finite_activations(x: Tensor) -> Iterator[None]:
    """Within this block, the CPU conv layers skip their own NaN/Inf scan
    when x is finite. For the forward of a network made only of modules
    resnet_fast knows, without hooks (models.module_path.known_modules)."""
    vouch = (
        native_loaded() and type(x) is Tensor and x.device.type == "cpu" and x.dtype in _VOUCHED_DTYPES
        # One parallel pass over x's exponent bits (csrc/cpu/finite.cpp).
        and torch.ops.resnet_fast.all_finite(x.detach())
    )
    if not vouch:
        yield
        return
    from . import _C

    previous = _C.set_activations_known_finite(True)
    try:
        yield
    finally:
        _C.set_activations_known_finite(previous)
