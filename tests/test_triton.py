"""The Triton kernels (resnet_fast.kernels.triton) against resnet_fast.reference.

Without a GPU they run under Triton's interpreter on CPU tensors, which the
lines below turn on before the kernels are defined (triton itself may be
imported already: the kernels call no @jit function of triton's library).
Shapes are tiny because the interpreter runs each program in numpy. bf16
convolutions need a GPU (the interpreter does not simulate bf16 tl.dot).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:  # one conv config instead of compiling and timing all of them per test shape
    os.environ.setdefault("RESNET_FAST_TRITON_AUTOTUNE", "0")

import re  # noqa: E402
import sys  # noqa: E402
from contextlib import contextmanager  # noqa: E402

import pytest  # noqa: E402

from resnet_fast import reference  # noqa: E402
from resnet_fast.validation import conv_output_shape  # noqa: E402
from resnet_fast.kernels import triton as triton_kernels  # noqa: E402

from conftest import ELEM_TOL, assert_rel, channels_last  # noqa: E402
from test_ops import CONV_CASES as OP_CONV_CASES  # noqa: E402

AVAILABLE, REASON = triton_kernels.triton_available()
pytestmark = pytest.mark.skipif(not AVAILABLE, reason=f"Triton kernels unavailable: {REASON}")

if AVAILABLE:
    from resnet_fast.kernels.triton import conv, ops, runtime  # noqa: F401 (ops registers torch.ops.resnet_fast_triton)

    INTERPRET = runtime.INTERPRET
else:
    INTERPRET = False

DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
CONV_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BN_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
skip_bf16_dot = pytest.mark.skipif(INTERPRET, reason="the Triton interpreter does not simulate bf16 tl.dot")


def _conv_dtype_params():
    return [pytest.param(d, id=str(d), marks=skip_bf16_dot if d == torch.bfloat16 else ()) for d in CONV_DTYPES]


@pytest.fixture(autouse=True)
def _exact_fp32():
    """fp32 convolutions in exact fp32 on both sides (the kernels follow
    PyTorch's TF32 switches, which cuDNN's default turns on)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@contextmanager
