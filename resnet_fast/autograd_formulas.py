"""Autograd formulas of the fused ops, shared by every kernel backend.

A backend provides its ops in a torch.ops namespace ("resnet_fast" for the
compiled extension, "resnet_fast_triton" for Triton) with the schemas of
csrc/ops.cpp; register(namespace) makes its two forward ops differentiable
through the same namespace's backward kernels.

The backward kernels are not differentiable themselves. A backward that
must be (torch.autograd.grad(..., create_graph=True): gradient penalties,
double backprop, second-order meta-learning) runs through the reference
instead: the op recomputed with autograd, differentiated with create_graph.
"""
from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import reference
from .validation import effective_dilation


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
            if dz.device.type == "cpu" and dz.dtype == torch.bfloat16:
                # aten's CPU bf16 convolution backward on channels_last tensors returns
                # garbage weight gradients for taps that meet only padding; NCHW is right.
                conv_dz, conv_x = dz.contiguous(), x.contiguous()
            grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
                conv_dz, conv_x, weight, None, stride, padding, dilation, False, [0, 0], groups, [need_x, need_w, False]
            )
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

    torch.library.register_autograd(f"{namespace}::conv_bias_act", conv_backward, setup_context=conv_setup)
    torch.library.register_autograd(f"{namespace}::bn_act_train", bn_backward, setup_context=bn_setup)
