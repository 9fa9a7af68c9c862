"""Autograd formulas of the fused ops, shared by every kernel backend.

A backend provides its ops in a torch.ops namespace ("resnet_fast" for the
compiled extension, "resnet_fast_triton" for Triton) with the schemas of
csrc/ops.cpp; register(namespace) makes its two forward ops differentiable
through the same namespace's backward kernels.

The backward kernels are not differentiable themselves. A backward that
must be (torch.autograd.grad(..., create_graph=True): gradient penalties,
double backprop, second-order meta-learning) runs through the reference
instead: the op recomputed with autograd, differentiated with create_graph.

resnet_fast.ops calls the forward ops through call(), which applies the
same formulas as a plain autograd.Function outside torch.compile: the
registered route passes through several layers of Python in torch.library
(about 0.1 ms a call on the CPU, 2-3% of a ResNet training step there),
while a compiled graph must see the op itself.
"""
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import reference
from .validation import effective_dilation, taps_meet_only_padding


def _differentiable_vjp(op: Callable[..., Tensor], inputs: Sequence[Optional[Tensor]], needs_grad: Sequence[bool],
                        grad_out: Tensor, *args) -> Tuple[Optional[Tensor], ...]:
    """Gradients of op(*inputs, *args) for grad_out, with their own graph.

    The op is recomputed on fresh views of the inputs, and differentiated
    with respect to those: with respect to the inputs themselves, autograd
    would also follow every path between them (the residual is often an
    ancestor of x) and count those terms twice."""
    wanted = [i for i, (t, needed) in enumerate(zip(inputs, needs_grad)) if needed and t is not None]
    with torch.enable_grad():
        views = [t.view_as(t) if i in wanted else t for i, t in enumerate(inputs)]
        out = op(*views, *args)
        grads = torch.autograd.grad(out, [views[i] for i in wanted], grad_out, create_graph=True, allow_unused=True)
    result: list = [None] * len(inputs)
    for i, g in zip(wanted, grads):
        result[i] = torch.zeros_like(inputs[i]) if g is None else g
    return tuple(result)


_EAGER_FUNCTIONS: Dict[Tuple[str, str], type] = {}


def call(namespace: str, name: str, *inputs):
    """torch.ops.<namespace>.<name>(*inputs), differentiable through the
    formulas register(namespace) gave it."""
    if torch.compiler.is_compiling():
        return getattr(getattr(torch.ops, namespace), name)(*inputs)
    if not torch.is_grad_enabled():  # what the registered route does too
        with torch._C._AutoDispatchBelowAutograd():
            return getattr(getattr(torch.ops, namespace), name)(*inputs)
    return _EAGER_FUNCTIONS[(namespace, name)].apply(*inputs)


def _eager_function(name: str, kernel: Callable, setup_context: Callable, backward: Callable) -> type:
    """kernel with the formulas setup_context and backward, as an
    autograd.Function that calls it below the autograd dispatch key."""

    def forward(ctx, *inputs):
        with torch._C._AutoDispatchBelowAutograd():
            output = kernel(*inputs)
        setup_context(ctx, inputs, output)
        return output

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(forward), "backward": staticmethod(backward)})


def register(namespace: str) -> None:
    kernels = getattr(torch.ops, namespace)

    def conv_setup(ctx, inputs, output):
        x, weight, bias, residual, stride, padding, dilation, groups, relu = inputs
        # bias and residual only for a differentiable backward; they stay alive anyway
        # (a parameter; the block's input or its shortcut's output, which autograd keeps).
        ctx.save_for_backward(x, weight, output, bias, residual)
        ctx.conv_args = (stride, padding, effective_dilation(weight.shape, dilation), groups)
        ctx.relu, ctx.bias_dtype, ctx.has_residual = relu, bias.dtype, residual is not None

    def conv_backward(ctx, grad_out):
        x, weight, out, bias, residual = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv_args
        if torch.is_grad_enabled():  # create_graph=True
            grads = _differentiable_vjp(
                reference.conv_bias_act, (x, weight, bias, residual), ctx.needs_input_grad[:4], grad_out,
                stride, padding, dilation, groups, ctx.relu,
            )
            return (*grads, None, None, None, None, None)
        # dReLU and d bias in one pass; the masked gradient is also d residual.
        grad_z, grad_bias = kernels.bias_act_backward(grad_out, out, ctx.relu)
        dz = grad_z if ctx.relu else grad_out
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = grad_w = None
        if need_x or need_w:  # d input and d weight: aten's convolution backward
            conv_dz, conv_x = dz, x
            half_on_cpu = dz.device.type == "cpu" and dz.dtype in (torch.bfloat16, torch.float16)
            if half_on_cpu:
                # aten's CPU bf16 convolution backward on channels_last tensors returns
                # garbage weight gradients for taps that meet only padding; NCHW is right
                # on AVX2 CPUs, but not with AVX-512/AMX kernels, so there the weight
                # gradient is computed in float32.
                conv_dz, conv_x = dz.contiguous(), x.contiguous()
            weight_in_float32 = need_w and half_on_cpu and taps_meet_only_padding(
                x.shape[2:], weight.shape[2:], stride, padding, dilation)
            grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
                conv_dz, conv_x, weight, None, stride, padding, dilation, False, [0, 0], groups,
                [need_x, need_w and not weight_in_float32, False]
            )
            if weight_in_float32:
                grad_w = torch.ops.aten.convolution_backward(
                    conv_dz.float(), conv_x.float(), weight.float(), None, stride, padding, dilation, False, [0, 0],
                    groups, [False, True, False]
                )[1].to(weight.dtype)
        grad_residual = dz if ctx.has_residual else None
        return grad_x, grad_w, grad_bias.to(ctx.bias_dtype), grad_residual, None, None, None, None, None

    def bn_setup(ctx, inputs, output):
        x, weight, bias, residual, eps, relu = inputs
        out, mean, invstd, _ = output
        ctx.save_for_backward(x, out, weight, mean, invstd, bias, residual)
        ctx.relu, ctx.has_residual, ctx.eps = relu, residual is not None, eps

    def bn_backward(ctx, grad_out, *_unused_stat_grads):
        x, out, weight, mean, invstd, bias, residual = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            grads = _differentiable_vjp(
                lambda *t: reference.bn_act_train(*t)[0], (x, weight, bias, residual), ctx.needs_input_grad[:4],
                grad_out, ctx.eps, ctx.relu,
            )
            return (*grads, None, None)
        grad_x, grad_w, grad_b, grad_z = kernels.bn_act_backward(grad_out, x, out, weight, mean, invstd, ctx.relu)
        grad_residual = (grad_z if ctx.relu else grad_out) if ctx.has_residual else None
        return grad_x, grad_w, grad_b, grad_residual, None, None

    for name, setup, backward in (("conv_bias_act", conv_setup, conv_backward), ("bn_act_train", bn_setup, bn_backward)):
        torch.library.register_autograd(f"{namespace}::{name}", backward, setup_context=setup)
        _EAGER_FUNCTIONS[(namespace, name)] = _eager_function(
            f"{namespace}_{name}", getattr(kernels, name).default, setup, backward)
