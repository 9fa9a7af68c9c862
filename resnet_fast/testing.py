"""Helpers for checking models built on resnet_fast against torchvision."""
import torch
from torch import nn


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
