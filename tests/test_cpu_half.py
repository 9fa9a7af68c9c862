"""bfloat16 and float16 CPU inference on both routes (ops.cpu_compute_dtype;
RESNET_FAST_CPU_HALF_IN_FLOAT32 forces either): without oneDNN kernels for
the dtype each layer computes in float32 (input and residual widened, BN
folded in float32) and rounds its output back, so the activations stay
half-precision; with them, it runs oneDNN's fused convolution in the dtype
on a prepacked weight. Checked per layer against the float64 answer (rounded
once, on the float32 route), per network against torchvision in the same
dtype (and float64), with NaN and Inf, including float16's own overflow."""
import pytest
import torch
import torchvision
from torch import nn

import resnet_fast
from resnet_fast import ops, reference
from resnet_fast.folding import FoldCache
from resnet_fast.layers import conv_norm_act
from resnet_fast.testing import randomize_batchnorm_, rel_err

from conftest import assert_rel, channels_last, kernel_backends, record_cpu_convolutions
from test_cpu_inference import _same_non_finite, non_finite_input_or_weight_matches_torchvision
from test_ops import conv_out_shape, make_conv

pytestmark = pytest.mark.skipif("native" not in kernel_backends(), reason="the native extension is not built")

HALF = [torch.bfloat16, torch.float16]
ROUTES = {"float32": "1", "native": "0"}  # RESNET_FAST_CPU_HALF_IN_FLOAT32


@pytest.fixture
def route(request, monkeypatch):
    monkeypatch.setenv("RESNET_FAST_CPU_HALF_IN_FLOAT32", ROUTES[request.param])
    return request.param


@pytest.fixture
def float32_calls(monkeypatch):
    """(op, x) of the CPU convolution calls, every eligible 3x3
    layer on the Winograd route."""
    monkeypatch.setattr(ops, "WINOGRAD_MIN_TILES_PER_THREAD", 0)
    return record_cpu_convolutions(
        monkeypatch, ("conv_bias_act", "conv_bias_act_", "conv3x3_winograd_bias_act", "conv3x3_winograd_bias_act_"))


# ------------------------------------------------------------ the choice

def test_compute_dtype_follows_onednn_and_the_switch(monkeypatch):
    monkeypatch.delenv("RESNET_FAST_CPU_HALF_IN_FLOAT32", raising=False)
    for has_kernels in (True, False):
        monkeypatch.setattr(ops, "_ONEDNN_HALF_KERNELS", {dtype: has_kernels for dtype in HALF})
        for dtype in HALF:
            assert ops.cpu_compute_dtype(dtype) == (dtype if has_kernels else torch.float32)
        for dtype in (torch.float32, torch.float64):
            assert ops.cpu_compute_dtype(dtype) == dtype
    for forced, expected in (("1", torch.float32), ("0", None)):
        monkeypatch.setenv("RESNET_FAST_CPU_HALF_IN_FLOAT32", forced)
        for dtype in HALF:
            assert ops.cpu_compute_dtype(dtype) == (expected or dtype)
        assert ops.cpu_compute_dtype(torch.float64) == torch.float64


def test_compute_dtype_rejects_a_bad_switch_or_argument(monkeypatch):
    monkeypatch.setenv("RESNET_FAST_CPU_HALF_IN_FLOAT32", "yes")
    with pytest.raises(ValueError, match="RESNET_FAST_CPU_HALF_IN_FLOAT32 must be 0 or 1"):
        ops.cpu_compute_dtype(torch.bfloat16)
    monkeypatch.delenv("RESNET_FAST_CPU_HALF_IN_FLOAT32")
    with pytest.raises(TypeError, match="dtype must be a torch.dtype"):
        ops.cpu_compute_dtype("bfloat16")


# ------------------------------------------------------------ one layer

def _layer(case, dtype):
    """conv + eval BatchNorm in dtype, from make_conv's operands."""
    x, weight, _, args = make_conv(case, dtype)
    conv = nn.Conv2d(weight.shape[1] * args["groups"], weight.shape[0], weight.shape[2], bias=False, **args)
    bn = nn.BatchNorm2d(weight.shape[0])
    with torch.no_grad():
        conv.weight.copy_(weight)
        bn.weight.uniform_(0.5, 2.0), bn.bias.uniform_(-1, 1)
        bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2.0)
    return conv.to(dtype), bn.eval().to(dtype), x, args


def _exact_then_rounded(conv, bn, x, residual, relu):
    """The float64 answer from the half-precision operands, rounded once."""
    weight, bias = reference.fold_bn(conv.weight.double(), bn.weight.double(), bn.bias.double(),
                                     bn.running_mean.double(), bn.running_var.double(), bn.eps)
    exact = reference.conv_bias_act(x.double(), weight, bias, None if residual is None else residual.double(),
                                    conv.stride, conv.padding, conv.dilation, conv.groups, relu)
    return exact.to(x.dtype)


