"""Every op of the contract, on every available kernel backend, against
resnet_fast.reference; and the reference itself against plain PyTorch."""
import itertools

import pytest
import torch
import torch.nn.functional as F

import resnet_fast
from resnet_fast import ops, reference

from conftest import ELEM_TOL, assert_rel, channels_last, kernel_backends, poison_allocator

BACKENDS = kernel_backends()
# Tests of the extension's operators called directly (torch.ops.resnet_fast).
needs_native = pytest.mark.skipif("native" not in BACKENDS, reason="the native extension is not built")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# (N, C, H, W, K, kernel, stride, padding, dilation, groups): the conv kinds of
# the ResNet family, at awkward sizes.
CONV_CASES = {
    "stem7x7s2_C3": (2, 3, 23, 19, 16, 7, 2, 3, 1, 1),
    "3x3s1_batch1": (1, 8, 9, 11, 12, 3, 1, 1, 1, 1),
    "3x3s2_odd": (2, 6, 13, 7, 10, 3, 2, 1, 1, 1),
    "1x1": (3, 16, 5, 5, 24, 1, 1, 0, 1, 1),
    "1x1s2_downsample": (2, 12, 9, 10, 20, 1, 2, 0, 1, 1),
    "grouped": (2, 16, 7, 9, 16, 3, 1, 1, 1, 4),
    "grouped_s2": (1, 12, 11, 11, 24, 3, 2, 1, 1, 3),
    "dilated": (2, 8, 12, 10, 8, 3, 1, 2, 2, 1),
    # layer4 of a ResNet on a 32x32 image: a single output pixel (+ residual)
    "3x3_single_pixel": (2, 8, 1, 1, 12, 3, 1, 1, 1, 1),
    # a single output channel (+ residual): NHWC strides as ambiguous as above
    "1x1_one_output_channel": (1, 2, 1, 3, 1, 1, 1, 0, 1, 1),
}


def make_conv(case, dtype, layout="channels_last", cases=CONV_CASES):
    """Random x, weight, bias and the conv arguments of cases[case], a tuple
    (n, c, h, w, k, kernel size, stride, padding, dilation, groups)."""
    n, c, h, w, k, r, stride, padding, dilation, groups = cases[case]
    x = torch.randn(n, c, h, w, dtype=dtype)
    if layout == "channels_last":
        x = channels_last(x)
    elif layout == "sliced":  # non-contiguous view
        x = torch.randn(n, c, h, w * 2 + 1, dtype=dtype)[..., 1::2]
    weight = torch.randn(k, c // groups, r, r, dtype=dtype) / (c // groups * r * r) ** 0.5
    bias = torch.randn(k, dtype=dtype)
    args = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    return x, weight, bias, args


def conv_out_shape(x, weight, args):
    return ops.conv_output_shape(x.shape, weight.shape, (args["stride"],) * 2, (args["padding"],) * 2, (args["dilation"],) * 2)


def test_reference_conv_matches_plain_pytorch():
    x, weight, bias, args = make_conv("grouped_s2", torch.float64)
    residual = torch.randn(conv_out_shape(x, weight, args), dtype=torch.float64)
    expected = torch.relu(F.conv2d(x, weight, bias, **args) + residual)
    got = reference.conv_bias_act(x, weight, bias, residual, relu=True, **{k: (v, v) if k != "groups" else v for k, v in args.items()})
    assert_rel(got, expected, dtype=torch.float32)  # the epilogue runs in fp32


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CONV_CASES))
@pytest.mark.parametrize("residual,relu", [(True, True), (False, True), (False, False), (True, False)])
def test_conv_bias_act(backend, dtype, case, residual, relu):
    x, weight, bias, args = make_conv(case, dtype)
    res = channels_last(torch.randn(conv_out_shape(x, weight, args), dtype=dtype)) if residual else None
    expected = ops.conv_bias_act(x, weight, bias, res, relu=relu, backend="reference", **args)
    poison_allocator(expected.numel())
    out = ops.conv_bias_act(x, weight, bias, res, relu=relu, backend=backend, **args)
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    assert_rel(out, expected)
    if relu:
        assert (out >= 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "sliced"])
