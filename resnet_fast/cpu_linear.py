"""A ResNet's classifier (its nn.Linear fc) in CPU inference, on a weight
prepacked for the batch size: oneDNN's linear for bfloat16 (where oneDNN has
bfloat16 kernels on this CPU), MKL's packed GEMM for float32 from
PACKED_FLOAT32_MIN_ROWS rows on. After a network's forward the classifier's
weight is no longer in cache, and read in the packed layout it costs less:
on a 2-core Xeon, a 1000x2048 classifier in bfloat16 took 0.14 ms against
aten's 0.22 ms at batch 1, and in float32 0.28 ms against 0.52 ms at batch
16; but in float32 at batch 1 0.19 ms against aten's 0.17 ms (a single row
gains nothing from the packed panels).
"""
import threading
from collections import OrderedDict
from typing import Optional

import torch
from torch import Tensor, nn

from . import ops
from .backends import native_loaded
from .folding import EmptyWhenCopied

PACKED_FLOAT32_MIN_ROWS = 4


def linear(fc: nn.Linear, x: Tensor) -> Tensor:
    """fc(x) for a plain nn.Linear without hooks (the caller's check) and a
    CPU input that needs no gradient, on a prepacked weight where one applies."""
    packed = _packed_weight(fc, x)
    if packed is None:
        return fc(x)
    if x.dtype == torch.bfloat16:
        return torch.ops.mkldnn._linear_pointwise(x, packed, fc.bias, "none", [], "")
    return torch.ops.mkl._mkl_linear(x, packed, fc.weight, fc.bias, x.shape[0])


def _packable(fc: nn.Linear, x: Tensor) -> bool:
    weight, bias = fc.weight, fc.bias
    if not (native_loaded() and type(x) is Tensor and x.device.type == "cpu" and x.dim() == 2 and x.shape[0] > 0
            and x.is_contiguous() and type(weight) is nn.Parameter and weight.dtype == x.dtype
            and weight.device.type == "cpu" and (bias is None or bias.dtype == x.dtype)):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        return False
    if torch.is_autocast_enabled("cpu"):  # nn.Linear would compute in autocast's dtype
        return False
    if weight.is_inference():  # no version counter to tell when it changes
        return False
    if x.dtype == torch.bfloat16:
        return ops.cpu_compute_dtype(torch.bfloat16) == torch.bfloat16 and torch.backends.mkldnn.is_available()
    return x.dtype == torch.float32 and x.shape[0] >= PACKED_FLOAT32_MIN_ROWS and torch.backends.mkl.is_available()


def _packed_weight(fc: nn.Linear, x: Tensor) -> Optional[Tensor]:
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or not _packable(fc, x):
        return None
    caches = fc.__dict__.setdefault("_fold_caches", {})  # cleared by clear_fold_caches, dropped by copies
    cache = caches.get("packed")
    if cache is None:
        cache = caches.setdefault("packed", PackedLinearWeight())
    return cache.get(fc.weight, x.shape[0])


class PackedLinearWeight(EmptyWhenCopied):
    """One linear weight prepacked per batch size, the most recent
    MAX_BATCH_SIZES of them, dropped when the weight's storage or version
    counter changes (an optimizer step, an in-place edit, load_state_dict,
    .to()). Copies and pickles start empty."""

    MAX_BATCH_SIZES = 4

    def __init__(self):
        self._entry = None  # (weight key, OrderedDict {batch size: packed}), replaced as a whole
        self._lock = threading.Lock()

    def clear(self) -> None:
        with self._lock:
            self._entry = None

    def get(self, weight: Tensor, batch: int) -> Tensor:
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.shape)
        entry = self._entry
        if entry is not None and entry[0] == key:
            packed = entry[1].get(batch)
            if packed is not None:
                try:
                    entry[1].move_to_end(batch)  # most recently used, kept longest
                except KeyError:  # another thread's batch size just pushed it out: fine, it is in hand
                    pass
                return packed
        with self._lock, torch.inference_mode(False), torch.no_grad():
            entry = self._entry
            if entry is None or entry[0] != key:
                entry = self._entry = (key, OrderedDict())
            packed = entry[1].get(batch)
            if packed is None:
                w = weight.detach().contiguous()
                if w.dtype == torch.bfloat16:
                    packed = torch.ops.mkldnn._reorder_linear_weight(w, batch)
                else:
                    packed = torch.ops.mkl._mkl_reorder_linear_weight(w, batch)
                entry[1][batch] = packed
                if len(entry[1]) > self.MAX_BATCH_SIZES:
                    entry[1].popitem(last=False)
            return packed
