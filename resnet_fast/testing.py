"""Helpers for checking resnet_fast's kernels and models against the
reference and torchvision (the tests, the benchmarks' smoke run)."""
import torch
from torch import nn

# Relative error ||out - ref|| / ||ref|| allowed per dtype, stated once.
REL_TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2, torch.float64: 1e-12}
# float32 on TF32 tensor cores: each operand rounded to 10 mantissa bits,
# about 5e-4 relative error against exact float32 on a convolution's sums.
TF32_REL_TOL = 2e-3


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, in float64."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


@torch.no_grad()
def randomize_batchnorm_(model: nn.Module) -> nn.Module:
    """Give every BatchNorm2d non-trivial state, in place: random affine
    parameters and running statistics (a fresh BatchNorm2d is the identity
    in eval mode, which would hide mistakes in how BN is applied)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0.0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0.0, 0.1)
    return model