def test_conv_bias_act_any_input_layout(backend, layout):
    x, weight, bias, args = make_conv("3x3s2_odd", torch.float32, layout)
    res = torch.randn(conv_out_shape(x, weight, args)).transpose(2, 3).contiguous().transpose(2, 3)
    expected = reference.conv_bias_act(x.contiguous(), weight, bias, res.contiguous(), (2, 2), (1, 1), (1, 1), 1, True)
    assert_rel(ops.conv_bias_act(x, weight, bias, res, backend=backend, **args), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_prepacked_weight_matches(backend):
    x, weight, bias, args = make_conv("3x3s2_odd", torch.float32)
    packed = ops.prepack_conv_weight(weight, args["stride"], args["padding"], args["dilation"], args["groups"])
    if packed is None:
        pytest.skip("oneDNN prepacking is not available in this torch build")
    res = channels_last(torch.randn(conv_out_shape(x, weight, args)))
    expected = reference.conv_bias_act(x, weight, bias, res, (2, 2), (1, 1), (1, 1), 1, True)
    with torch.no_grad():
        assert_rel(ops.conv_bias_act(x, packed, bias, res, **args), expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 8, 5, 7), (1, 3, 1, 1), (3, 33, 4, 3)])
@pytest.mark.parametrize("residual,relu", [(True, True), (False, True), (False, False)])
def test_bias_act(backend, dtype, shape, residual, relu):
    y = torch.randn(shape, dtype=dtype)
    bias = torch.randn(shape[1])
    res = torch.randn(shape, dtype=dtype) if residual else None
    expected = reference.bias_act(y, bias, res, relu)
    poison_allocator(y.numel())
    out = ops.bias_act(y, bias, res, relu, backend=backend)
    torch.testing.assert_close(out, expected, **ELEM_TOL[dtype])