CASES = ["stem7x7s2_C3", "3x3s1_batch1", "3x3s2_odd", "1x1", "1x1s2_downsample", "grouped", "3x3_single_pixel"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("route", ["float32"], indirect=True)
def test_a_layer_is_the_exact_answer_rounded_once(case, dtype, with_residual, route, float32_calls):
    """Computed in float32 from float32-folded weights, the result is within
    one rounding of the float64 answer (a BN folded in the half dtype, or
    rounded between convolution and BN, would not be)."""
    torch.manual_seed(0)
    conv, bn, x, _ = _layer(case, dtype)
    residual = channels_last(torch.randn(conv_out_shape(x, conv.weight, dict(
        stride=conv.stride[0], padding=conv.padding[0], dilation=conv.dilation[0])), dtype=dtype)) if with_residual else None
    kept = None if residual is None else residual.clone()
    with torch.inference_mode():
        out = conv_norm_act(conv, bn, x, residual, relu=True, cache=FoldCache())
    expected = _exact_then_rounded(conv, bn, x, kept, relu=True)
    assert out.dtype == dtype and out.shape == expected.shape
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(out.double(), expected.double(), rtol=eps, atol=2e-5)  # atol: float32 rounding of O(1) terms
    assert float32_calls and all(x.dtype == torch.float32 for _, x in float32_calls)
    if residual is not None:
        assert torch.equal(residual, kept), "the caller's residual was written"


@pytest.mark.parametrize("layout", ["channels_last", "contiguous", "sliced"])
@pytest.mark.parametrize("route", sorted(ROUTES), indirect=True)
def test_any_input_layout_on_either_route(layout, route):
    torch.manual_seed(1)
    conv, bn, _, _ = _layer("3x3s2_odd", torch.bfloat16)
    x, _, _, _ = make_conv("3x3s2_odd", torch.bfloat16, layout=layout)
    residual = torch.randn(conv_out_shape(x, conv.weight, dict(stride=2, padding=1, dilation=1)), dtype=torch.bfloat16)
    with torch.inference_mode():
        out = conv_norm_act(conv, bn, x, residual, relu=True, cache=FoldCache())
        repeated = conv_norm_act(conv, bn, x, residual, relu=True, cache=FoldCache())
    assert out.dtype == torch.bfloat16 and torch.equal(out, repeated)
    assert_rel(out, _exact_then_rounded(conv, bn, x, residual, relu=True), torch.bfloat16)


@pytest.mark.parametrize("route", ["float32"], indirect=True)
def test_overwrite_residual_in_half_precision_gives_the_same_answer(route):
    torch.manual_seed(2)
    conv, bn, x, _ = _layer("1x1", torch.bfloat16)
    residual = channels_last(torch.randn(3, 24, 5, 5, dtype=torch.bfloat16))
    expected = _exact_then_rounded(conv, bn, x, residual, relu=True)
    with torch.inference_mode():
        out = conv_norm_act(conv, bn, x, residual.clone(), relu=True, cache=FoldCache(), overwrite_residual=True)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), expected.double(), rtol=torch.finfo(torch.bfloat16).eps, atol=1e-6)


def test_the_fold_is_cached_in_the_compute_dtype(monkeypatch):
    conv, bn, x, _ = _layer("1x1", torch.bfloat16)
    cache = FoldCache()
    for forced, fold_dtype in (("1", torch.float32), ("0", torch.bfloat16)):
        monkeypatch.setenv("RESNET_FAST_CPU_HALF_IN_FLOAT32", forced)
        with torch.inference_mode():
            conv_norm_act(conv, bn, x, relu=True, cache=cache)
        assert cache._entry[1][0].dtype == fold_dtype


@pytest.mark.parametrize("route", ["float32"], indirect=True)
def test_weights_that_need_their_gradient_still_get_it(route):
    """Eval mode with autograd on: the first layer (its input needs no
    gradient) takes the float32 route; its weight's gradient must arrive."""
    torch.manual_seed(3)
    conv, bn, x, _ = _layer("stem7x7s2_C3", torch.bfloat16)
    out = conv_norm_act(conv, bn, x, relu=True, cache=FoldCache())
    out.float().sum().backward()
    expected_conv = nn.Conv2d(3, 16, 7, 2, 3, bias=False).double()
    with torch.no_grad():
        expected_conv.weight.copy_(conv.weight.double())
    bn64 = nn.BatchNorm2d(16).double().eval()
    bn64.load_state_dict({k: v.double() for k, v in bn.state_dict().items()})
    torch.relu(bn64(expected_conv(x.double()))).sum().backward()
    assert_rel(conv.weight.grad, expected_conv.weight.grad, torch.bfloat16, factor=2.0)