def poisoned_outputs():
    """Every tensor torch.empty hands out meanwhile starts as NaN, so an
    element a kernel forgets to write (output or partial sum) shows up."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    torch.empty = nan_empty
    try:
        yield
    finally:
        torch.empty = real_empty


def randn(*shape, dtype=torch.float32, scale=1.0, shift=0.0):
    return (torch.randn(*shape) * scale + shift).to(device=DEVICE, dtype=dtype)


# ---------------------------------------------------------------- conv

# The conv kinds of tests/test_ops.py, plus shapes that matter to the tiling:
# under the interpreter the tiles are 32 pixels x 32 output channels x 16
# input channels, so these cross tile edges and leave channel tails.
CONV_CASES = {
    **OP_CONV_CASES,
    "3x3s1_C40_K36": (1, 40, 7, 5, 36, 3, 1, 1, 1, 1),
    "1x1s2_C20_K40": (2, 20, 9, 10, 40, 1, 2, 0, 1, 1),
    "grouped_wide": (1, 40, 6, 5, 24, 3, 1, 1, 1, 2),
    "depthwise": (1, 8, 6, 7, 8, 3, 1, 1, 1, 8),
}


def make_conv(case, dtype):
    n, c, h, w, k, r, stride, padding, dilation, groups = CONV_CASES[case]
    x = channels_last(randn(n, c, h, w, dtype=dtype))
    weight = randn(k, c // groups, r, r, dtype=dtype, scale=(c // groups * r * r) ** -0.5)
    bias = randn(k, dtype=dtype)
    args = dict(stride=[stride] * 2, padding=[padding] * 2, dilation=[dilation] * 2, groups=groups)
    return x, weight, bias, args


def conv_out_shape(x, weight, args):
    return conv_output_shape(x.shape, weight.shape, args["stride"], args["padding"], args["dilation"])


def run_conv(x, weight, bias, residual, args, relu):
    return torch.ops.resnet_fast_triton.conv_bias_act(
        x, weight, bias, residual, args["stride"], args["padding"], args["dilation"], args["groups"], relu
    )


def reference_conv(x, weight, bias, residual, args, relu):
    return reference.conv_bias_act(
        x, weight, bias, residual, args["stride"], args["padding"], args["dilation"], args["groups"], relu
    )


def test_kernels_are_the_real_triton_ones(monkeypatch):
    status = triton_kernels.triton_available()
    assert status[0] and isinstance(status[1], str)
    if not torch.cuda.is_available():
        # Guards against the kernels having been defined without the interpreter.
        assert INTERPRET, "TRITON_INTERPRET=1 was not in effect when the kernels were defined"
        assert type(conv._conv_bias_act_kernel).__name__ == "InterpretedFunction"
    # No fallback to PyTorch's convolution hides behind the op.
    x, weight, bias, args = make_conv("3x3s2_odd", torch.float32)
    expected = reference_conv(x, weight, bias, None, args, True)

    def no_torch_conv(*args, **kwargs):
        raise AssertionError("the Triton op called a PyTorch convolution")

    monkeypatch.setattr(torch.nn.functional, "conv2d", no_torch_conv)
    monkeypatch.setattr(torch, "conv2d", no_torch_conv)
    monkeypatch.setattr(torch, "convolution", no_torch_conv)
    assert_rel(run_conv(x, weight, bias, None, args, True), expected)


@pytest.mark.parametrize("dtype", _conv_dtype_params())
@pytest.mark.parametrize("case", list(CONV_CASES))
@pytest.mark.parametrize("residual,relu", [(True, True), (False, True), (False, False), (True, False)])
def test_conv_bias_act(dtype, case, residual, relu):
    x, weight, bias, args = make_conv(case, dtype)
    res = channels_last(randn(*conv_out_shape(x, weight, args), dtype=dtype)) if residual else None
    expected = reference_conv(x, weight, bias, res, args, relu)
    with poisoned_outputs():
        out = run_conv(x, weight, bias, res, args, relu)
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    assert_rel(out, expected)
    if relu:
        assert (out >= 0).all()


@pytest.mark.parametrize("reduction", ["flat", "channel_blocks"])
@pytest.mark.parametrize("case", ["stem7x7s2_C3", "3x3s1_C40_K36", "grouped", "grouped_wide", "dilated"])
def test_conv_both_reduction_walks(case, reduction):
    """Each case through the walk it would not get automatically, too."""
    x, weight, bias, args = make_conv(case, torch.float32)
    res = channels_last(randn(*conv_out_shape(x, weight, args)))
    expected = reference_conv(x, weight, bias, res, args, True)
    with poisoned_outputs():
        out = conv.conv_bias_act(x, weight, bias, res, relu=True, reduction=reduction, **args)
    assert_rel(out, expected)


@pytest.mark.parametrize("layout", ["contiguous", "sliced"])
def test_conv_any_input_layout(layout):
    x, weight, bias, args = make_conv("3x3s2_odd", torch.float32)
    if layout == "contiguous":
        x = x.contiguous()
    else:  # a non-contiguous view
        x = randn(x.shape[0], x.shape[1], x.shape[2], x.shape[3] * 2 + 1)[..., 1::2]
    res = randn(*conv_out_shape(x, weight, args)).transpose(2, 3).contiguous().transpose(2, 3)
    expected = reference_conv(x.contiguous(), weight, bias, res.contiguous(), args, True)
    assert_rel(run_conv(x, weight, bias, res, args, True), expected)


def test_conv_autotuned_variant(monkeypatch):
    monkeypatch.setenv("RESNET_FAST_TRITON_AUTOTUNE", "1")
    dtype = torch.float16
    x, weight, bias, args = make_conv("3x3s1_C40_K36", dtype)
    res = channels_last(randn(*conv_out_shape(x, weight, args), dtype=dtype))
    expected = reference_conv(x, weight, bias, res, args, True)
    with poisoned_outputs():
        out = run_conv(x, weight, bias, res, args, True)
    assert_rel(out, expected)


def test_conv_bias_of_another_dtype():
    x, weight, _, args = make_conv("3x3s1_batch1", torch.float16)
    bias = randn(weight.shape[0])  # fp32 bias with fp16 activations
    assert_rel(run_conv(x, weight, bias, None, args, True), reference_conv(x, weight, bias, None, args, True))


def test_conv_relu_propagates_nan():
    x, weight, bias, args = make_conv("1x1", torch.float32)
    bias[3] = float("nan")
    out = run_conv(x, weight, bias, None, args, True)
    assert out[:, 3].isnan().all()
    assert not out[:, torch.arange(out.shape[1]) != 3].isnan().any()


def test_dot_precision_follows_pytorch_tf32_switches():
    assert runtime.dot_precision(torch.float16, torch.device(DEVICE)) == "ieee"
    assert runtime.dot_precision(torch.float32, torch.device("cpu")) == "ieee"
    if DEVICE == "cuda":
        cuda = torch.device("cuda")
        assert runtime.dot_precision(torch.float32, cuda) == "ieee"  # both off (fixture)
        torch.backends.cudnn.allow_tf32 = True
        assert runtime.dot_precision(torch.float32, cuda) == "tf32"


@pytest.mark.skipif(DEVICE != "cuda", reason="TF32 exists on the GPU only")
def test_conv_tf32_when_allowed():
    torch.backends.cudnn.allow_tf32 = True
    x, weight, bias, args = make_conv("3x3s1_C40_K36", torch.float32)
    expected = reference_conv(x.double(), weight.double(), bias.double(), None, args, True)
    assert_rel(run_conv(x, weight, bias, None, args, True), expected.float(), dtype=torch.float16)


# ---------------------------------------------------------------- batch norm

BN_SHAPES = [(4, 8, 5, 7), (1, 3, 3, 5), (2, 37, 9, 1), (8, 64, 2, 2)]


def bn_inputs(shape, dtype):
    # A large mean and small spread: a naive E[x^2] - E[x]^2 would lose the variance.
    x = channels_last(randn(*shape, dtype=dtype, scale=0.5, shift=3.0))
    weight = (torch.rand(shape[1]) + 0.5).to(DEVICE)
    bias = randn(shape[1])
    return x, weight, bias


@pytest.mark.parametrize("dtype", BN_DTYPES, ids=str)
@pytest.mark.parametrize("shape", BN_SHAPES)
@pytest.mark.parametrize("residual,relu", [(True, True), (False, True), (False, False)])
def test_bn_act_train_forward(dtype, shape, residual, relu):
    x, weight, bias = bn_inputs(shape, dtype)
    res = randn(*shape, dtype=dtype) if residual else None
    expected = reference.bn_act_train(x, weight, bias, res, 1e-5, relu)
    with poisoned_outputs():
        got = torch.ops.resnet_fast_triton.bn_act_train(x, weight, bias, res, 1e-5, relu)
    out, stats = got[0], got[1:]
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, expected[0], **ELEM_TOL[dtype])
    for g, e in zip(stats, expected[1:]):
        assert g.dtype == torch.float32 and g.shape == (shape[1],)
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_bn_variance_is_numerically_sound():
    """Mean 300, spread 1: in fp32, E[x^2] - E[x]^2 cancels ~5 of 7 digits."""
    x = channels_last(randn(4, 6, 7, 9, shift=300.0))
    _, mean, _, var = torch.ops.resnet_fast_triton.bn_act_train(x, torch.ones(6, device=DEVICE),
                                                                torch.zeros(6, device=DEVICE), None, 1e-5, False)
    exact_var = x.double().var(dim=(0, 2, 3), unbiased=False)
    assert_rel(var, exact_var.float())
    assert_rel(mean, x.double().mean(dim=(0, 2, 3)).float())


def test_bn_is_deterministic():
    x, weight, bias = bn_inputs((4, 8, 5, 7), torch.float32)
    first = torch.ops.resnet_fast_triton.bn_act_train(x, weight, bias, None, 1e-5, True)
    second = torch.ops.resnet_fast_triton.bn_act_train(x, weight, bias, None, 1e-5, True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", BN_DTYPES, ids=str)
@pytest.mark.parametrize("shape", BN_SHAPES)
@pytest.mark.parametrize("relu", [True, False])
def test_bn_act_backward(dtype, shape, relu):
    x, weight, bias = bn_inputs(shape, dtype)
    out, mean, invstd, _ = reference.bn_act_train(x, weight, bias, randn(*shape, dtype=dtype), 1e-5, relu)
    grad = randn(*shape, dtype=dtype)
    expected = reference.bn_act_backward(grad, x, out, weight, mean, invstd, relu)
    with poisoned_outputs():
        got = torch.ops.resnet_fast_triton.bn_act_backward(grad, x, out, weight, mean, invstd, relu)
    for name, g, e in zip(("grad_x", "grad_weight", "grad_bias", "grad_z"), got, expected):
        assert g.shape == e.shape and g.dtype == e.dtype, name
        if g.numel():
            tol = ELEM_TOL[dtype] if name in ("grad_x", "grad_z") else dict(rtol=1e-3, atol=1e-3)
            torch.testing.assert_close(g, e, **tol, msg=lambda m: f"{name}: {m}")


def test_bn_with_half_precision_parameters():
    """A model.half() BatchNorm: fp16 weight and bias; grads come back in fp16."""
    x, weight, bias = bn_inputs((2, 12, 5, 3), torch.float16)
    weight, bias = weight.half(), bias.half()
    expected = reference.bn_act_train(x, weight, bias, None, 1e-5, True)
    got = torch.ops.resnet_fast_triton.bn_act_train(x, weight, bias, None, 1e-5, True)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **ELEM_TOL[torch.float16])
    grad = randn(*x.shape, dtype=torch.float16)
    expected = reference.bn_act_backward(grad, x, expected[0], weight, expected[1], expected[2], True)
    got = torch.ops.resnet_fast_triton.bn_act_backward(grad, x, got[0], weight, got[1], got[2], True)
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype
        torch.testing.assert_close(g, e, **ELEM_TOL[torch.float16])


@pytest.mark.parametrize("dtype", BN_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 10, 6, 5), (1, 33, 4, 3)])
@pytest.mark.parametrize("relu", [True, False])
def test_bias_act_backward(dtype, shape, relu):
    out = randn(*shape, dtype=dtype)
    grad = randn(*shape, dtype=dtype)
    ref_z, ref_b = reference.bias_act_backward(grad, out, relu)
    with poisoned_outputs():
        got_z, got_b = torch.ops.resnet_fast_triton.bias_act_backward(grad, out, relu)
    assert got_z.shape == ref_z.shape and got_z.dtype == dtype
    if relu:
        assert torch.equal(got_z, ref_z)  # masking is exact
    assert got_b.dtype == torch.float32
    torch.testing.assert_close(got_b, ref_b, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ autograd

@pytest.mark.parametrize("case", ["3x3s2_odd", "grouped", "stem7x7s2_C3"])
@pytest.mark.parametrize("relu", [True, False])
def test_conv_bias_act_gradients(case, relu):
    x, weight, bias, args = make_conv(case, torch.float32)
    res = randn(*conv_out_shape(x, weight, args))
    grad = randn(*res.shape)
    grads = []
    for fn in (reference_conv, run_conv):
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias, res)]
        fn(*leaves, args, relu).backward(grad)
        grads.append([leaf.grad for leaf in leaves])
    for name, g, e in zip(("x", "weight", "bias", "residual"), grads[1], grads[0]):
        assert g is not None, name
        assert_rel(g, e, dtype=torch.float32, factor=10)


@pytest.mark.parametrize("relu,residual", [(True, True), (True, False), (False, False)])
def test_bn_act_train_gradients(relu, residual):
    x, weight, bias = bn_inputs((3, 7, 5, 4), torch.float32)
    res = randn(*x.shape) if residual else None
    grad = randn(*x.shape)
    grads = []
    for fn in (reference.bn_act_train, torch.ops.resnet_fast_triton.bn_act_train):
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        leaf_res = res.clone().requires_grad_() if residual else None
        out = fn(*leaves, leaf_res, 1e-5, relu)[0]
        out.backward(grad)
        grads.append([leaf.grad for leaf in leaves] + ([leaf_res.grad] if residual else []))
    for g, e in zip(grads[1], grads[0]):
        assert_rel(g, e, dtype=torch.float32, factor=10)


def test_opcheck():
    """Schemas, fake kernels and autograd registrations agree with the kernels."""
    x, weight, bias, args = make_conv("3x3s2_odd", torch.float32)
    res = channels_last(randn(*conv_out_shape(x, weight, args)))
    torch.library.opcheck(
        torch.ops.resnet_fast_triton.conv_bias_act.default,
        (x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_(), res,
         args["stride"], args["padding"], args["dilation"], args["groups"], True),
    )
    bx, bw, bb = bn_inputs((3, 6, 4, 5), torch.float32)
    torch.library.opcheck(torch.ops.resnet_fast_triton.bn_act_train.default,
                          (bx.requires_grad_(), bw.requires_grad_(), bb.requires_grad_(), None, 1e-5, True))
    y = randn(2, 5, 3, 3)
    for relu in (True, False):
        torch.library.opcheck(torch.ops.resnet_fast_triton.bias_act_backward.default, (y, y.clone(), relu))
    out, mean, invstd, _ = torch.ops.resnet_fast_triton.bn_act_train(bx.detach(), bw.detach(), bb.detach(), None,
                                                                     1e-5, True)
    torch.library.opcheck(torch.ops.resnet_fast_triton.bn_act_backward.default,
                          (randn(*bx.shape), bx.detach(), out, bw.detach(), mean, invstd, True))


def _contract(schema) -> tuple:
    """An op schema as the contract fixes it: argument names and types, the
    count and types of the results. What differs only in spelling is
    dropped: the namespace, SymInt (schema inference's int), list sizes and
    result names (C++ schemas name them, inferred ones cannot)."""
    def kind(t) -> str:
        return re.sub(r"\[\d+\]", "[]", str(t).replace("SymInt", "int"))

    return ([(a.name, kind(a.type)) for a in schema.arguments], [kind(r.type) for r in schema.returns])


@pytest.mark.parametrize("name", list(ops.LAUNCHERS) if AVAILABLE else [])
def test_launcher_schema_is_the_native_contract(name):
    """The Triton ops' schemas are inferred from the launchers' annotations on
    every torch release (triton_op ignores schema= on some), so each
    launcher must infer, and infer the compiled extension's contract."""
    inferred = torch.library.infer_schema(ops.LAUNCHERS[name], mutates_args=())
    parsed = torch._C.parse_schema(f"{ops.NAMESPACE}::{name}{inferred}")
    registered = getattr(torch.ops.resnet_fast_triton, name).default._schema
    assert _contract(parsed) == _contract(registered)
    import resnet_fast.backends

    if not resnet_fast.backends.native_loaded():
        pytest.skip("the compiled extension, whose schema is the contract, is not built")
    assert _contract(parsed) == _contract(getattr(torch.ops.resnet_fast, name).default._schema)


@pytest.mark.skipif(DEVICE != "cuda", reason="torch.compile traces into triton_op kernels on the GPU only")
def test_torch_compile_traces_the_ops():
    x, weight, bias, args = make_conv("3x3s1_C40_K36", torch.float16)
    bw, bb = torch.ones(36, device=DEVICE), torch.zeros(36, device=DEVICE)

    def block(x):
        y = run_conv(x, weight, bias, None, args, True)
        return torch.ops.resnet_fast_triton.bn_act_train(y, bw, bb, y, 1e-5, True)[0]

    compiled = torch.compile(block, fullgraph=True)
    torch.testing.assert_close(compiled(x), block(x), **ELEM_TOL[torch.float16])


# ---------------------------------------------------------------- bad input

def _conv_call(**overrides):
    x, weight, bias, args = make_conv("3x3s1_batch1", torch.float32)
    call = dict(x=x, weight=weight, bias=bias, residual=None, **args, relu=True)
    call.update(overrides)
    names = ("x", "weight", "bias", "residual", "stride", "padding", "dilation", "groups", "relu")
    return lambda: torch.ops.resnet_fast_triton.conv_bias_act(*(call[n] for n in names))


BAD_CALLS = {
    "conv 3-D input": (lambda: _conv_call(x=randn(8, 9, 11))(), ValueError, "4-D"),
    "conv integer input": (lambda: _conv_call(x=torch.ones(1, 8, 9, 11, dtype=torch.int64, device=DEVICE))(),
                           TypeError, "float32, float16 or bfloat16"),
    "conv float64 input": (lambda: _conv_call(x=randn(1, 8, 9, 11, dtype=torch.float64))(), TypeError, "float64"),
    "conv weight dtype": (lambda: _conv_call(weight=randn(12, 8, 3, 3, dtype=torch.float16))(),
                          TypeError, "weight has dtype"),
    "conv weight device": (lambda: _conv_call(weight=torch.randn(12, 8, 3, 3, device="meta"))(),
                           ValueError, "weight is on meta"),
    "conv channel mismatch": (lambda: _conv_call(x=randn(1, 5, 9, 11))(), ValueError, "channels but weight expects"),
    "conv groups": (lambda: _conv_call(groups=3)(), ValueError, "groups=3"),
    "conv bias shape": (lambda: _conv_call(bias=randn(11))(), ValueError, "bias has shape"),
    "conv residual shape": (lambda: _conv_call(residual=randn(1, 12, 9, 10))(), ValueError, "residual has shape"),
    "conv residual device": (lambda: _conv_call(residual=torch.randn(1, 12, 9, 11, device="meta"))(),
                             ValueError, "residual is on meta"),
    "conv kernel too large": (lambda: _conv_call(x=randn(1, 8, 1, 1), padding=[0, 0])(), ValueError, "smaller than"),
    "conv zero stride": (lambda: _conv_call(stride=[0, 1])(), ValueError, "stride"),
    "bn count of 1": (lambda: torch.ops.resnet_fast_triton.bn_act_train(
        randn(1, 4, 1, 1), randn(4), randn(4), None, 1e-5, True), ValueError, "more than 1 value per channel"),
    "bn weight shape": (lambda: torch.ops.resnet_fast_triton.bn_act_train(
        randn(2, 4, 3, 3), randn(5), randn(4), None, 1e-5, True), ValueError, "weight has shape"),
    "bn integer input": (lambda: torch.ops.resnet_fast_triton.bn_act_train(
        torch.ones(2, 4, 3, 3, dtype=torch.int32, device=DEVICE), randn(4), randn(4), None, 1e-5, True),
        TypeError, "float32, float16 or bfloat16"),
    "bn residual dtype": (lambda: torch.ops.resnet_fast_triton.bn_act_train(
        randn(2, 4, 3, 3), randn(4), randn(4), randn(2, 4, 3, 3, dtype=torch.float16), 1e-5, True),
        TypeError, "residual has dtype"),
    "bn backward save_mean shape": (lambda: torch.ops.resnet_fast_triton.bn_act_backward(
        randn(2, 4, 3, 3), randn(2, 4, 3, 3), randn(2, 4, 3, 3), randn(4), randn(3), randn(4), True),
        ValueError, "save_mean has shape"),
    "bias_act_backward out shape": (lambda: torch.ops.resnet_fast_triton.bias_act_backward(
        randn(2, 4, 3, 3), randn(2, 4, 3, 2), True), ValueError, "out has shape"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_rejects_bad_input(case):
    call, error, message = BAD_CALLS[case]
    with pytest.raises(error, match=message):
        call()


@pytest.mark.skipif(not INTERPRET, reason="interpreter limitation")
def test_bf16_conv_under_the_interpreter_says_why_not():
    x, weight, bias, args = make_conv("1x1", torch.bfloat16)
    with pytest.raises(NotImplementedError, match="interpreter"):
        run_conv(x, weight, bias, None, args, True)


# ------------------------------------------------------------- availability

def test_unavailable_without_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now raises ImportError
    available, reason = triton_kernels.triton_available()
    assert not available and "triton does not import" in reason
    with pytest.raises(RuntimeError, match="not available: triton does not import"):
        triton_kernels.conv_bias_act


def test_unavailable_without_gpu_or_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    available, reason = triton_kernels.triton_available()
    assert not available and "no CUDA GPU" in reason and "TRITON_INTERPRET=1" in reason



# ------------------------------------------------------------ whole models

def _backend_pair(arch_or_model, **kwargs):
    """The same randomised model twice: on backend "triton" and "reference"."""
    import copy

    import resnet_fast
    from resnet_fast.testing import randomize_batchnorm_

    model = arch_or_model if isinstance(arch_or_model, torch.nn.Module) else getattr(resnet_fast, arch_or_model)(**kwargs)
    randomize_batchnorm_(model)
    model = model.to(DEVICE)
    ours, ref = copy.deepcopy(model), copy.deepcopy(model)
    ours.backend, ref.backend = "triton", "reference"
    return ours, ref


def _assert_gradients_close(ours, ref, tol=1e-3):
    """All parameter gradients as one vector. Single BN gradients deep in a
    network at 32x32 (BN over a handful of values) are cancellation-heavy and
    ill-conditioned in fp32 on any backend; the whole gradient is not."""
    diff = sum((p.grad.double() - q.grad.double()).square().sum() for p, q in zip(ours.parameters(), ref.parameters()))
    norm = sum(q.grad.double().square().sum() for q in ref.parameters())
    err = (diff / norm).sqrt().item()
    assert err <= tol, f"gradient relative error {err:.3g} > {tol:.3g}"
    first = next(iter(ref.parameters())).grad  # the stem's conv: every error reaches it
    assert_rel(next(iter(ours.parameters())).grad, first, dtype=torch.float32, factor=100)


def test_resnet18_eval_through_triton():
    ours, ref = _backend_pair("resnet18", num_classes=10)
    x = randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_rel(ours.eval()(x), ref.eval()(x), factor=10)


def test_resnet18_train_step_through_triton():
    """Every gradient and the running statistics after a step. 40x40, not
    32x32: at 32x32 with batch 2, layer4's BatchNorm normalises 2 values per
    channel and its gradients are pure rounding noise on every backend."""
    ours, ref = _backend_pair("resnet18", num_classes=10)
    x, labels = randn(2, 3, 40, 40), torch.tensor([3, 7], device=DEVICE)
    for model in (ours, ref):
        torch.nn.functional.cross_entropy(model.train()(x), labels).backward()
    _assert_gradients_close(ours, ref)
    for (name, b_ref), b_ours in zip(ref.named_buffers(), ours.buffers()):
        torch.testing.assert_close(b_ours, b_ref, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_resnext_block_through_triton(mode):
    """A grouped bottleneck with a strided downsample (ResNeXt's layer2.0)."""
    from resnet_fast.models.resnet import Bottleneck, conv1x1

    block = Bottleneck(16, 8, stride=2, groups=4, base_width=8,
                       downsample=torch.nn.Sequential(conv1x1(16, 32, 2), torch.nn.BatchNorm2d(32)))
    ours, ref = _backend_pair(block)
    x = channels_last(randn(2, 16, 9, 11))
    if mode == "eval":
        with torch.no_grad():
            assert_rel(ours.eval()(x), ref.eval()(x), factor=10)
        return
    grad = randn(2, 32, 5, 6)
    inputs = [x.clone().requires_grad_() for _ in range(2)]
    for model, inp in zip((ours, ref), inputs):
        model.train()(inp).backward(grad)
    assert_rel(inputs[0].grad, inputs[1].grad, dtype=torch.float32, factor=100)
    _assert_gradients_close(ours, ref)


# ---------------------------------------------------------------- weight layout

@contextmanager
def conv_launches(monkeypatch):
    """The (args, kwargs) of each conv kernel launch, recorded (the launch
    is made as usual): args[1] is the weight, kwargs the constexprs."""
    seen = []
    real_traceable = conv.traceable

    class Spy:
        def __init__(self, kernel):
            self.launcher = real_traceable(kernel)

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append((args, kwargs))
                return self.launcher[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(conv, "traceable", Spy)
    yield seen


@pytest.mark.parametrize("case", ["1x1", "3x3s2_odd", "stem7x7s2_C3", "grouped_wide"])
def test_conv_reads_a_gemm_layout_weight_in_place(monkeypatch, case):
    from resnet_fast.ops import gemm_layout_weight

    x, weight, bias, args = make_conv(case, torch.float32)
    stored = gemm_layout_weight(weight)
    assert stored.shape == weight.shape and torch.equal(stored, weight)
    assert stored.permute(2, 3, 1, 0).is_contiguous() and stored.data_ptr() != weight.data_ptr()
    res = channels_last(randn(*conv_out_shape(x, weight, args)))
    expected = reference_conv(x, weight, bias, res, args, True)
    with conv_launches(monkeypatch) as launches, poisoned_outputs():
        out = run_conv(x, stored, bias, res, args, True)
        other = run_conv(x, weight, bias, res, args, True)
    assert_rel(out, expected)
    assert_rel(other, expected)
    seen = [launch_args[1] for launch_args, _ in launches]
    assert seen[0].data_ptr() == stored.data_ptr()  # read where it lies
    assert seen[1].data_ptr() != weight.data_ptr()  # copied into the GEMM layout


def test_fold_cache_keeps_the_gemm_layout_weight(monkeypatch):
    """An eval conv + BN layer on the Triton backend launches with the
    folded weight the cache holds in GEMM layout, the same tensor every
    call, and a new one once the weights change."""
    from resnet_fast.folding import FoldCache
    from resnet_fast.layers import conv_norm_act

    torch.manual_seed(0)
    layer = torch.nn.Conv2d(20, 24, 3, stride=2, padding=1, bias=False)
    norm = torch.nn.BatchNorm2d(24)
    with torch.no_grad():
        norm.running_mean.uniform_(-0.5, 0.5)
        norm.running_var.uniform_(0.5, 2.0)
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    layer, norm = layer.to(DEVICE).eval(), norm.to(DEVICE).eval()
    x = channels_last(randn(2, 20, 9, 7))
    cache = FoldCache()

    def expected():
        return torch.relu(norm(layer(x)))

    with torch.no_grad(), conv_launches(monkeypatch) as launches:
        first = conv_norm_act(layer, norm, x, backend="triton", cache=cache)
        second = conv_norm_act(layer, norm, x, backend="triton", cache=cache)
        assert_rel(first, expected())
        assert_rel(second, expected())
        held = cache.folded(layer, norm, gemm_layout=True)[0]
        assert held.permute(2, 3, 1, 0).is_contiguous()
        seen = [launch_args[1] for launch_args, _ in launches]
        assert seen[0].data_ptr() == seen[1].data_ptr() == held.data_ptr()
        layer.weight.mul_(-1.0)  # an in-place edit: a new fold
        third = conv_norm_act(layer, norm, x, backend="triton", cache=cache)
        assert_rel(third, expected())
        seen = [launch_args[1] for launch_args, _ in launches]
        assert seen[2].data_ptr() == cache.folded(layer, norm, gemm_layout=True)[0].data_ptr() != held.data_ptr()


# ---------------------------------------------------------------- weight by TMA

# Shapes TMA can address with the interpreter's 16-deep tiles and a GPU's
# 32- or 64-deep ones (C/g a multiple of 64 for channel blocks; rows of
# 16-byte multiples), crossing column tiles inside a group and at the end
# of the weight, and the reduction's end in the flat walk.
TMA_CASES = {
    "stem7x7s2_C3": CONV_CASES["stem7x7s2_C3"],  # flat: 147 reduction rows, the last tile past them
    "1x1_C64_K24": (3, 64, 5, 5, 24, 1, 1, 0, 1, 1),
    "3x3_C64_K40": (2, 64, 5, 4, 40, 3, 1, 1, 1, 1),  # several channel blocks per tap, a partial column tile
    "grouped_C64_KG16_s2": (1, 128, 6, 5, 32, 3, 2, 1, 1, 2),  # a group's column tile reads the next group's
    "grouped_flat": (2, 16, 7, 9, 32, 3, 1, 1, 1, 4),  # 4 channels per group: the flat walk
}
needs_tma = pytest.mark.skipif(
    DEVICE == "cuda" and torch.cuda.get_device_capability()[0] < 9, reason="TMA needs compute capability 9.0"
)


def _tma_conv(case, dtype):
    n, c, h, w, k, r, stride, padding, dilation, groups = TMA_CASES[case]
    x = channels_last(randn(n, c, h, w, dtype=dtype))
    weight = randn(k, c // groups, r, r, dtype=dtype, scale=(c // groups * r * r) ** -0.5)
    args = dict(stride=[stride] * 2, padding=[padding] * 2, dilation=[dilation] * 2, groups=groups)
    return x, weight, randn(k, dtype=dtype), args


@needs_tma
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(TMA_CASES))
def test_conv_with_the_weight_by_tma(monkeypatch, case, dtype):
    x, weight, bias, args = _tma_conv(case, dtype)
    res = channels_last(randn(*conv_out_shape(x, weight, args), dtype=dtype))
    expected = reference_conv(x, weight, bias, res, args, True)
    with conv_launches(monkeypatch) as launches, poisoned_outputs():
        out = conv.conv_bias_act(x, weight, bias, res, relu=True, weight_tma=True, **args)
    assert [kwargs["WEIGHT_TMA"] for _, kwargs in launches] == [True]
    assert_rel(out, expected)


@needs_tma
def test_tma_weight_keeps_each_groups_nan_to_itself():
    """A NaN weight in group 1: TMA's tile for group 0 reads it too, and
    only group 1's output channels may show it."""
    x, weight, bias, args = _tma_conv("grouped_C64_KG16_s2", torch.float32)
    weight[16 + 5, 3, 1, 1] = float("nan")
    expected = reference_conv(x, weight, bias, None, args, False)
    out = conv.conv_bias_act(x, weight, bias, None, relu=False, weight_tma=True, **args)
    assert torch.equal(out.isnan(), expected.isnan()) and expected[:, 21].isnan().all()
    finite = ~expected.isnan()
    assert_rel(out[finite], expected[finite])


@pytest.mark.parametrize("case,dtype,reason", [
    ("3x3s2_odd", torch.float32, "a row of 10 output channels is not a multiple of 16 bytes"),
    ("1x1_C64_K24", torch.float16, None),
    ("1x1s2_downsample", torch.float32, "12 input channels per group are not a multiple of the tile depth"),
    ("grouped", torch.float16, "groups of 4 output channels do not start at 16-byte boundaries"),
])
def test_weight_tma_refusals(case, dtype, reason):
    x, weight, bias, args = (_tma_conv if case in TMA_CASES else make_conv)(case, dtype)
    if reason is None:  # addressable, but the automatic choice is TMA on Hopper only
        w_gemm = weight.permute(2, 3, 1, 0).contiguous()
        assert conv.weight_tma_refusal(w_gemm, "channel_blocks", weight.shape[1], weight.shape[0]) is None
        assert not conv._use_weight_tma(w_gemm, "channel_blocks", weight.shape[1], weight.shape[0], "sm80", "ieee",
                                        None)
        # a view that starts 8 bytes into its storage
        shifted = torch.empty(w_gemm.numel() + 4, dtype=dtype, device=w_gemm.device)[4:].view(w_gemm.shape)
        assert conv.weight_tma_refusal(shifted, "channel_blocks", weight.shape[1], weight.shape[0]) == \
            "the weight does not start 16-byte aligned"
        return
    with pytest.raises(ValueError, match=re.escape(f"weight_tma=True, but TMA cannot load this weight: {reason}")):
        conv.conv_bias_act(x, weight, bias, None, relu=True, weight_tma=True, reduction="channel_blocks", **args)