@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("relu", [True, False])
def test_bias_act_backward( dtype, relu):
    out = torch.randn(3, 10, 6, 5, dtype=dtype)
    grad = torch.randn(3, 10, 6, 5, dtype=dtype)
    ref_z, ref_b = reference.bias_act_backward(grad, out, relu)
    got_z, got_b = torch.ops.resnet_fast.bias_act_backward(grad, out, relu)
    assert got_z.numel() == (grad.numel() if relu else 0)
    if relu:
        torch.testing.assert_close(got_z, ref_z, **ELEM_TOL[dtype])
    assert got_b.dtype == torch.float32
    torch.testing.assert_close(got_b, ref_b, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------- batch norm

BN_SHAPES = [(4, 8, 5, 7), (1, 3, 3, 5), (2, 37, 9, 1), (8, 64, 2, 2)]


def _bn_inputs(shape, dtype, layout="channels_last"):
    # A large mean and small spread: a naive E[x^2] - E[x]^2 would lose the variance.
    x = torch.randn(shape) * 0.5 + 3.0
    x = x.to(dtype)
    x = channels_last(x) if layout == "channels_last" else x
    weight = torch.rand(shape[1]) + 0.5
    bias = torch.randn(shape[1])
    return x, weight, bias


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_reference_bn_matches_functional_batch_norm(dtype):
    x, weight, bias = _bn_inputs((4, 6, 5, 3), torch.float64)
    out, mean, invstd, var = reference.bn_act_train(x, weight, bias, None, 1e-5, False)
    expected = F.batch_norm(x, None, None, weight.double(), bias.double(), training=True, eps=1e-5)
    assert_rel(out, expected, dtype=torch.float32)
    assert_rel(var, x.var(dim=(0, 2, 3), unbiased=False).float())


@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", BN_SHAPES)
@pytest.mark.parametrize("residual,relu", [(True, True), (False, True), (False, False)])
def test_bn_act_train_forward( dtype, shape, residual, relu):
    x, weight, bias = _bn_inputs(shape, dtype)
    res = torch.randn(shape, dtype=dtype) if residual else None
    ref_out, ref_mean, ref_invstd, ref_var = reference.bn_act_train(x, weight, bias, res, 1e-5, relu)
    poison_allocator(x.numel())
    out, mean, invstd, var = torch.ops.resnet_fast.bn_act_train(x, weight, bias, res, 1e-5, relu)
    torch.testing.assert_close(out, ref_out, **ELEM_TOL[dtype])
    for got, ref in ((mean, ref_mean), (invstd, ref_invstd), (var, ref_var)):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", BN_SHAPES)
@pytest.mark.parametrize("relu", [True, False])
def test_bn_act_backward( dtype, shape, relu):
    x, weight, bias = _bn_inputs(shape, dtype)
    out, mean, invstd, _ = reference.bn_act_train(x, weight, bias, torch.randn(shape, dtype=dtype), 1e-5, relu)
    grad = torch.randn(shape, dtype=dtype)
    expected = reference.bn_act_backward(grad, x, out, weight, mean, invstd, relu)
    poison_allocator(x.numel())
    got = torch.ops.resnet_fast.bn_act_backward(grad, x, out, weight, mean, invstd, relu)
    names = ("grad_x", "grad_weight", "grad_bias", "grad_z")
    for name, g, e in zip(names, got, expected):
        assert g.shape == e.shape, name
        if g.numel():
            tol = ELEM_TOL[dtype] if name in ("grad_x", "grad_z") else dict(rtol=1e-3, atol=1e-3)
            torch.testing.assert_close(g, e, **tol, msg=lambda m: f"{name}: {m}")


def test_reference_bn_backward_matches_autograd():
    x, weight, bias = _bn_inputs((3, 5, 4, 6), torch.float64)
    x, weight, bias = x.double(), weight.double(), bias.double()
    res = torch.randn(x.shape, dtype=torch.float64, requires_grad=True)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    out = torch.relu(F.batch_norm(leaves[0], None, None, leaves[1], leaves[2], training=True, eps=1e-5) + res)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref_out, mean, invstd, _ = reference.bn_act_train(x, weight, bias, res.detach(), 1e-5, True)
    gx, gw, gb, gz = reference.bn_act_backward(grad, x, ref_out.double(), weight, mean.double(), invstd.double(), True)
    for got, leaf in zip((gx, gw, gb), leaves):
        torch.testing.assert_close(got.double(), leaf.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gz.double(), res.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
@pytest.mark.parametrize("momentum", [0.0, 0.1, 1.0])
def test_bn_act_train_updates_running_stats_like_batchnorm(backend, momentum):
    x, weight, bias = _bn_inputs((4, 6, 5, 3), torch.float32)
    bn = torch.nn.BatchNorm2d(6, momentum=momentum)
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    running_mean, running_var = bn.running_mean.clone(), bn.running_var.clone()
    with torch.no_grad():
        bn.weight.copy_(weight)
        bn.bias.copy_(bias)
    expected = bn(x)
    out, _, _ = ops.bn_act_train(x, weight, bias, running_mean, running_var, None, momentum, bn.eps, False, backend)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(running_mean, bn.running_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(running_var, bn.running_var, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
@pytest.mark.parametrize("momentum", [0.0, 0.3])
def test_bn_act_train_updates_bfloat16_running_stats_rounding_once(backend, momentum):
    # A bfloat16 model's buffers: the update is computed in float32 and rounded once.
    x, weight, bias = _bn_inputs((3, 5, 4, 7), torch.bfloat16)
    weight, bias = weight.bfloat16(), bias.bfloat16()
    running_mean = torch.randn(5).bfloat16()
    running_var = torch.empty(5).uniform_(0.5, 2.0).bfloat16()
    before = running_mean.double(), running_var.double()
    ops.bn_act_train(x, weight, bias, running_mean, running_var, None, momentum, 1e-5, True, backend)
    batch = x.double().permute(1, 0, 2, 3).reshape(5, -1)
    expected_mean = (1 - momentum) * before[0] + momentum * batch.mean(1)
    expected_var = (1 - momentum) * before[1] + momentum * batch.var(1, unbiased=True)
    assert running_mean.dtype == running_var.dtype == torch.bfloat16
    torch.testing.assert_close(running_mean.double(), expected_mean, rtol=2 ** -8, atol=1e-6)
    torch.testing.assert_close(running_var.double(), expected_var, rtol=2 ** -8, atol=1e-6)
    if momentum == 0.0:
        assert torch.equal(running_mean.double(), before[0]) and torch.equal(running_var.double(), before[1])


# --------------------------------------------------------------- autograd

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["3x3s2_odd", "grouped", "stem7x7s2_C3"])
@pytest.mark.parametrize("relu", [True, False])
def test_conv_bias_act_gradients(backend, case, relu):
    x, weight, bias, args = make_conv(case, torch.float32)
    res = torch.randn(conv_out_shape(x, weight, args))
    grad = torch.randn(conv_out_shape(x, weight, args))
    grads = []
    for b in ("reference", backend):
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias, res)]
        out = ops.conv_bias_act(*leaves, relu=relu, backend=b, **args)
        out.backward(grad)
        grads.append([leaf.grad for leaf in leaves])
    for name, g, e in zip(("x", "weight", "bias", "residual"), grads[1], grads[0]):
        assert_rel(g, e, dtype=torch.float32, factor=10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("relu,residual", [(True, True), (True, False), (False, False)])
def test_bn_act_train_gradients(backend, relu, residual):
    x, weight, bias = _bn_inputs((3, 7, 5, 4), torch.float32)
    res = torch.randn(x.shape) if residual else None
    grad = torch.randn(x.shape)
    grads = []
    for b in ("reference", backend):
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)] + ([res.clone().requires_grad_()] if residual else [])
        out, _, _ = ops.bn_act_train(leaves[0], leaves[1], leaves[2], residual=leaves[3] if residual else None,
                                     relu=relu, backend=b)
        out.backward(grad)
        grads.append([leaf.grad for leaf in leaves])
    for g, e in zip(grads[1], grads[0]):
        assert_rel(g, e, dtype=torch.float32, factor=10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eager_route_equals_the_registered_op(backend):
    """ops.* applies the autograd formulas through a plain autograd.Function
    outside torch.compile; the op called directly goes through the formulas
    registered with torch.library. Same kernels, same formulas: the outputs
    and every gradient must be identical, and without grad mode no graph."""
    from resnet_fast.ops import _NAMESPACES

    kernels = getattr(torch.ops, _NAMESPACES[backend])
    x, weight, bias, args = make_conv("3x3s2_odd", torch.float32)
    res = channels_last(torch.randn(conv_out_shape(x, weight, args)))
    s, p, d, g = [args[k] if k == "groups" else [args[k]] * 2 for k in ("stride", "padding", "dilation", "groups")]
    bn_x, gamma, beta = _bn_inputs((3, 7, 5, 4), torch.float32)
    bn_res = channels_last(torch.randn(bn_x.shape))
    calls = {
        "conv_bias_act": ((x, weight, bias, res), lambda t, route: (
            ops.conv_bias_act(*t, relu=True, backend=backend, **args) if route == "ops"
            else kernels.conv_bias_act(*t, s, p, d, g, True))),
        "bn_act_train": ((bn_x, gamma, beta, bn_res), lambda t, route: (
            ops.bn_act_train(*t[:3], residual=t[3], relu=True, backend=backend)[0] if route == "ops"
            else kernels.bn_act_train(*t, 1e-5, True)[0])),
    }
    for name, (inputs, run) in calls.items():
        results = {}
        for route in ("ops", "registered"):
            leaves = [t.clone().requires_grad_() for t in inputs]
            out = run(leaves, route)
            out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(0)))
            results[route] = [out.detach()] + [leaf.grad for leaf in leaves]
        for got, expected in zip(results["ops"], results["registered"]):
            assert torch.equal(got, expected), name
        with torch.no_grad():
            assert run([t.clone().requires_grad_() for t in inputs], "ops").grad_fn is None


