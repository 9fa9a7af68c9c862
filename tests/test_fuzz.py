"""Property-based parity: every kernel backend that runs on CPU tensors here
against resnet_fast.reference, over drawn geometries, dtypes, memory layouts,
residual and ReLU, forward and backward; non-finite inputs propagate as the
reference propagates them.

The hypothesis profile (tests/conftest.py) bounds the run: "ci" by default,
RESNET_FAST_FUZZ_PROFILE=long for thousands of examples per op. The
interpreted Triton kernels (~1000x slower) get smaller shapes and fewer
examples.
"""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from resnet_fast import ops, reference
from resnet_fast.backends import available_backends, resolve_backend, triton_interpreted
from resnet_fast.validation import conv_output_shape

from conftest import ELEM_TOL, REL_TOL, assert_rel, kernel_backends
from fuzz_inputs import (
    NON_FINITE, activation_shapes, conv_geometries, dtypes, laid_out, layouts, plant, randn, seeds,
)

CPU = torch.device("cpu")


def _runs_on_cpu(backend: str) -> bool:
    try:
        resolve_backend(backend, CPU)
    except RuntimeError:
        return False
    return True


BACKENDS = [b for b in kernel_backends() if _runs_on_cpu(b)]
TRITON = ["triton"] if available_backends()["triton"].available and triton_interpreted() else []
# The interpreter does not simulate bf16 tl.dot (the Triton conv raises for it).
TRITON_CONV_DTYPES = st.sampled_from((torch.float32, torch.float16))
TRITON_EXAMPLES = max(10, settings.default.max_examples // 4)

needs_backends = pytest.mark.skipif(not BACKENDS, reason="no kernel backend runs on CPU tensors here")
needs_triton = pytest.mark.skipif(not TRITON, reason="the Triton kernels do not run on CPU tensors here")


def forward_backward(fn, leaves, grad):
    """fn(*leaves), and with grad the gradients of its (first) output with
    respect to every leaf that is not None."""
    if grad is None:
        with torch.no_grad():
            return fn(*leaves), []
    leaves = [t.detach().requires_grad_() if t is not None else None for t in leaves]
    out = fn(*leaves)
    first = out[0] if isinstance(out, tuple) else out
    grads = torch.autograd.grad(first, [t for t in leaves if t is not None], grad)
    return out, list(grads)


def assert_close_to_terms(got, expected, dtype, terms=0.0, factor=1.0):
    """||got - expected|| within the dtype's relative tolerance of the larger
    of ||expected|| and `terms`, the norm of the absolute terms summed into
    it: a result that cancels to nearly zero is only as exact as those."""
    assert got.shape == expected.shape and torch.isfinite(got).all()
    err = (got.double() - expected.double()).norm().item()
    scale = max(expected.double().norm().item(), terms)
    assert err <= factor * REL_TOL[dtype] * scale, f"error {err:.3g} against a scale of {scale:.3g}"


def assert_grads(got, expected, dtype, scales=None):
    # Gradients go through one more reduction than the forward: 10x.
    scales = scales or [0.0] * len(expected)
    for g, e, scale in zip(got, expected, scales, strict=True):
        assert_close_to_terms(g, e, dtype, scale, factor=10)


# ------------------------------------------------------------ conv_bias_act

def check_conv(backends, geometry, dtype, bias_fp32, x_layout, res_layout, residual, relu, backward, seed):
    gen = torch.Generator().manual_seed(seed)
    x = laid_out(randn(gen, geometry["x_shape"], dtype), x_layout)
    w_shape = geometry["w_shape"]
    weight = randn(gen, w_shape, dtype, scale=math.prod(w_shape[1:]) ** -0.5)
    bias = randn(gen, w_shape[:1], torch.float32 if bias_fp32 else dtype)
    args = {k: geometry[k] for k in ("stride", "padding", "dilation", "groups")}
    out_shape = conv_output_shape(x.shape, w_shape, args["stride"], args["padding"], args["dilation"])
    res = laid_out(randn(gen, out_shape, dtype), res_layout) if residual else None
    grad = randn(gen, out_shape, dtype) if backward else None

    def run(backend, x=x, res=res):
        return forward_backward(
            lambda x_, w_, b_, r_: ops.conv_bias_act(x_, w_, b_, r_, relu=relu, backend=backend, **args),
            [x, weight, bias, res], grad,
        )

    # The reference on NCHW copies: aten's CPU bf16 convolution backward on
    # channels_last tensors can return garbage weight gradients.
    expected, expected_grads = run("reference", x.contiguous(), None if res is None else res.contiguous())
    terms = torch.nn.functional.conv2d(x.double().abs(), weight.double().abs(), bias.double().abs(), **args)
    terms = (terms + (0 if res is None else res.double().abs())).norm().item()
    for backend in backends:
        out, grads = run(backend)
        assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last), backend
        assert_close_to_terms(out, expected, dtype, terms)
        assert_grads(grads, expected_grads, dtype)


