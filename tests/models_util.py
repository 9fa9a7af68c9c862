"""Building matched torchvision / resnet_fast model pairs for the tests."""
import torchvision

import resnet_fast
from resnet_fast.testing import randomize_batchnorm_


def pair(arch: str, backend=None, **kwargs):
    """(torchvision model, resnet_fast model) with identical weights and
    buffers, BatchNorm state randomised."""
    tv = randomize_batchnorm_(getattr(torchvision.models, arch)(**kwargs))
    ours = getattr(resnet_fast, arch)(backend=backend, **kwargs)
    ours.load_state_dict(tv.state_dict(), strict=True)
    return tv, ours