@needs_native
def test_opcheck_native_ops():
    """Schemas, fake kernels and autograd registrations agree with the kernels."""
    x, weight, bias, args = make_conv("3x3s2_odd", torch.float32)
    res = channels_last(torch.randn(conv_out_shape(x, weight, args)))
    s, p, d, g = [args[k] if k == "groups" else [args[k]] * 2 for k in ("stride", "padding", "dilation", "groups")]
    conv_args = (x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_(), res, s, p, d, g, True)
    torch.library.opcheck(torch.ops.resnet_fast.conv_bias_act.default, conv_args)
    bx, bw, bb = _bn_inputs((3, 6, 4, 5), torch.float32)
    torch.library.opcheck(torch.ops.resnet_fast.bn_act_train.default,
                          (bx.requires_grad_(), bw.requires_grad_(), bb.requires_grad_(), None, 1e-5, True))
    y = torch.randn(2, 5, 3, 3)
    torch.library.opcheck(torch.ops.resnet_fast.bias_act.default, (y, torch.randn(5), y.clone(), True))
    torch.library.opcheck(torch.ops.resnet_fast.bias_act_backward.default, (y, y.clone(), True))
    out, mean, invstd, _ = torch.ops.resnet_fast.bn_act_train(bx.detach(), bw.detach(), bb.detach(), None, 1e-5, True)
    torch.library.opcheck(torch.ops.resnet_fast.bn_act_backward.default,
                          (torch.randn(bx.shape), bx.detach(), out, bw.detach(), mean, invstd, True))


