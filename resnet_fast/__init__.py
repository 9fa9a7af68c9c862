"""resnet_fast: torchvision's ResNets on fused conv + BatchNorm + residual +
ReLU kernels.

    import resnet_fast
    model = resnet_fast.resnet50(weights="DEFAULT").eval()   # or a file, URL, state_dict
    resnet_fast.available_backends()

    resnet_fast.optimize(detector)        # torchvision / timm ResNets inside any model, in place
    backbone = resnet_fast.resnet50(features_only=True, out_indices=(1, 2, 3, 4))
"""
from . import ops, reference
from .backends import BACKENDS, available_backends
from .cpu_memory import empty_cpu_cache
from .cuda_graph import cuda_graphed
from .export import export_onnx, using_backend
from .folding import clear_fold_caches
from .sync_batchnorm import SyncBatchNorm2d, convert_sync_batchnorm
from .tuning import tune
from .models import *  # noqa: F401,F403
from .models import __all__ as _model_names

__version__ = "0.1.0"
__all__ = [
    "ops", "reference", "BACKENDS", "available_backends", "clear_fold_caches", "empty_cpu_cache", "SyncBatchNorm2d",
    "convert_sync_batchnorm", "tune", "cuda_graphed", "export_onnx", "using_backend", *_model_names,
]
