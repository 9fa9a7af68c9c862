"""Building matched torchvision / resnet_fast model pairs for the tests."""
import torch
import torchvision

import resnet_fast


@torch.no_grad()
def give_bn_random_statistics(model: torch.nn.Module) -> None:
    """Non-trivial BN state: random affine parameters and running statistics
    (not the identity that a fresh BatchNorm2d starts from)."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0.0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0.0, 0.1)


def pair(arch: str, backend=None, calibrate: bool = True, **kwargs):
    """(torchvision model, resnet_fast model) with identical weights and buffers."""
    tv = getattr(torchvision.models, arch)(**kwargs)
    if calibrate:
        give_bn_random_statistics(tv)
    ours = getattr(resnet_fast, arch)(backend=backend, **kwargs)
    ours.load_state_dict(tv.state_dict(), strict=True)
    return tv, ours