# ------------------------------------------------------------------ fold_bn

@pytest.mark.parametrize("conv_bias", [False, True])
def test_fold_bn_equals_conv_then_eval_bn(conv_bias):
    conv = torch.nn.Conv2d(6, 10, 3, padding=1, bias=conv_bias)
    bn = torch.nn.BatchNorm2d(10).eval()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.3, 3.0)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.normal_()
    x = torch.randn(2, 6, 7, 9)
    weight, bias = ops.fold_bn(conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps, conv.bias)
    with torch.no_grad():
        assert_rel(F.conv2d(x, weight, bias, padding=1), bn(conv(x)))


# -------------------------------------------------------------- bad input

def _conv_call(**overrides):
    x, weight, bias, args = make_conv("3x3s1_batch1", torch.float32)
    call = dict(x=x, weight=weight, bias=bias, residual=None, **args)
    call.update(overrides)
    return lambda backend: ops.conv_bias_act(**call, backend=backend)


BAD_CONV_CALLS = {
    "3-D input": (_conv_call(x=torch.randn(8, 9, 11)), ValueError, "4-D"),
    "integer input": (_conv_call(x=torch.ones(1, 8, 9, 11, dtype=torch.int64)), TypeError, "float32"),
    "float64 input": (_conv_call(x=torch.randn(1, 8, 9, 11, dtype=torch.float64)), TypeError, "float32"),
    "empty image": (_conv_call(x=torch.randn(1, 8, 0, 11)), ValueError, "empty"),
    "wrong channels": (_conv_call(x=torch.randn(1, 5, 9, 11)), ValueError, "channels"),
    "weight dtype": (_conv_call(weight=torch.randn(12, 8, 3, 3, dtype=torch.bfloat16)), TypeError, "weight has dtype"),
    "weight device": (_conv_call(weight=torch.randn(12, 8, 3, 3, device="meta")), ValueError, "weight is on meta"),
    "bias shape": (_conv_call(bias=torch.randn(11)), ValueError, "bias has shape"),
    "residual shape": (_conv_call(residual=torch.randn(1, 12, 9, 10)), ValueError, "residual has shape"),
    "groups": (_conv_call(groups=3), ValueError, "groups=3"),
    "kernel too large": (_conv_call(x=torch.randn(1, 8, 1, 1), padding=0), ValueError, "smaller than"),
    "zero stride": (_conv_call(stride=0), ValueError, "stride"),
}


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
@pytest.mark.parametrize("case", list(BAD_CONV_CALLS))
def test_conv_bias_act_rejects_bad_input(backend, case):
    call, error, message = BAD_CONV_CALLS[case]
    with pytest.raises(error, match=message):
        call(backend)


@needs_native
def test_native_ops_check_their_arguments_directly():
    """Called through torch.ops, bypassing the Python checks, the kernels
    still reject bad input with a message instead of crashing."""
    with pytest.raises(RuntimeError, match="residual has shape"):
        torch.ops.resnet_fast.bias_act(torch.randn(1, 4, 3, 3), torch.randn(4), torch.randn(1, 4, 3, 2), True)
    with pytest.raises(RuntimeError, match="more than 1 value per channel"):
        torch.ops.resnet_fast.bn_act_train(torch.randn(1, 4, 1, 1), torch.ones(4), torch.zeros(4), None, 1e-5, True)
    with pytest.raises(RuntimeError, match="channels but weight expects"):
        torch.ops.resnet_fast.conv_bias_act(torch.randn(1, 4, 5, 5), torch.randn(2, 3, 3, 3), torch.randn(2), None,
                                            [1, 1], [1, 1], [1, 1], 1, True)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        torch.ops.resnet_fast.bn_act_train(torch.ones(2, 4, 3, 3, dtype=torch.int32), torch.ones(4), torch.zeros(4),
                                           None, 1e-5, True)


