"""The Winograd F(4x4, 3x3) convolution of CPU inference: the op against the
reference (shapes that cut tiles at every edge, batch 1, C=3, one output
channel, non-contiguous input, residual, ReLU on and off), NaN and Inf as
the reference gives them, the inputs it rejects, which layers take it, and
whole networks through it against torchvision."""
import pytest
import torch
import torchvision

import resnet_fast
from resnet_fast import ops, reference
from resnet_fast.testing import randomize_batchnorm_

from conftest import assert_rel, channels_last, kernel_backends, record_cpu_convolutions
from test_cpu_inference import _poison_middle, non_finite_input_or_weight_matches_torchvision

pytestmark = pytest.mark.skipif("native" not in kernel_backends(), reason="the native extension is not built")

# (N, C, H, W, K): every remainder of H and W modulo the 4x4 tile, one pixel,
# three input channels, one output channel, and more channels than the
# transforms' 16-channel chunks (with a remainder).
SHAPES = [
    (1, 3, 5, 7, 5),
    (2, 17, 9, 4, 33),
    (1, 8, 1, 1, 4),
    (3, 4, 6, 10, 1),
    (1, 40, 12, 13, 24),
    (2, 16, 8, 8, 16),
]


def _operands(n, c, h, w, k, layout="channels_last"):
    x = torch.randn(n, c, h, w)
    if layout == "channels_last":
        x = channels_last(x)
    elif layout == "sliced":  # NCHW, and not contiguous
        x = torch.randn(n, c, h, 2 * w)[..., ::2]
    weight, bias = torch.randn(k, c, 3, 3), torch.randn(k)
    residual = channels_last(torch.randn(n, k, h, w))
    return x, weight, bias, residual


def _reference(x, weight, bias, residual, relu):
    """In float64: the exact answer the float32 results are compared with."""
    return reference.conv_bias_act(x.double(), weight.double(), bias.double(),
                                   None if residual is None else residual.double(),
                                   (1, 1), (1, 1), (1, 1), 1, relu)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("relu", [True, False])
def test_matches_the_reference(shape, with_residual, relu):
    x, weight, bias, residual = _operands(*shape)
    residual = residual if with_residual else None
    with torch.inference_mode():
        out = ops.conv3x3_winograd_bias_act(x, weight, ops.winograd_weight(weight), bias, residual, relu)
    expected = _reference(x, weight, bias, residual, relu)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_rel(out, expected, torch.float32)
    # Elementwise too: no tile edge may be off while the norm hides it.
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-4 * expected.abs().max().item())


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_many_tiles_split_among_threads(threads):
    """More tiles than one work item takes (32), in items that the thread
    count divides, the last one short: every tile computed once."""
    x, weight, bias, residual = _operands(3, 20, 30, 26, 18)  # 3 x 8 x 7 = 168 tiles
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            out = ops.conv3x3_winograd_bias_act(x, weight, ops.winograd_weight(weight), bias, residual, True)
    finally:
        torch.set_num_threads(saved)
    expected = _reference(x, weight, bias, residual, True)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-4 * expected.abs().max().item())