# ------------------------------------------------------- whole networks

def _half_pair(arch, dtype):
    torch.manual_seed(0)
    tv = randomize_batchnorm_(getattr(torchvision.models, arch)(num_classes=10)).eval()
    return tv, resnet_fast.from_torchvision(tv).eval().to(dtype)


def _network_as_close_to_float64_as_torchvision(arch, dtype):
    tv, ours = _half_pair(arch, dtype)
    x = channels_last(torch.randn(2, 3, 48, 40))
    with torch.inference_mode():
        exact = tv.double()(x.double())
        theirs = tv.to(dtype)(x.to(dtype))
        out = ours(x.to(dtype))
    assert out.dtype == dtype
    assert_rel(out, exact.to(dtype), dtype)
    # Of the same order as torchvision's own error (which rounds after each
    # convolution and again after each BN): over seeds the two scatter on
    # either side of each other by up to 1.4x, on 20 logits.
    assert rel_err(out, exact) <= 1.5 * rel_err(theirs, exact)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnext50_32x4d"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("route", ["float32"], indirect=True)
def test_networks_as_close_to_float64_as_torchvision_is(arch, dtype, route, float32_calls):
    _network_as_close_to_float64_as_torchvision(arch, dtype)
    assert {x.dtype for _, x in float32_calls} == {torch.float32}
    assert any(name.startswith("conv3x3_winograd") for name, _ in float32_calls) == (arch != "resnext50_32x4d")


@pytest.mark.parametrize("route", sorted(ROUTES), indirect=True)
def test_multi_scale_features_stay_in_the_model_dtype(route):
    _, ours = _half_pair("resnet18", torch.bfloat16)
    seen = {}
    for name in ("layer1", "layer2", "layer3", "layer4"):
        ours.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o.dtype))
    with torch.inference_mode():
        ours(channels_last(torch.randn(1, 3, 64, 64, dtype=torch.bfloat16)))
    assert seen == {name: torch.bfloat16 for name in ("layer1", "layer2", "layer3", "layer4")}


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("route", ["float32"], indirect=True)
def test_non_finite_input_or_weight_reaches_the_output_as_in_torchvision(dtype, value, route, float32_calls):
    def pair():
        tv, ours = _half_pair("resnet18", dtype)
        return tv.to(dtype), ours

    non_finite_input_or_weight_matches_torchvision(pair, value, dtype)


@pytest.mark.parametrize("route", ["float32"], indirect=True)
def test_float16_overflow_inside_the_network_comes_out_as_in_torchvision(route, float32_calls):
    """Finite float16 weights whose product overflows: one channel of
    layer1.0's first BN output becomes +Inf, and the next convolution turns
    it into NaN (Inf - Inf), which the ReLUs after it must keep. A network
    that vouched for its float16 activations from a finite input would fuse
    those ReLUs and lose the NaN."""
    tv, ours = _half_pair("resnet18", torch.float16)
    tv = tv.half()
    with torch.no_grad():
        for model in (tv, ours):
            model.layer1[0].conv1.weight[5].abs_().mul_(50)
            model.layer1[0].bn1.weight[5] = 60000.0
            model.layer1[0].bn1.running_var[5] = 1.0
            # the output: layer1's, flattened, where NaN and 0 still differ
            model.layer2 = model.layer3 = model.layer4 = nn.Identity()
            model.avgpool, model.fc = nn.Identity(), nn.Identity()
    x = channels_last(torch.randn(2, 3, 32, 32, dtype=torch.float16))
    with torch.inference_mode():
        expected, out = tv(x), ours(x)
    assert expected.isnan().any()  # the fused ReLUs of a vouching network give 0s instead
    _same_non_finite(out, expected, torch.float16)


@pytest.mark.parametrize("route", sorted(ROUTES), indirect=True)
def test_torch_compile_traces_either_route_in_one_graph(route):
    torch.manual_seed(4)
    conv, bn, x, _ = _layer("3x3s2_odd", torch.bfloat16)
    residual = torch.randn(2, 10, 7, 4, dtype=torch.bfloat16)
    layer = torch.compile(lambda x, r: conv_norm_act(conv, bn, x, r, relu=True), fullgraph=True, backend="eager")
    with torch.no_grad():
        out = layer(x, residual)
    assert out.dtype == torch.bfloat16
    assert_rel(out, _exact_then_rounded(conv, bn, x, residual, relu=True), torch.bfloat16)


