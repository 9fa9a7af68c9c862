"""The CPU training convolution by one matrix product
(resnet_fast.cpu_gemm_conv): forward and both gradients against aten's
convolution across kernel sizes, strides, paddings, dilations and layouts;
second derivatives; the rule that picks it; and the model layers taking it
where the rule says, with gradients matching torchvision's."""
import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import resnet_fast
from resnet_fast import cpu_gemm_conv
from resnet_fast.testing import randomize_batchnorm_

from conftest import assert_rel, kernel_backends

# (batch, in channels, out channels, height, width, kernel, stride, padding, dilation)
GEOMETRIES = [
    (2, 3, 5, 9, 7, (3, 3), 2, 1, 1),        # C=3, odd sizes, stride 2
    (1, 4, 6, 11, 11, (7, 7), 2, 3, 1),     # the stem's 7x7, batch 1
    (3, 5, 4, 6, 5, (1, 1), 1, 0, 1),       # 1x1
    (2, 8, 6, 7, 6, (1, 1), 2, 0, 1),       # 1x1 stride 2 (a downsample)
    (2, 4, 4, 9, 9, (3, 3), 1, 2, 2),       # dilation 2
    (2, 4, 3, 5, 6, (3, 1), (2, 1), (1, 0), 1),  # rectangular kernel and stride
    (2, 6, 7, 4, 4, (3, 3), 1, 1, 1),       # the last stage's 4x4
    (1, 3, 2, 2, 2, (3, 3), 1, 1, 1),       # an image smaller than the kernel's reach
    (1, 4, 3, 1, 1, (3, 3), 1, 1, 1),       # one pixel: only the centre tap reads it
    (2, 3, 4, 8, 8, (3, 3), 2, 1, 1),       # stride 2, even size: no tap reads for every output
    (2, 3, 4, 5, 6, (3, 3), 1, 0, 1),       # no padding: every tap reads for every output
    (1, 2, 3, 2, 2, (3, 3), 1, 3, 3),       # dilated past the image: the outer taps read only padding
    (1, 2, 3, 3, 3, (3, 3), 1, 3, 1),       # padding 3: some outputs read only padding
]