conv_options = dict(
    bias_fp32=st.booleans(), x_layout=layouts, res_layout=layouts, residual=st.booleans(),
    relu=st.booleans(), backward=st.booleans(), seed=seeds,
)


@needs_backends
@given(geometry=conv_geometries(), dtype=dtypes, **conv_options)
def test_conv_bias_act_matches_reference(**drawn):
    check_conv(BACKENDS, **drawn)


@needs_triton
@settings(max_examples=TRITON_EXAMPLES)
@given(geometry=conv_geometries(max_batch=2, max_group_channels=3, max_extra_size=4), dtype=TRITON_CONV_DTYPES,
       **conv_options)
def test_triton_conv_bias_act_matches_reference(**drawn):
    check_conv(TRITON, **drawn)


# ------------------------------------------------------------- bn_act_train

def check_bn(backends, shape, dtype, param_fp32, x_layout, res_layout, residual, relu, running, momentum, eps,
             shift, scale, backward, seed):
    gen = torch.Generator().manual_seed(seed)
    x = laid_out(randn(gen, shape, dtype, scale=scale, shift=shift), x_layout)
    param_dtype = torch.float32 if param_fp32 else dtype
    weight = (torch.rand(shape[1], generator=gen) + 0.5).to(param_dtype)
    bias = randn(gen, shape[1:2], param_dtype)
    res = laid_out(randn(gen, shape, dtype), res_layout) if residual else None
    stats = (randn(gen, shape[1:2]), torch.rand(shape[1], generator=gen) + 0.5) if running else (None, None)
    grad = randn(gen, shape, dtype) if backward else None

    def run(backend):
        running_stats = [None if s is None else s.clone() for s in stats]
        out, grads = forward_backward(
            lambda x_, w_, b_, r_: ops.bn_act_train(x_, w_, b_, *running_stats, r_, momentum, eps, relu, backend),
            [x, weight, bias, res], grad,
        )
        return out, grads, running_stats

    (expected, mean, invstd), expected_grads, expected_stats = run("reference")
    scales = None
    if backward:  # the size of the terms each gradient sums (see assert_grads)
        view = (1, -1, 1, 1)
        dz, xhat = grad.double().abs(), ((x.double() - mean.double().view(view)) * invstd.double().view(view)).abs()
        scales = [
            ((weight.double() * invstd.double()).abs().view(view) * dz).norm().item(),
            (dz * xhat).sum(dim=(0, 2, 3)).norm().item(),
            dz.sum(dim=(0, 2, 3)).norm().item(),
            dz.norm().item(),
        ][:len(expected_grads)]
    for backend in backends:
        (out, got_mean, got_invstd), grads, got_stats = run(backend)
        assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last), backend
        assert_rel(out, expected)
        for got, ref in [(got_mean, mean), (got_invstd, invstd)] + list(zip(got_stats, expected_stats)):
            if ref is not None:
                assert got.dtype == torch.float32
                assert_rel(got, ref, factor=10)
        assert_grads(grads, expected_grads, dtype, scales)


bn_options = dict(
    param_fp32=st.booleans(), x_layout=layouts, res_layout=layouts, residual=st.booleans(), relu=st.booleans(),
    running=st.booleans(), momentum=st.floats(0.0, 1.0), eps=st.sampled_from((1e-5, 1e-3, 0.1)),
    shift=st.floats(-4.0, 4.0), scale=st.floats(0.25, 4.0), backward=st.booleans(), seed=seeds,
)


@needs_backends
@given(shape=activation_shapes(min_count=2), dtype=dtypes, **bn_options)
def test_bn_act_train_matches_reference(**drawn):
    check_bn(BACKENDS, **drawn)


@needs_triton
@settings(max_examples=TRITON_EXAMPLES)
@given(shape=activation_shapes(max_batch=2, max_channels=5, max_size=4, min_count=2), dtype=dtypes, **bn_options)
def test_triton_bn_act_train_matches_reference(**drawn):
    check_bn(TRITON, **drawn)


# ----------------------------------------------------------------- bias_act

@needs_backends
@given(shape=activation_shapes(), dtype=dtypes, bias_fp32=st.booleans(), y_layout=layouts, res_layout=layouts,
       residual=st.booleans(), relu=st.booleans(), seed=seeds)
def test_bias_act_matches_reference(shape, dtype, bias_fp32, y_layout, res_layout, residual, relu, seed):
    gen = torch.Generator().manual_seed(seed)
    y = laid_out(randn(gen, shape, dtype), y_layout)
    bias = randn(gen, shape[1:2], torch.float32 if bias_fp32 else dtype)
    res = laid_out(randn(gen, shape, dtype), res_layout) if residual else None
    expected = reference.bias_act(y, bias, res, relu)
    for backend in BACKENDS:
        out = ops.bias_act(y, bias, res, relu, backend=backend)
        assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last), backend
        torch.testing.assert_close(out, expected, **ELEM_TOL[dtype])