def test_bn_act_train_rejects_bad_input():
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ops.bn_act_train(torch.randn(1, 4, 1, 1), torch.ones(4), torch.zeros(4))
    with pytest.raises(ValueError, match="weight has shape"):
        ops.bn_act_train(x, torch.ones(5), torch.zeros(4))
    with pytest.raises(ValueError, match="both running_mean and running_var"):
        ops.bn_act_train(x, torch.ones(4), torch.zeros(4), running_mean=torch.zeros(4))
    with pytest.raises(ValueError, match="residual has shape"):
        ops.bn_act_train(x, torch.ones(4), torch.zeros(4), residual=torch.randn(2, 4, 3, 2))


def test_unknown_and_unavailable_backends_raise(monkeypatch):
    from resnet_fast import backends

    x, weight, bias, args = make_conv("1x1", torch.float32)
    with pytest.raises(ValueError, match="unknown backend 'cudnn'"):
        ops.conv_bias_act(x, weight, bias, backend="cudnn")
    monkeypatch.setattr(backends, "_TRITON_AVAILABLE", False)
    monkeypatch.setattr(backends, "_TRITON_DETAIL", "triton does not import")
    with pytest.raises(RuntimeError, match="backend 'triton' is not available on cpu: triton does not import"):
        ops.conv_bias_act(x, weight, bias, backend="triton")
    assert not resnet_fast.available_backends()["triton"].available


def test_default_backend_falls_back_to_reference_and_says_why(monkeypatch):
    from resnet_fast import backends

    monkeypatch.setattr(backends, "_EXTENSION_ERROR", "the compiled extension resnet_fast._C did not load (test)")
    monkeypatch.setattr(backends, "_WARNED", set())
    x, weight, bias, args = make_conv("1x1", torch.float32)
    with pytest.warns(RuntimeWarning, match=r"did not load \(test\)\); using the reference"):
        out = ops.conv_bias_act(x, weight, bias)
    assert_rel(out, reference.conv_bias_act(x, weight, bias))
    with pytest.raises(RuntimeError, match="backend 'native' is not available"):
        ops.conv_bias_act(x, weight, bias, backend="native")


@needs_native
def test_native_bn_results_do_not_depend_on_the_thread_count():
    """Partial sums over fixed-size row chunks, combined in a fixed order:
    bitwise the same results on 1 thread and on several."""
    x, weight, bias = _bn_inputs((4, 16, 20, 20), torch.float32)  # 1600 rows: several chunks
    grad = torch.randn(x.shape)
    saved = torch.get_num_threads()
    results = []
    try:
        for threads in (1, max(2, saved)):
            torch.set_num_threads(threads)
            out, mean, invstd, var = torch.ops.resnet_fast.bn_act_train(x, weight, bias, None, 1e-5, True)
            results.append((out, mean, invstd, var) + tuple(
                torch.ops.resnet_fast.bn_act_backward(grad, x, out, weight, mean, invstd, True)))
    finally:
        torch.set_num_threads(saved)
    for a, b in zip(*results):
        assert torch.equal(a, b)


# ------------------------------------------------ found by the fuzz tests

@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dilation_along_a_size_one_kernel_dimension(backend, dtype):
    """oneDNN crashed (SIGSEGV) on channels_last convolutions dilating a
    kernel dimension of size 1; dilation there changes nothing, so it is
    dropped before any backend runs."""
    x = channels_last(torch.randn(2, 4, 9, 1, dtype=dtype))
    weight, bias = torch.randn(6, 4, 3, 1, dtype=dtype), torch.randn(6, dtype=dtype)
    args = dict(stride=(1, 2), padding=(3, 3), dilation=(2, 2), relu=False)
    expected = F.conv2d(x.float().contiguous(), weight.float(), bias.float(), (1, 2), (3, 3), (2, 1))
    out = ops.conv_bias_act(x.requires_grad_(), weight, bias, backend=backend, **args)
    assert_rel(out.float(), expected, dtype=dtype)
    out.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 1, 1, 2), (2, 1, 3, 3), (2, 5, 1, 1)])