def _inputs(n, c, k, h, w, kernel, layout, dtype=torch.float32):
    x = torch.randn(n, c, h, w, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":  # a non-contiguous view
        x = torch.randn(n, c, h, w + 3, dtype=dtype)[..., 2:w + 2]
    weight = torch.randn(k, c, *kernel, dtype=dtype) / (c * kernel[0] * kernel[1]) ** 0.5
    return x, weight


def _weight_in_layout(weight, layout):
    if layout == "channels_last":
        return weight.contiguous(memory_format=torch.channels_last)
    if layout == "sliced":  # neither contiguous nor channels_last
        return torch.cat([weight, weight], dim=1)[:, ::2]
    return weight


def _strides(t):
    """t's strides where they mean something: a dimension of size 1 has any."""
    return tuple(stride if size > 1 else None for size, stride in zip(t.shape, t.stride()))


@pytest.mark.parametrize("weight_layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "x".join(map(str, g[:5])) + f"-k{g[5][0]}{g[5][1]}")
def test_matches_aten_forward_and_backward(geometry, layout, weight_layout):
    n, c, k, h, w, kernel, stride, padding, dilation = geometry
    x, weight = _inputs(n, c, k, h, w, kernel, layout)
    weight = _weight_in_layout(weight, weight_layout)
    x_ref, w_ref = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    x.requires_grad_(), weight.requires_grad_()
    out = cpu_gemm_conv.conv2d(x, weight, stride, padding, dilation)
    ref = F.conv2d(x_ref, w_ref, None, stride, padding, dilation)
    assert_rel(out, ref)
    # The output in the layout aten gives it (channels_last where the input or the weight is).
    assert _strides(out) == _strides(ref)
    grad = torch.randn_like(ref)
    out.backward(grad)
    ref.backward(grad)
    assert_rel(x.grad, x_ref.grad)
    assert_rel(weight.grad, w_ref.grad)
    # The weight's gradient in the weight's own layout, where it has one of the two.
    if weight_layout != "sliced":
        assert _strides(weight.grad) == _strides(weight)


@pytest.mark.parametrize("geometry", [g for g in GEOMETRIES if g[5] != (1, 1)],
                         ids=lambda g: "x".join(map(str, g[:5])) + f"-k{g[5][0]}{g[5][1]}")
def test_products_by_taps_at_any_stride(geometry):
    # The route takes them at stride 1 only (_by_taps), but they hold at any.
    n, c, k, h, w, kernel, stride, padding, dilation = geometry
    x, weight = _inputs(n, c, k, h, w, kernel, "channels_last", dtype=torch.float64)
    weight = weight.contiguous(memory_format=torch.channels_last)
    pairs = [cpu_gemm_conv._two(v) for v in (stride, padding, dilation)]
    x_ref, w_ref = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    ref = F.conv2d(x_ref, w_ref, None, stride, padding, dilation)
    out = cpu_gemm_conv._forward_by_taps(x, weight, *pairs, tuple(ref.shape[2:]))
    assert_rel(out, ref)
    grad = torch.randn_like(ref)
    ref.backward(grad)
    grad_x, grad_weight = cpu_gemm_conv._backward_by_taps(grad, x, weight, *pairs, (True, True))
    assert_rel(grad_x, x_ref.grad)
    assert_rel(grad_weight, w_ref.grad)
    assert grad_weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("weight_layout", ["contiguous", "channels_last"])  # by patches, by taps
@pytest.mark.parametrize("geometry", [GEOMETRIES[0], GEOMETRIES[4], GEOMETRIES[5]], ids=["stride2", "dilated", "rect"])
def test_first_and_second_derivatives_in_float64(geometry, weight_layout):
    n, c, k, h, w, kernel, stride, padding, dilation = geometry
    x, weight = _inputs(min(n, 2), min(c, 3), min(k, 3), min(h, 6), min(w, 6), kernel, "channels_last",
                        dtype=torch.float64)
    weight = _weight_in_layout(weight, weight_layout)
    x.requires_grad_(), weight.requires_grad_()

    def conv(a, b):
        return cpu_gemm_conv.conv2d(a, b, stride, padding, dilation)

    assert torch.autograd.gradcheck(conv, (x, weight))
    assert torch.autograd.gradgradcheck(conv, (x, weight))


def test_only_the_gradients_asked_for():
    x, weight = _inputs(2, 4, 5, 6, 6, (3, 3), "channels_last")
    grad = torch.randn(2, 5, 6, 6)
    gx, gw = cpu_gemm_conv.backward(grad, x, weight, 1, 1, 1, (True, False))
    assert gw is None and gx.shape == x.shape
    gx, gw = cpu_gemm_conv.backward(grad, x, weight, 1, 1, 1, (False, True))
    assert gx is None and gw.shape == weight.shape


@pytest.mark.parametrize("kernel", [(3, 3), (1, 1)])
def test_an_input_changed_in_place_before_the_backward_is_refused(kernel):
    # The backward reads x again (its patches, for the weight gradient): a
    # change to x after the forward must fail as aten's would.
    x, weight = _inputs(2, 4, 5, 6, 6, kernel, "channels_last")
    x.requires_grad_(), weight.requires_grad_()
    h = x * 1.5
    out = cpu_gemm_conv.conv2d(h, weight, 1, kernel[0] // 2, 1)
    h.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_a_frozen_weight_gives_the_input_gradient_alone():
    x, weight = _inputs(2, 4, 5, 6, 6, (3, 3), "channels_last")
    x.requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    grad = torch.randn(2, 5, 6, 6)
    cpu_gemm_conv.conv2d(x, weight, 1, 1, 1).backward(grad)
    F.conv2d(x_ref, weight, None, 1, 1).backward(grad)
    assert weight.grad is None
    assert_rel(x.grad, x_ref.grad)


def test_nan_in_the_input_reaches_the_outputs_that_read_it():
    x, weight = _inputs(1, 4, 4, 8, 8, (3, 3), "channels_last")
    x[0, 1, 2, 5] = float("nan")
    x[0, 2, 6, 1] = float("inf")
    out = cpu_gemm_conv.forward(x, weight, (1, 1), (1, 1), (1, 1))
    ref = F.conv2d(x, weight, None, 1, 1)
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.equal(torch.isinf(out), torch.isinf(ref))
    finite = torch.isfinite(ref)
    assert_rel(out[finite], ref[finite])


def _big_layer_input(batch=8, size=4, channels=512, dtype=torch.float32):
    return (torch.randn(batch, channels, size, size, dtype=dtype).contiguous(memory_format=torch.channels_last),
            torch.randn(channels, channels, 3, 3, dtype=dtype))


@pytest.fixture
def route_on(monkeypatch):
    """The route enabled whatever this CPU is (off by default on AVX2 ones)."""
    monkeypatch.setenv("RESNET_FAST_CPU_GEMM_CONV", "1")


def test_setting_and_cpu_decide_whether_it_runs(monkeypatch):
    monkeypatch.delenv("RESNET_FAST_CPU_GEMM_CONV", raising=False)
    for avx512 in (True, False):
        monkeypatch.setattr(cpu_gemm_conv, "_MEASURED_CPU", avx512)
        assert cpu_gemm_conv.enabled() == avx512
    for setting, expected in (("1", True), ("0", False)):
        monkeypatch.setenv("RESNET_FAST_CPU_GEMM_CONV", setting)
        for avx512 in (True, False):
            monkeypatch.setattr(cpu_gemm_conv, "_MEASURED_CPU", avx512)
            assert cpu_gemm_conv.enabled() == expected


def test_rule_takes_large_weights_over_few_pixels(monkeypatch, route_on):
    x, weight = _big_layer_input()
    one = (1, 1)
    assert cpu_gemm_conv.applies(x, weight, one, one, one, 1)  # 512 channels, 3x3, 8 x 4x4 pixels
    assert cpu_gemm_conv.applies(x, torch.randn(1024, 512, 1, 1), one, (0, 0), one, 1)  # 1x1, 0.5M weights
    assert cpu_gemm_conv.applies(x, weight, (2, 2), one, one, 1)  # stride 2: fewer pixels still
    big_image = torch.randn(8, 512, 14, 14).contiguous(memory_format=torch.channels_last)
    assert not cpu_gemm_conv.applies(big_image, weight, one, one, one, 1)  # 1568 pixels
    assert not cpu_gemm_conv.applies(x, torch.randn(256, 512, 3, 3)[:, :256].contiguous(), one, one, one, 1)
    assert not cpu_gemm_conv.applies(x[:, :256], torch.randn(256, 256, 1, 1), one, (0, 0), one, 1)
    assert not cpu_gemm_conv.applies(x.bfloat16(), weight.bfloat16(), one, one, one, 1)
    assert not cpu_gemm_conv.applies(x, torch.randn(512, 256, 3, 3), one, one, one, 2)  # grouped
    assert not cpu_gemm_conv.applies(x[:0], weight, one, one, one, 1)  # empty batch: aten's
    with torch.autocast("cpu", dtype=torch.bfloat16):  # aten's convolution runs in bfloat16 there
        assert not cpu_gemm_conv.applies(x, weight, one, one, one, 1)
    monkeypatch.setenv("RESNET_FAST_CPU_GEMM_CONV", "0")
    assert not cpu_gemm_conv.applies(x, weight, one, one, one, 1)


@pytest.fixture
def gemm_calls(monkeypatch):
    """The shapes of the weights that went through the route, forward and backward."""
    calls = {"forward": [], "backward": []}
    for name in calls:
        real = getattr(cpu_gemm_conv, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name].append(tuple(args[2 if _name == "backward" else 1].shape))
            return _real(*args, **kwargs)

        monkeypatch.setattr(cpu_gemm_conv, name, counted)
    return calls


native_only = pytest.mark.skipif("native" not in kernel_backends(), reason="the native extension is not built")


@native_only
def test_training_resnet18_takes_the_route_in_its_last_stage(gemm_calls, monkeypatch, route_on):
    tv = torchvision.models.resnet18(num_classes=10)
    for m in tv.modules():
        if isinstance(m, nn.BatchNorm2d):
            randomize_batchnorm_(m)
    ours = resnet_fast.from_torchvision(copy.deepcopy(tv))
    x, labels = torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,))
    F.cross_entropy(tv(x), labels).backward()
    F.cross_entropy(ours(x), labels).backward()
    # layer4 at 2x2 pixels: both 512-channel 3x3s of each block, the stride-2
    # 256->512 3x3 and the 1x1 downsample; nothing before it.
    expected = sorted([(512, 512, 3, 3)] * 3 + [(512, 256, 3, 3), (512, 256, 1, 1)])
    assert sorted(gemm_calls["forward"]) == expected
    assert sorted(gemm_calls["backward"]) == expected
    for (name, p_tv), p_ours in zip(tv.named_parameters(), ours.parameters()):
        assert_rel(p_ours.grad, p_tv.grad, factor=20), name

    gemm_calls["forward"].clear()
    monkeypatch.setenv("RESNET_FAST_CPU_GEMM_CONV", "0")
    ours(x).sum().backward()
    assert gemm_calls["forward"] == []