# ------------------------------------------------------ NaN and Inf inputs

def assert_same_non_finite(out, expected, dtype):
    """NaN where the reference has NaN, the same infinities, the finite
    values close."""
    assert torch.equal(out.isnan(), expected.isnan()), "NaN in different places than the reference"
    torch.testing.assert_close(out, expected, equal_nan=True, **ELEM_TOL[dtype])


non_finite = dict(
    value=st.sampled_from(NON_FINITE), count=st.integers(1, 3), residual=st.booleans(), relu=st.booleans(),
    seed=seeds,
)


def check_conv_non_finite(geometry, dtype, where, value, count, residual, relu, seed):
    gen = torch.Generator().manual_seed(seed)
    w_shape = geometry["w_shape"]
    args = {k: geometry[k] for k in ("stride", "padding", "dilation", "groups")}
    out_shape = conv_output_shape(geometry["x_shape"], w_shape, args["stride"], args["padding"], args["dilation"])
    inputs = dict(
        x=randn(gen, geometry["x_shape"], dtype), weight=randn(gen, w_shape, dtype, scale=0.3),
        bias=randn(gen, w_shape[:1], dtype), residual=randn(gen, out_shape, dtype) if residual else None,
    )
    if inputs[where] is not None:
        inputs[where] = plant(gen, inputs[where], value, count)
    expected = reference.conv_bias_act(**inputs, relu=relu, **args)
    for backend in BACKENDS:
        out = ops.conv_bias_act(**inputs, relu=relu, backend=backend, **args)
        assert_same_non_finite(out, expected, dtype)


# float32 only: for bf16 PyTorch's own CPU convolutions place NaN/Inf
# differently from exact arithmetic, and differently between NCHW and NHWC
# (a NaN spreads to a neighbouring pixel of a 1x1 conv; an Inf weight of a
# grouped conv gives NaN), and the native backend runs those same kernels.
@needs_backends
@given(geometry=conv_geometries(max_group_channels=3, kernels=(1, 3)), dtype=st.just(torch.float32),
       where=st.sampled_from(("x", "bias", "residual")), **non_finite)
def test_conv_bias_act_non_finite_like_reference(**drawn):
    check_conv_non_finite(**drawn)


# A weight tap that meets only zero padding: aten's im2col multiplies it by
# the zero (NaN * 0 = NaN) where oneDNN and cuDNN skip the padding, so
# backends legitimately differ there; without padding every tap meets data.
@needs_backends
@given(geometry=conv_geometries(max_group_channels=3, kernels=(1, 3), max_padding=0), dtype=st.just(torch.float32),
       where=st.just("weight"), **non_finite)
def test_conv_bias_act_non_finite_weight_like_reference(**drawn):
    check_conv_non_finite(**drawn)


@needs_backends
@given(shape=activation_shapes(min_count=2), dtype=dtypes, where=st.sampled_from(("x", "weight", "bias", "residual")),
       **non_finite)
def test_bn_act_train_non_finite_like_reference(shape, dtype, where, value, count, residual, relu, seed):
    gen = torch.Generator().manual_seed(seed)
    inputs = dict(
        x=randn(gen, shape, dtype), weight=randn(gen, shape[1:2]), bias=randn(gen, shape[1:2]),
        residual=randn(gen, shape, dtype) if residual else None,
    )
    if inputs[where] is not None:
        inputs[where] = plant(gen, inputs[where], value, count)
    expected, mean, invstd = ops.bn_act_train(**inputs, relu=relu, backend="reference")
    for backend in BACKENDS:
        out, got_mean, got_invstd = ops.bn_act_train(**inputs, relu=relu, backend=backend)
        assert_same_non_finite(out, expected, dtype)
        assert_same_non_finite(got_mean, mean, torch.float32)
        assert torch.equal(got_invstd.isnan(), invstd.isnan())


@needs_backends
@given(shape=activation_shapes(), dtype=dtypes, where=st.sampled_from(("y", "bias", "residual")), **non_finite)
def test_bias_act_non_finite_like_reference(shape, dtype, where, value, count, residual, relu, seed):
    gen = torch.Generator().manual_seed(seed)
    inputs = dict(y=randn(gen, shape, dtype), bias=randn(gen, shape[1:2]),
                  residual=randn(gen, shape, dtype) if residual else None)
    if inputs[where] is not None:
        inputs[where] = plant(gen, inputs[where], value, count)
    expected = reference.bias_act(inputs["y"], inputs["bias"], inputs["residual"], relu)
    for backend in BACKENDS:
        assert_same_non_finite(ops.bias_act(**inputs, relu=relu, backend=backend), expected, dtype)