def test_conv_output_is_channels_last_for_ambiguous_shapes(backend, shape):
    """Shapes whose NCHW and NHWC strides coincide in part (C == 1, H == W
    == 1): the output is channels_last all the same, as the fake kernel says."""
    x = torch.randn(shape)
    weight, bias = torch.randn(2, shape[1], 1, 1), torch.randn(2)
    out = ops.conv_bias_act(x, weight, bias, backend=backend)
    assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["x", "weight", "bias", "residual"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_conv_relu_keeps_nan_like_torch(backend, where, value):
    """NaN through the fused ReLU stays NaN (oneDNN's fused ReLU made it 0),
    and infinities land where the reference puts them."""
    x, weight, bias, args = make_conv("3x3s1_batch1", torch.float32)
    inputs = dict(x=x, weight=weight, bias=bias, residual=torch.randn(conv_out_shape(x, weight, args)))
    inputs[where] = inputs[where].contiguous().clone()
    inputs[where].view(-1)[torch.randint(0, inputs[where].numel(), (1,))] = value
    expected = reference.conv_bias_act(**inputs, **{k: (v, v) if k != "groups" else v for k, v in args.items()})
    out = ops.conv_bias_act(**inputs, relu=True, backend=backend, **args)
    assert not expected.isfinite().all()
    assert torch.equal(out.isnan(), expected.isnan())
    torch.testing.assert_close(out, expected, equal_nan=True)


def test_prepack_declines_non_finite_weights():
    weight = torch.randn(4, 3, 3, 3)
    weight[1, 2, 0, 0] = float("nan")
    assert ops.prepack_conv_weight(weight, 1, 1, 1, 1) is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_conv_weight_gradient_where_taps_meet_only_padding(backend):
    """aten's CPU bf16 convolution backward leaves garbage in the weight
    gradient of taps that meet only padding (here the outer taps of a 1x3
    kernel over a width-1 input): on channels_last tensors everywhere, on
    NCHW ones too with AVX-512/AMX kernels; the ops' backward is right.
    Repeated: the garbage is whatever memory held."""
    for _ in range(10):
        x = channels_last(torch.randn(2, 2, 2, 1)).bfloat16()
        weight, bias = torch.randn(1, 2, 1, 3).bfloat16(), torch.randn(1).bfloat16()
        grad = torch.randn(2, 1, 2, 2).bfloat16()
        grads = []
        for dtype, b in ((torch.float32, "reference"), (torch.bfloat16, backend)):
            leaves = [t.to(dtype).requires_grad_() for t in (x, weight, bias)]
            ops.conv_bias_act(*leaves, stride=(1, 2), padding=(0, 2), relu=False, backend=b).backward(grad.to(dtype))
            grads.append([leaf.grad for leaf in leaves])
        for got, expected in zip(grads[1], grads[0]):
            assert_rel(got.float(), expected, dtype=torch.bfloat16)


def test_taps_meet_only_padding_by_enumeration():
    """validation.taps_meet_only_padding against every output position read."""
    from resnet_fast.validation import taps_meet_only_padding

    seen = set()
    for size, kernel, stride, padding, dilation in itertools.product(range(1, 6), range(1, 5), range(1, 4),
                                                                     range(4), range(1, 3)):
        outputs = (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
        if outputs <= 0:
            continue
        enumerated = any(all(not 0 <= o * stride - padding + tap * dilation < size for o in range(outputs))
                         for tap in range(kernel))
        assert taps_meet_only_padding((size, 3), (kernel, 1), (stride, 1), (padding, 0), (dilation, 1)) == enumerated
        assert taps_meet_only_padding((3, size), (1, kernel), (1, stride), (0, padding), (1, dilation)) == enumerated
        seen.add(enumerated)
    assert seen == {True, False}


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("geometry", [
    # (C, K, groups, kernel, H, W, stride, padding): one output column or row
    (1, 1, 1, (5, 7), 1, 7, (1, 2), (3, 0)),
    (1, 2, 1, (5, 7), 6, 3, (1, 2), (2, 2)),
    (2, 4, 2, (5, 7), 6, 5, (1, 2), (1, 1)),
    (3, 6, 3, (3, 5), 2, 4, (1, 2), (2, 1)),
])
def test_conv_with_a_single_output_column(backend, dtype, geometry):
    """PyTorch's oneDNN convolutions on channels_last input computed wrong
    rows when a strided dimension has one output (seen: stride (1, 2), one
    output column); the ops compute that window with stride 1."""
    c, k, groups, kernel, h, w, stride, padding = geometry
    # NHWC strides even for C == 1 (what a copy to channels_last gives a strided view)
    x = torch.empty_strided((2, c, h, w), (h * w * c, 1, w * c, c), dtype=dtype).copy_(torch.randn(2, c, h, w))
    weight, bias = torch.randn(k, c // groups, *kernel).to(dtype), torch.randn(k)
    expected = F.conv2d(x.double(), weight.double(), bias.double(), stride, padding, 1, groups)
    out = ops.conv_bias_act(x, weight, bias, stride=stride, padding=padding, groups=groups, relu=False, backend=backend)
    assert out.shape == expected.shape
    assert_rel(out.double(), expected, dtype=dtype)


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_empty_batch_gives_empty_outputs_on_every_backend(backend):
    """Batch 0: empty outputs of the right shape, gradients of zeros for the
    parameters (as F.conv2d and nn.BatchNorm2d give), running statistics untouched."""
    x = torch.randn(0, 8, 9, 11, requires_grad=True)
    weight = torch.randn(12, 8, 3, 3, requires_grad=True)
    bias = torch.randn(12, requires_grad=True)
    residual = torch.randn(0, 12, 5, 6)
    out = ops.conv_bias_act(x, weight, bias, residual, 2, 1, backend=backend)
    assert out.shape == (0, 12, 5, 6) and out.dtype == x.dtype
    out.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(weight.grad, torch.zeros_like(weight)) and torch.equal(bias.grad, torch.zeros_like(bias))

    if backend != "triton":  # bias_act has no Triton kernel of its own
        assert ops.bias_act(torch.randn(0, 12, 4, 4), torch.randn(12), backend=backend).shape == (0, 12, 4, 4)

    gamma, beta = torch.rand(8, requires_grad=True), torch.randn(8, requires_grad=True)
    running_mean, running_var = torch.randn(8), torch.rand(8) + 0.5
    before = running_mean.clone(), running_var.clone()
    y, mean, invstd = ops.bn_act_train(torch.randn(0, 8, 3, 3), gamma, beta, running_mean, running_var, backend=backend)
    assert y.shape == (0, 8, 3, 3) and mean.shape == invstd.shape == (8,)
    y.sum().backward()
    assert torch.equal(gamma.grad, torch.zeros(8)) and torch.equal(beta.grad, torch.zeros(8))
    assert torch.equal(running_mean, before[0]) and torch.equal(running_var, before[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_matches_the_reference(backend):
    """A backward with create_graph=True is itself differentiable, with the
    reference's second derivatives, also when the residual is an ancestor
    of the conv's input (a block without downsample)."""
    block_input = torch.randn(2, 6, 7, 5, requires_grad=True)
    weight = (torch.randn(6, 6, 3, 3) / 7).requires_grad_()
    bias, gamma, beta = (torch.randn(6, requires_grad=True) for _ in range(3))

    def second_order(conv, bn):
        hidden = bn(block_input * 1.5, gamma, beta, None, 1e-5, True)
        out = conv(hidden, weight, bias, block_input, (1, 1), (1, 1), (1, 1), 1, True)
        grad_input, = torch.autograd.grad(out.square().sum(), block_input, create_graph=True)
        return (grad_input,) + torch.autograd.grad(grad_input.square().sum(), (block_input, weight, bias, gamma, beta))

    got = second_order(
        lambda *a: ops.conv_bias_act(*a, backend=backend),
        lambda x, w, b, r, eps, relu: ops.bn_act_train(x, w, b, residual=r, eps=eps, relu=relu, backend=backend)[0],
    )
    expected = second_order(reference.conv_bias_act, lambda *a: reference.bn_act_train(*a)[0])
    for g, e in zip(got, expected):
        assert_rel(g, e, factor=10)
