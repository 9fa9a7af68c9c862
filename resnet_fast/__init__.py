"""resnet_fast: torchvision's ResNets on fused conv + BatchNorm + residual +
ReLU kernels.

    import resnet_fast
    model = resnet_fast.resnet50(weights="resnet50.pth").eval()
    resnet_fast.available_backends()
"""
from . import ops, reference
from .backends import BACKENDS, available_backends
from .layers import clear_fold_caches
from .sync_batchnorm import SyncBatchNorm2d, convert_sync_batchnorm
from .tuning import tune
from .models import *  # noqa: F401,F403
from .models import __all__ as _model_names

__version__ = "0.1.0"
__all__ = ["ops", "reference", "BACKENDS", "available_backends", "clear_fold_caches", "SyncBatchNorm2d",
           "convert_sync_batchnorm", "tune", *_model_names]
