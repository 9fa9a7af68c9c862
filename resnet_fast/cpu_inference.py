"""The CPU inference route of a conv + eval-BN layer: layers.conv_norm_act
for an input that needs no gradient, on the native backend.

The route decides which convolution runs (the Winograd one where
ops.cpu_conv_algorithm picks it, oneDNN's with the folded weight prepacked
for the input's shape otherwise), whether the result is written into the
residual, and for half precision whether the layer computes in float32
(ops.cpu_compute_dtype). Making that decision reads a dozen things, some
50 us of Python per layer on a 2-core CPU: as long as the convolution of a
small layer at batch 1. So under no_grad or inference_mode the decision is
kept as a CpuStep in the layer's FoldCache, per signature (what it read of
the input, the residual and the settings), and a later call with the same
signature checks only that the weights are unchanged before calling the
operator itself.
"""
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor, nn

from . import cpu_replay, ops
from .folding import FoldCache, fold_conv_norm


class CpuStep:
    """One layer's convolution with everything but its input decided: the
    resnet_fast op (`op`: "conv_bias_act", "conv3x3_winograd_bias_act" or
    either's in-place form, into_residual), its weights and its trailing
    arguments.

    Calling it runs the op through resnet_fast.ops, which checks the
    arguments; run_trusted calls the compiled operator itself
    (calls_operator) for a call with the signature of one that passed those
    checks."""

    __slots__ = ("op", "weights", "tail", "into_residual", "calls_operator", "_checked", "_operator")

    def __init__(self, name: str, weights: Tuple[Tensor, ...], tail: tuple, into_residual: bool):
        self.op = name + "_" if into_residual else name
        self.weights, self.tail, self.into_residual = weights, tail, into_residual
        self._checked = getattr(ops, self.op)
        # The operator takes the arguments as they are: a prepacked or
        # Winograd weight only (ops.conv_bias_act crops the input of a plain one).
        self.calls_operator = name == "conv3x3_winograd_bias_act" or weights[0].is_mkldnn
        self._operator = getattr(torch.ops.resnet_fast, self.op).default if self.calls_operator else None

    def _args(self, x: Tensor, residual: Optional[Tensor]) -> tuple:
        if self.into_residual:
            return (residual, x) + self.weights + self.tail
        return (x,) + self.weights + (residual,) + self.tail

    def __call__(self, x: Tensor, residual: Optional[Tensor]) -> Tensor:
        return self._checked(*self._args(x, residual))

    def compiled_operator(self) -> Optional[Callable]:
        """The compiled operator run_trusted calls, without the Python layer
        of torch.ops (for cpu_replay, which calls it with _args inside one
        _AutoDispatchBelowAutograd for a whole forward); None for a step that
        calls the checked op."""
        return None if self._operator is None else getattr(self._operator, "_op", self._operator)

    def operator_name(self) -> Optional[Tuple[str, str]]:
        """The (name, overload name) of compiled_operator's schema, by which
        the C++ replay loop finds it (csrc/replay_program.cpp); None as
        compiled_operator."""
        if self._operator is None:
            return None
        return self._operator._schema.name, self._operator._schema.overload_name

    def run_trusted(self, x: Tensor, residual: Optional[Tensor]) -> Tensor:
        if self._operator is None:
            return self(x, residual)
        if self.into_residual:
            ops.check_no_shared_memory(residual, x, self.op)  # not a property of the signature
        with torch._C._AutoDispatchBelowAutograd():  # no input needs a gradient (the step is kept under no_grad)
            out = self._operator(*self._args(x, residual))
        return residual if self.into_residual else out


