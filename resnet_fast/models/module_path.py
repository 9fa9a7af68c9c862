"""When a block or the stem runs its modules one by one, as torchvision's
forward does, instead of the fused ops.

The fused ops compute a block without calling its conv, norm and ReLU
modules. That is invisible until someone looks at those modules: a hook on
them, an activation swapped for another, a trace, a functorch transform. In
those cases the block runs its modules, so the user gets torchvision's
behaviour (only slower); the fused path is for everything else.
"""
import contextlib
import inspect
import sys
import threading
import warnings
from typing import Iterable, Iterator, List, Optional

import torch
from torch import Tensor, nn
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.nn.modules import module as _module_globals

from ..backends import native_loaded
from ..layers import is_frozen_bn
from ..validation import FLOAT_DTYPES


# Children a fused block computes itself; each must stay exactly this.
_ACTIVATIONS = ("relu", "act1", "act2", "act3")  # torchvision's name, timm's names
_ABSENT_PARTS = ("se", "aa", "drop_path", "drop_block")  # timm's optional parts: None or Identity


# Set while torch.jit.trace's check runs a module (trace_check_scope).
_local = threading.local()


def input_needs_modules(x: Tensor) -> bool:
    """Whether this input is outside what the fused path computes: run the modules."""
    if isinstance(x, torch.fx.Proxy):
        # torch.fx.symbolic_trace records torchvision's graph, node for node:
        # create_feature_extractor's node names, FX quantization, FX pruning
        return True
    if not torch.compiler.is_compiling() and (
        torch.jit.is_tracing()  # a trace of aten ops: the same graph on every call, runs anywhere
        or getattr(_local, "checking_a_trace", False)  # see trace_check_scope
        or torch._C._are_functorch_transforms_active()  # vmap, grad, jacrev: aten has their rules
    ):
        return True
    return (
        x.dtype not in FLOAT_DTYPES  # the fused kernels' dtypes; float64 runs on aten
        or x.is_meta  # shapes only: no kernel to choose
        or statically_known_true(x.shape[0] == 0)  # an empty batch: BatchNorm's own rules for it
    )


# ------------------------------------------------- torch.jit.trace's check

def _trace_check_code():
    """The code object of the function inside torch.jit.trace's check that
    runs the Python module to compare it with the trace (None if this torch
    has no such function: then the check compares the fused path, within
    float rounding)."""
    check = getattr(torch.jit._trace, "_check_trace", None)
    check = inspect.unwrap(check) if callable(check) else check  # it runs under a no_grad decorator
    consts = getattr(getattr(check, "__code__", None), "co_consts", ())
    return next((c for c in consts if getattr(c, "co_name", None) == "run_mod_and_filter_tensor_outputs"), None)


_TRACE_CHECK_CODE = _trace_check_code()


def _checking_a_trace(depth: int = 16) -> bool:
    """Whether a caller within `depth` frames is torch.jit.trace's check."""
    if _TRACE_CHECK_CODE is None:
        return False
    frame = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            return False
        if frame.f_code is _TRACE_CHECK_CODE:
            return True
        frame = frame.f_back
    return False


@contextlib.contextmanager
def trace_check_scope() -> Iterator[None]:
    """Entered by a ResNet's forward. While torch.jit.trace's check runs the
    model to compare it with the trace it recorded (module by module, see
    input_needs_modules), everything inside runs module by module too: the
    check compares like with like, not float rounding. (A block traced on
    its own is not covered: its check may warn of differences at float
    rounding level.)"""
    if torch.compiler.is_compiling() or getattr(_local, "checking_a_trace", False) or not _checking_a_trace():
        yield
        return
    _local.checking_a_trace = True
    try:
        yield
    finally:
        _local.checking_a_trace = False


# --------------------------------------------- hooks and replaced modules

def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def _global_hooks() -> bool:
    g = _module_globals
    return bool(
        g._global_forward_hooks or g._global_forward_pre_hooks or g._global_backward_hooks
        or g._global_backward_pre_hooks
    )


def has_module_hooks(m: nn.Module) -> bool:
    """Whether calling m runs a hook (its own or a global one)."""
    return _global_hooks() or _has_hooks(m)


def _is_absent(part: Optional[nn.Module]) -> bool:
    return part is None or type(part) is nn.Identity