# ------------------------------------------------------------ in the dtype, prepacked

def _needs_onednn_kernels(dtype):
    if not ops._ONEDNN_HALF_KERNELS[dtype]:
        pytest.skip(f"oneDNN has no {dtype} convolution kernels on this CPU (AVX-512 or AMX needed)")


def test_prepacking_half_weights_needs_kernels_and_one_group(monkeypatch):
    weight = torch.randn(8, 4, 3, 3, dtype=torch.bfloat16)
    monkeypatch.setattr(ops, "_ONEDNN_HALF_KERNELS", {dtype: False for dtype in HALF})
    assert ops.prepack_conv_weight(weight, 1, 1, 1, 1, (2, 4, 9, 9)) is None
    monkeypatch.setattr(ops, "_ONEDNN_HALF_KERNELS", {dtype: True for dtype in HALF})
    # grouped: oneDNN's fused add+ReLU is not there for them in half precision
    assert ops.prepack_conv_weight(torch.randn(8, 2, 3, 3, dtype=torch.bfloat16), 1, 1, 1, 2, (2, 4, 9, 9)) is None
    poisoned = weight.clone()
    poisoned[3, 1, 0, 2] = float("nan")
    assert ops.prepack_conv_weight(poisoned, 1, 1, 1, 1, (2, 4, 9, 9)) is None


@pytest.mark.parametrize("case", [c for c in CASES if c != "grouped"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("with_residual", [True, False])
def test_a_prepacked_half_layer_matches_the_unpacked_one(case, dtype, with_residual):
    """conv_bias_act on a weight prepacked in the half dtype (oneDNN's
    fused convolution) against the same call on the plain weight (aten's
    convolution + our epilogue) and the float64 answer."""
    _needs_onednn_kernels(dtype)
    torch.manual_seed(3)
    x, weight, bias, args = make_conv(case, dtype)
    residual = channels_last(torch.randn(conv_out_shape(x, weight, args), dtype=dtype)) if with_residual else None
    packed = ops.prepack_conv_weight(weight, args["stride"], args["padding"], args["dilation"], 1, x.shape)
    assert packed is not None and packed.is_mkldnn and packed.dtype == dtype
    with torch.inference_mode():
        out = ops.conv_bias_act(x, packed, bias, residual, relu=True, **args)
        plain = ops.conv_bias_act(x, weight, bias, residual, relu=True, **args)
    exact = reference.conv_bias_act(x.double(), weight.double(), bias.double(),
                                    None if residual is None else residual.double(), relu=True, **args)
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    assert_rel(out, exact.to(dtype), dtype)
    assert rel_err(out, exact) <= 1.5 * rel_err(plain, exact) + torch.finfo(dtype).eps


def test_a_prepacked_half_weight_refuses_another_input_dtype():
    _needs_onednn_kernels(torch.bfloat16)
    x, weight, bias, args = make_conv("3x3s1_batch1", torch.bfloat16)
    packed = ops.prepack_conv_weight(weight, args["stride"], args["padding"], args["dilation"], 1, x.shape)
    with pytest.raises(RuntimeError, match="weight has dtype BFloat16 but the input has Float"):
        ops.conv_bias_act(x.float(), packed, bias.float(), relu=True, **args)


@pytest.fixture
def decided_steps(monkeypatch):
    from resnet_fast import cpu_inference

    steps, real = [], cpu_inference._decide

    def recorded(*args, **kwargs):
        steps.append(real(*args, **kwargs))
        return steps[-1]

    monkeypatch.setattr(cpu_inference, "_decide", recorded)
    return steps


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnext50_32x4d"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("route", ["native"], indirect=True)
def test_networks_in_the_dtype_run_prepacked_and_as_close_as_torchvision(arch, dtype, route, decided_steps):
    _needs_onednn_kernels(dtype)
    _network_as_close_to_float64_as_torchvision(arch, dtype)
    # Every layer prepacked in the dtype, but ResNeXt's grouped 3x3s.
    grouped = arch.startswith("resnext")
    packed = [step.weights[0].is_mkldnn and step.weights[0].dtype == dtype for step in decided_steps]
    assert len(packed) == (20 if arch == "resnet18" else 53)
    assert sum(packed) == len(packed) - (16 if grouped else 0)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("route", ["native"], indirect=True)
def test_non_finite_input_or_weight_on_the_prepacked_route(dtype, value, route):
    _needs_onednn_kernels(dtype)

    def pair():
        tv, ours = _half_pair("resnet18", dtype)
        return tv.to(dtype), ours

    non_finite_input_or_weight_matches_torchvision(pair, value, dtype)