def cpu_inference(conv: nn.Conv2d, norm: nn.Module, x: Tensor, residual: Optional[Tensor], relu: bool,
                  cache: Optional[FoldCache], overwrite_residual: bool) -> Tensor:
    """act(norm(conv(x)) + residual) on the CPU's native ops, for an x that
    needs no grad; a half-precision x computed in float32 where
    ops.cpu_compute_dtype says so. overwrite_residual: the caller needs
    residual no more (it may receive the result)."""
    compute_dtype = ops.cpu_compute_dtype(x.dtype)
    if compute_dtype != x.dtype and not _needs_grad(residual):
        wide_residual = None if residual is None else residual.to(compute_dtype)
        # A widened residual is a fresh copy, the result can be written into it.
        overwrite_wide = overwrite_residual or (wide_residual is not None and wide_residual is not residual)
        wide = cpu_inference(conv, norm, x.to(compute_dtype), wide_residual, relu, cache, overwrite_wide)
        return wide.to(x.dtype)
    if cache is None or torch.is_grad_enabled() or torch.compiler.is_compiling() or x.shape[0] == 0:
        return _decide(conv, norm, x, residual, relu, cache, overwrite_residual)(x, residual)
    signature = _signature(conv, x, residual, relu, overwrite_residual)
    step, entry = cache.step(conv, norm, signature)
    if step is not None:
        out = step.run_trusted(x, residual)
        cpu_replay.note_step(step, cache, entry, conv, norm, x, residual, out)
        return out
    step = _decide(conv, norm, x, residual, relu, cache, overwrite_residual)
    out = step(x, residual)  # checked: an error raises before the step is kept
    cache.keep_step(conv, norm, signature, x.dtype, step)
    return out


def _signature(conv: nn.Conv2d, x: Tensor, residual: Optional[Tensor], relu: bool, overwrite_residual: bool) -> tuple:
    """What _decide reads besides the weights (which the cache watches), for
    a call under no_grad: x's dtype and shape, the residual's dtype, shape,
    device and layout, the flags, and for a 3x3 convolution the Winograd
    setting and the thread count (ops.cpu_conv_algorithm)."""
    shortcut = None if residual is None else (
        residual.dtype, residual.shape, residual.device, residual.is_contiguous(memory_format=torch.channels_last))
    winograd = (ops.cpu_winograd_enabled(), torch.get_num_threads()) if conv.kernel_size == (3, 3) else None
    return x.dtype, x.shape, shortcut, relu, overwrite_residual, winograd


def _decide(conv: nn.Conv2d, norm: nn.Module, x: Tensor, residual: Optional[Tensor], relu: bool,
            cache: Optional[FoldCache], overwrite_residual: bool) -> CpuStep:
    """The Winograd convolution where ops.cpu_conv_algorithm picks it and
    the weight allows, oneDNN's with the weight prepacked for x's shape
    otherwise (folded in x's dtype); written into the residual where
    overwrite_residual and the residual allow."""
    if cache is not None and not _needs_grad(residual) and ops.cpu_conv_algorithm(
            x, conv.weight, conv.stride, conv.padding, conv.dilation, conv.groups) == "winograd":
        transformed = cache.winograd(conv, norm)
        if transformed is not None:
            into = overwrite_residual and _may_write_into(residual, transformed[0])
            return CpuStep("conv3x3_winograd_bias_act", transformed, (relu,), into)
    if cache is None:
        weight, bias = fold_conv_norm(conv, norm, x.dtype)
    else:
        weight, bias = cache.folded(conv, norm, x, dtype=x.dtype)
    into = overwrite_residual and _may_write_into(residual, weight)
    return CpuStep("conv_bias_act", (weight, bias), (conv.stride, conv.padding, conv.dilation, conv.groups, relu), into)


def _needs_grad(t: Optional[Tensor]) -> bool:
    return t is not None and t.requires_grad and torch.is_grad_enabled()


def _may_write_into(residual: Optional[Tensor], weight: Tensor) -> bool:
    """Whether the convolution can take residual as its output: oneDNN's
    (float32, or half precision with the weight prepacked in that dtype),
    which accumulates into it; NHWC; and nothing autograd would track."""
    return (
        residual is not None
        and not torch.compiler.is_compiling()  # a compiled graph plans its own buffers
        and (residual.dtype == torch.float32 or (weight.is_mkldnn and residual.dtype == weight.dtype))
        and residual.is_contiguous(memory_format=torch.channels_last)
        and not (torch.is_grad_enabled() and (residual.requires_grad or weight.requires_grad))
    )
