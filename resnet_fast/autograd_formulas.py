"""Autograd formulas of the fused ops, shared by every kernel backend.

A backend provides its ops in a torch.ops namespace ("resnet_fast" for the
compiled extension, "resnet_fast_triton" for Triton) with the schemas of
csrc/ops.cpp; register(namespace) makes its two forward ops differentiable
through the same namespace's backward kernels.
"""
import torch

from .validation import effective_dilation


def register(namespace: str) -> None:
    kernels = getattr(torch.ops, namespace)

    def conv_setup(ctx, inputs, output):
        x, weight, bias, residual, stride, padding, dilation, groups, relu = inputs
        ctx.save_for_backward(x, weight, output)
        ctx.conv_args = (stride, padding, effective_dilation(weight.shape, dilation), groups)
        ctx.relu, ctx.bias_dtype, ctx.has_residual = relu, bias.dtype, residual is not None

    def conv_backward(ctx, grad_out):
        x, weight, out = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv_args
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
        ctx.save_for_backward(x, out, weight, mean, invstd)
        ctx.relu, ctx.has_residual = relu, residual is not None

    def bn_backward(ctx, grad_out, *_unused_stat_grads):
        x, out, weight, mean, invstd = ctx.saved_tensors
        grad_x, grad_w, grad_b, grad_z = kernels.bn_act_backward(grad_out, x, out, weight, mean, invstd, ctx.relu)
        grad_residual = (grad_z if ctx.relu else grad_out) if ctx.has_residual else None
        return grad_x, grad_w, grad_b, grad_residual, None, None

    torch.library.register_autograd(f"{namespace}::conv_bias_act", conv_backward, setup_context=conv_setup)
    torch.library.register_autograd(f"{namespace}::bn_act_train", bn_backward, setup_context=bn_setup)
