"""Triton kernels for the resnet_fast ops (the "triton" backend).

    from resnet_fast.kernels import triton as triton_kernels
    ok, reason = triton_kernels.triton_available()
    if ok:
        out = triton_kernels.conv_bias_act(x, w, b, None, [1, 1], [1, 1], [1, 1], 1, True)
        # or, once the ops are registered (first attribute access or
        # `import resnet_fast.kernels.triton.ops`):
        out = torch.ops.resnet_fast_triton.conv_bias_act(x, w, b, None, [1, 1], [1, 1], [1, 1], 1, True)

The operators (conv_bias_act, bn_act_train, bn_act_backward,
bias_act_backward) take the arguments of the schemas in csrc/ops.cpp and
compute exactly what resnet_fast.reference defines. They run on CUDA tensors,
or on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1 set before
triton is first imported; slow, for tests).

Importing this package never imports triton; the operators are registered
on first use, so a missing triton only shows up as triton_available() ==
(False, reason).
"""
import os
from typing import Tuple

import torch

__all__ = ["triton_available", "conv_bias_act", "bn_act_train", "bn_act_backward", "bias_act_backward"]

_OPS = ("conv_bias_act", "bn_act_train", "bn_act_backward", "bias_act_backward")


def _interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_available() -> Tuple[bool, str]:
    """(whether the Triton kernels can run here, what on or why not)."""
    try:
        import triton
    except Exception as exc:  # ImportError, or a broken install failing otherwise
        return False, f"triton does not import ({type(exc).__name__}: {exc}); install it with `pip install triton`"
    version = getattr(triton, "__version__", "?")
    if _interpreter_requested():
        return True, f"triton {version} under its interpreter (TRITON_INTERPRET=1): CPU tensors, slow"
    if not torch.cuda.is_available():
        return False, (
            f"triton {version} is installed but there is no CUDA GPU; "
            "set TRITON_INTERPRET=1 before importing triton to run the kernels (slowly) on the CPU"
        )
    if torch.version.hip is None and torch.cuda.get_device_capability() < (7, 0):
        name = torch.cuda.get_device_name()
        return False, f"the GPU ({name}) is older than compute capability 7.0, which Triton needs"
    return True, f"triton {version} on {torch.cuda.get_device_name()}"


def __getattr__(name: str):
    # The operators, registered on first use (this imports triton).
    if name in _OPS:
        available, reason = triton_available()
        if not available:
            raise RuntimeError(f"resnet_fast: the Triton kernels are not available: {reason}")
        from . import ops

        return getattr(ops, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