def block_parts(block: nn.Module) -> List[nn.Module]:
    """The modules a fused block computes without calling them: its children
    and those of a Sequential child (the downsample). A custom shortcut is
    called as it is, so what is deeper in it needs no check."""
    parts = []
    for child in block._modules.values():
        if child is not None:
            parts.append(child)
            if type(child) is nn.Sequential:
                parts.extend(child._modules.values())
    return parts


# Modules whose forward keeps finite inputs finite and either runs on the
# fused ops or leaves NaN as it is.
_KNOWN_MODULES = (
    nn.Sequential, nn.Conv2d, nn.BatchNorm2d, nn.SyncBatchNorm, nn.ReLU, nn.MaxPool2d, nn.AdaptiveAvgPool2d,
    nn.AvgPool2d, nn.Linear, nn.Identity, nn.Flatten, nn.Dropout,
)


def known_modules(network: nn.Module, block_types) -> Optional[List[nn.Module]]:
    """The modules below network, in a fixed order, where there is no module
    hook anywhere (a global one, or one on a module below network: it could
    change or keep what the next layer sees, or wait for a gradient) and
    every module below network is one whose forward resnet_fast knows: its
    residual blocks (block_types), convolutions, norms, ReLU, pooling; else
    None. Then the network may call its blocks' forward directly, let them
    write into tensors only they hold, scan its input alone for NaN/Inf
    (resnet_fast/finite.py), and replay a recorded forward
    (resnet_fast/cpu_replay.py) while the modules are the same ones."""
    if _global_hooks():
        return None
    # network's own hooks see only its input and output. This runs on every
    # forward: the walk below in the extension where it is loaded (a ResNet's
    # forward at batch 1 measured 1% faster), else a plain walk over
    # _modules (named_modules() is slower).
    if native_loaded():
        from .. import _C

        return _C.module_walk(network, _KNOWN_MODULES, block_types, is_frozen_bn)
    found = []
    pending = list(network._modules.values())
    while pending:
        m = pending.pop()
        if m is None:
            continue
        if _has_hooks(m) or not (type(m) in _KNOWN_MODULES or isinstance(m, block_types) or is_frozen_bn(m)):
            return None
        found.append(m)
        pending.extend(m._modules.values())
    return found


def must_call_modules(owner: nn.Module, modules: Iterable[nn.Module]) -> bool:
    """Whether `modules` must be called one by one (why_modules); says why, once."""
    reason = why_modules(owner, modules)
    if reason is not None:
        note_once(owner, reason)
    return reason is not None


def why_modules(owner: nn.Module, modules: Iterable[nn.Module]) -> Optional[str]:
    """Why `modules`, the parts of `owner` that the fused path computes
    without calling them, must be called: a hook on one of them (or a global
    module hook), or an activation that is no longer a plain nn.ReLU. None
    when the fused path computes exactly what calling them would."""
    if _global_hooks():
        return "a global module hook (torch.nn.modules.module.register_module_forward_hook or the like)"
    for m in modules:
        if _has_hooks(m):
            return f"a hook on its {type(m).__name__}"
    return why_parts(owner)


def why_parts(owner: nn.Module) -> Optional[str]:
    """why_modules without the hooks (for a block of a network that
    known_modules found without any): an activation that is no longer a
    plain nn.ReLU, or an optional part present."""
    for name in _ACTIVATIONS:
        act = owner._modules.get(name)
        if act is not None and type(act) is not nn.ReLU:
            return f"its activation {name} is {type(act).__name__}, not nn.ReLU"
    for name in _ABSENT_PARTS:
        if not _is_absent(owner._modules.get(name)):
            return f"its {name} ({type(owner._modules[name]).__name__})"
    return None


_noted = set()
_noted_lock = threading.Lock()


def note_once(owner: nn.Module, reason: str) -> None:
    """Say, once per kind of module and reason, that `owner` runs module by module."""
    if torch.compiler.is_compiling():  # said by the eager calls; no graph break for it
        return
    key = (type(owner).__name__, reason)
    with _noted_lock:
        if key in _noted:
            return
        _noted.add(key)
    warnings.warn(
        f"resnet_fast: a {type(owner).__name__} runs its modules one by one, as torchvision does, "
        f"because of {reason}; its results are the same, it is only slower than the fused path. "
        "(Said once per reason.)",
        UserWarning,
        stacklevel=4,
    )