@pytest.mark.parametrize("shape", SHAPES[:4], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("relu", [True, False])
def test_written_into_the_residual(shape, relu):
    x, weight, bias, residual = _operands(*shape)
    expected = _reference(x, weight, bias, residual, relu)
    address = residual.data_ptr()
    with torch.inference_mode():
        out = ops.conv3x3_winograd_bias_act_(residual, x, weight, ops.winograd_weight(weight), bias, relu)
    assert out is residual and residual.data_ptr() == address
    assert_rel(out, expected, torch.float32)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_written_into_the_residual_keeps_nan(value):
    x, weight, bias, residual = _operands(2, 5, 9, 10, 6)
    _poison_middle(x, value)
    expected = reference.conv_bias_act(x, weight, bias, residual, (1, 1), (1, 1), (1, 1), 1, True)
    with torch.no_grad():
        out = ops.conv3x3_winograd_bias_act_(residual, x, weight, ops.winograd_weight(weight), bias)
    assert not expected.isfinite().all()
    torch.testing.assert_close(out, expected, equal_nan=True)


@pytest.mark.parametrize("layout", ["contiguous", "sliced"])
def test_takes_any_input_layout(layout):
    x, weight, bias, residual = _operands(2, 6, 7, 9, 8, layout=layout)
    assert not x.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = ops.conv3x3_winograd_bias_act(x, weight, ops.winograd_weight(weight), bias, residual.contiguous())
    assert_rel(out, _reference(x, weight, bias, residual, True), torch.float32)


def test_weight_transform_is_exact_for_a_delta_filter():
    """A filter that is 1 at its centre tap passes the input through: the
    transformed weight must reproduce it to rounding."""
    weight = torch.zeros(4, 4, 3, 3)
    for k in range(4):
        weight[k, k, 1, 1] = 1.0
    x = channels_last(torch.randn(1, 4, 11, 6))
    with torch.no_grad():
        out = ops.conv3x3_winograd_bias_act(x, weight, ops.winograd_weight(weight), torch.zeros(4), None, False)
    torch.testing.assert_close(out, x, rtol=0, atol=1e-6)


@pytest.mark.parametrize("where", ["x", "bias", "residual"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_operands_come_out_as_the_reference_gives_them(where, value):
    x, weight, bias, residual = _operands(2, 5, 9, 10, 6)
    inputs = dict(x=x, bias=bias, residual=residual)
    inputs[where] = inputs[where].clone()
    _poison_middle(inputs[where], value)
    expected = reference.conv_bias_act(inputs["x"], weight, inputs["bias"], inputs["residual"], (1, 1), (1, 1),
                                       (1, 1), 1, True)
    if not (where != "x" and value < 0):  # a -inf bias or residual is 0 after the ReLU
        assert not expected.isfinite().all()
    with torch.no_grad():
        out = ops.conv3x3_winograd_bias_act(inputs["x"], weight, ops.winograd_weight(weight), inputs["bias"],
                                            inputs["residual"], True)
    torch.testing.assert_close(out, expected, equal_nan=True)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_weight_with_nan_or_inf_has_no_transform(value):
    weight = torch.randn(4, 3, 3, 3)
    _poison_middle(weight, value)
    assert ops.winograd_weight(weight) is None
    with pytest.raises(RuntimeError, match="finite weight"):
        torch.ops.resnet_fast.winograd_weight(weight)


def test_empty_batch():
    x, weight, bias, _ = _operands(1, 3, 5, 5, 4)
    out = ops.conv3x3_winograd_bias_act(x[:0], weight, ops.winograd_weight(weight), bias)
    assert out.shape == (0, 4, 5, 5)


def test_opcheck():
    x, weight, bias, residual = _operands(2, 5, 6, 7, 3)
    torch.library.opcheck(torch.ops.resnet_fast.winograd_weight.default, (weight,))
    torch.library.opcheck(torch.ops.resnet_fast.conv3x3_winograd_bias_act.default,
                          (x, weight, ops.winograd_weight(weight), bias, residual, True))
    torch.library.opcheck(torch.ops.resnet_fast.conv3x3_winograd_bias_act_.default,
                          (residual, x, weight, ops.winograd_weight(weight), bias, True))


def _bad():
    x, weight, bias, _ = _operands(1, 4, 6, 6, 5)
    return dict(x=x, weight=weight, weight_winograd=ops.winograd_weight(weight), bias=bias)


# The Python checks of ops.conv3x3_winograd_bias_act: tests/test_rejected_inputs.py.
def test_the_extension_op_rejects_bad_input_too():
    """Called directly, without the Python checks."""
    args = _bad()
    with pytest.raises(RuntimeError, match="weight_winograd must be"):
        torch.ops.resnet_fast.conv3x3_winograd_bias_act(args["x"], args["weight"], torch.randn(36, 4, 4),
                                                        args["bias"], None, True)
    with pytest.raises(RuntimeError, match="CPU float32"):
        torch.ops.resnet_fast.conv3x3_winograd_bias_act(args["x"].half(), args["weight"].half(),
                                                        args["weight_winograd"], args["bias"].half(), None, True)
    with pytest.raises(RuntimeError, match="3x3"):
        torch.ops.resnet_fast.conv3x3_winograd_bias_act(args["x"], torch.randn(5, 4, 1, 1), args["weight_winograd"],
                                                        args["bias"], None, True)
    with pytest.raises(RuntimeError, match="3x3"):
        torch.ops.resnet_fast.winograd_weight(torch.randn(4, 4, 1, 1))
    residual = torch.randn(1, 5, 6, 6)  # NCHW: the in-place op needs channels_last
    with pytest.raises(RuntimeError, match="channels_last contiguous"):
        torch.ops.resnet_fast.conv3x3_winograd_bias_act_(residual, args["x"], args["weight"], args["weight_winograd"],
                                                         args["bias"], True)


# ------------------------------------------------------ which layers take it

@pytest.mark.parametrize("kwargs, shape, expected", [
    (dict(), (2, 8, 16, 16), "winograd"),
    (dict(stride=2), (2, 8, 16, 16), "direct"),
    (dict(padding=2, dilation=2), (2, 8, 16, 16), "direct"),
    (dict(groups=2), (2, 8, 16, 16), "direct"),
    (dict(padding=0), (2, 8, 16, 16), "direct"),
    (dict(), (1, 8, 4, 4), "direct"),  # one tile: too little work to pay for the transformed weight
])
def test_cpu_conv_algorithm(kwargs, shape, expected, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    args = dict(stride=1, padding=1, dilation=1, groups=1)
    args.update(kwargs)
    weight = torch.randn(8, 8 // args["groups"], 3, 3)
    assert ops.cpu_conv_algorithm(torch.randn(shape), weight, **args) == expected


def test_cpu_conv_algorithm_follows_dtype_and_the_switch(monkeypatch):
    x, weight = torch.randn(2, 8, 16, 16), torch.randn(8, 8, 3, 3)
    assert ops.cpu_conv_algorithm(x.bfloat16(), weight.bfloat16(), padding=1) == "direct"
    assert ops.cpu_conv_algorithm(torch.randn(2, 8, 16, 16), torch.randn(8, 8, 1, 1)) == "direct"
    monkeypatch.setenv("RESNET_FAST_CPU_WINOGRAD", "0")
    assert ops.cpu_conv_algorithm(x, weight, padding=1) == "direct"


# ---------------------------------------------------------- whole networks

@pytest.fixture
def every_3x3_layer(monkeypatch):
    """Every eligible 3x3 layer on the Winograd route, whatever its size,
    counting the calls."""
    monkeypatch.setattr(ops, "WINOGRAD_MIN_TILES_PER_THREAD", 0)
    return record_cpu_convolutions(monkeypatch, ("conv3x3_winograd_bias_act", "conv3x3_winograd_bias_act_"))


def _pair(arch):
    torch.manual_seed(0)
    tv = randomize_batchnorm_(getattr(torchvision.models, arch)(num_classes=10)).eval()
    return tv, resnet_fast.from_torchvision(tv).eval()


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnext50_32x4d"])
def test_networks_match_torchvision(arch, every_3x3_layer):
    tv, ours = _pair(arch)
    x = channels_last(torch.randn(2, 3, 48, 40))
    with torch.inference_mode():
        expected = tv(x)
        assert_rel(ours(x), expected, torch.float32)
        assert_rel(ours(x), expected, torch.float32)  # the cached transforms
    # 3x3 convolutions of stride 1 and one group, per forward (grouped ones stay direct)
    stride_one_3x3 = {"resnet18": 13, "resnet50": 13, "resnext50_32x4d": 0}[arch]
    assert len(every_3x3_layer) == 2 * stride_one_3x3


def test_switched_off_by_the_environment(every_3x3_layer, monkeypatch):
    monkeypatch.setenv("RESNET_FAST_CPU_WINOGRAD", "0")
    tv, ours = _pair("resnet18")
    with torch.inference_mode():
        ours(channels_last(torch.randn(1, 3, 32, 32)))
    assert every_3x3_layer == []


def test_training_and_autograd_take_the_direct_route(every_3x3_layer):
    tv, ours = _pair("resnet18")
    x = channels_last(torch.randn(2, 3, 32, 32))
    ours(x).sum().backward()  # eval mode, with gradients
    ours.train()(x).sum().backward()
    assert every_3x3_layer == []


def test_a_residual_that_needs_its_gradient_takes_the_direct_route(every_3x3_layer):
    """A frozen layer whose shortcut carries a gradient: the output must too."""
    from resnet_fast.folding import FoldCache
    from resnet_fast.layers import conv_norm_act

    conv, bn = torch.nn.Conv2d(8, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8).eval()
    conv.requires_grad_(False), bn.requires_grad_(False)
    x = channels_last(torch.randn(2, 8, 12, 12))
    residual = channels_last(torch.randn(2, 8, 12, 12)).requires_grad_(True)
    out = conv_norm_act(conv, bn, x, residual, relu=True, cache=FoldCache())
    out.sum().backward()
    assert every_3x3_layer == [] and residual.grad is not None
    with torch.no_grad():
        assert_rel(out, torch.relu(bn(conv(x)) + residual), torch.float32)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_input_or_weight_reaches_the_output_as_in_torchvision(value, every_3x3_layer):
    non_finite_input_or_weight_matches_torchvision(lambda: _pair("resnet18"), value)


def test_weights_edited_after_a_forward_are_seen(every_3x3_layer):
    """The transformed weights are cached: an in-place edit must replace them."""
    tv, ours = _pair("resnet18")
    x = channels_last(torch.randn(1, 3, 32, 32))
    with torch.inference_mode():
        ours(x)
    with torch.no_grad():
        for model in (tv, ours):
            model.layer1[0].conv2.weight.mul_(-2.0)
    with torch.inference_mode():
        assert_rel(ours(x), tv(x), torch.float32)
