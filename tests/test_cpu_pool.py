"""ops.max_pool2d_nhwc, the CPU inference max pooling without indices,
against torch.nn.functional.max_pool2d (its reference): every dtype, awkward
shapes and windows, NaN and Inf, layouts, written into a given tensor; the
ResNet stem that uses it; and ops.global_avg_pool_nhwc, the head's mean,
against adaptive_avg_pool2d."""
import pytest
import torch
import torch.nn.functional as F
import torchvision

import resnet_fast
from resnet_fast import ops
from resnet_fast.testing import randomize_batchnorm_

from conftest import assert_rel, channels_last, kernel_backends

pytestmark = pytest.mark.skipif("native" not in kernel_backends(), reason="the native extension is not built")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# (input shape, kernel_size, stride, padding, dilation, ceil_mode)
WINDOWS = {
    "resnet_stem": ((2, 64, 112, 112), 3, 2, 1, 1, False),
    "odd_sizes": ((3, 5, 17, 23), 3, 2, 1, 1, False),
    "batch1_c3": ((1, 3, 9, 7), 3, 2, 1, 1, False),
    "one_channel": ((2, 1, 10, 11), 2, 2, 0, 1, False),
    "wide_channels": ((1, 2051, 5, 6), 3, 1, 1, 1, False),  # past any vector width, with a tail
    "ceil_mode": ((2, 8, 10, 13), 3, 2, 1, 1, True),
    "ceil_mode_last_window_dropped": ((1, 4, 6, 6), 2, 3, 1, 1, True),
    "dilated": ((2, 6, 15, 14), 3, 2, 1, 2, False),
    "rectangular": ((2, 7, 12, 9), (3, 2), (1, 2), (1, 0), (1, 1), False),
    "no_stride_given": ((2, 4, 8, 8), 2, None, 0, 1, False),
    "window_is_the_input": ((2, 4, 7, 7), 7, 1, 0, 1, False),
    "four_wide": ((1, 3, 8, 9), 4, 1, 2, 1, False),  # windows of 2, 3 and 4 pixels in a row
    "five_wide_dilated": ((2, 5, 9, 16), (2, 5), 1, (1, 2), (1, 2), False),
}


def _pool_args(window):
    _, kernel, stride, padding, dilation, ceil_mode = window
    return dict(kernel_size=kernel, stride=stride, padding=padding, dilation=dilation, ceil_mode=ceil_mode)


@pytest.mark.parametrize("name", sorted(WINDOWS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["channels_last", "nchw", "sliced"])
def test_max_pool2d_nhwc_matches_max_pool2d(name, dtype, layout):
    shape = WINDOWS[name][0]
    if layout == "sliced":
        x = torch.randn(*shape[:3], 2 * shape[3], dtype=dtype)[..., 1::2]
    else:
        x = torch.randn(shape, dtype=dtype)
        x = channels_last(x) if layout == "channels_last" else x
    kept = x.clone()
    args = _pool_args(WINDOWS[name])
    expected = F.max_pool2d(x, **args)
    with torch.no_grad():
        out = ops.max_pool2d_nhwc(x, **args)
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, expected)  # a maximum is exact
    assert torch.equal(x, kept)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_and_inf_come_out_as_max_pool2d_gives_them(dtype):
    x = torch.randn(2, 9, 13, 12, dtype=dtype)
    flat = x.view(-1)
    picks = torch.randperm(flat.numel())[:30]
    flat[picks[:10]] = float("nan")
    flat[picks[10:20]] = float("inf")
    flat[picks[20:]] = float("-inf")
    x[1, 3] = float("-inf")  # a channel with nothing but -inf
    args = _pool_args(WINDOWS["odd_sizes"])
    expected = F.max_pool2d(x, **args)
    out = ops.max_pool2d_nhwc(channels_last(x), **args)
    assert expected.isnan().any() and expected.isposinf().any() and expected.isneginf().any()
    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)


def test_an_empty_batch_gives_an_empty_result():
    x = torch.randn(0, 4, 9, 9)
    out = ops.max_pool2d_nhwc(x, 3, 2, 1)
    assert out.shape == (0, 4, 5, 5)


def test_opcheck_max_pool2d_nhwc():
    """Schema and fake kernel agree with the kernel (ceil_mode included)."""
    for name in ("odd_sizes", "ceil_mode_last_window_dropped", "rectangular"):
        shape, kernel, stride, padding, dilation, ceil_mode = WINDOWS[name]
        pair = lambda v: [v, v] if isinstance(v, int) else list(v)  # noqa: E731
        torch.library.opcheck(torch.ops.resnet_fast.max_pool2d_nhwc.default,
                              (torch.randn(shape), pair(kernel), pair(stride), pair(padding), pair(dilation),
                               ceil_mode))


@pytest.mark.parametrize("name", ["resnet_stem", "odd_sizes", "ceil_mode", "rectangular", "wide_channels"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_max_pool2d_nhwc_writes_into_a_slice_of_a_batch(name, dtype):
    shape = WINDOWS[name][0]
    args = _pool_args(WINDOWS[name])
    x = torch.randn(shape).to(dtype)
    expected = F.max_pool2d(x, **args)
    whole = torch.full((shape[0] + 2, *expected.shape[1:]), float("nan"), dtype=dtype).contiguous(
        memory_format=torch.channels_last)  # poisoned: every element of the slice must be written
    with torch.no_grad():
        returned = ops.max_pool2d_nhwc(x, **args, out=whole[1:1 + shape[0]])
    assert returned.data_ptr() == whole[1].data_ptr()
    assert torch.equal(whole[1:1 + shape[0]], expected)
    assert whole[0].isnan().all() and whole[-1].isnan().all()  # nothing outside it


def test_max_pool2d_nhwc_refuses_an_out_it_cannot_write():
    x = channels_last(torch.randn(2, 4, 9, 9))
    good = channels_last(torch.empty(2, 4, 5, 5))
    with torch.no_grad():
        for bad, match in ((torch.empty(2, 4, 5, 5), "channels_last"), (channels_last(torch.empty(2, 4, 4, 4)), "shape"),
                           (channels_last(torch.empty(2, 4, 5, 5, dtype=torch.float64)), "float32"),
                           ([1.0], "Tensor")):
            with pytest.raises((ValueError, TypeError), match=match):
                ops.max_pool2d_nhwc(x, 3, 2, 1, out=bad)
        with pytest.raises(RuntimeError, match="memory location|overlap"):
            ops.max_pool2d_nhwc(good, 1, 1, 0, out=good)
    assert ops.max_pool2d_nhwc(x[:0], 3, 2, 1, out=good[:0]).shape == (0, 4, 5, 5)


def test_opcheck_max_pool2d_nhwc_into():
    x = torch.randn(2, 3, 11, 10)
    out = channels_last(torch.empty(2, 3, 6, 5))
    torch.library.opcheck(torch.ops.resnet_fast.max_pool2d_nhwc_into.default,
                          (out, x, [3, 3], [2, 2], [1, 1], [1, 1], False))


# ------------------------------------------------ the global average of the head

@pytest.mark.parametrize("shape", [(2, 2048, 7, 7), (1, 3, 5, 9), (3, 517, 1, 1), (1, 257, 4, 3), (4, 64, 13, 2)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["channels_last", "nchw", "sliced"])
def test_global_avg_pool_nhwc_matches_adaptive_avg_pool2d(shape, dtype, layout):
    x = torch.randn(shape) * 3 + 1
    if layout == "channels_last":
        x = channels_last(x)
    elif layout == "sliced":
        x = torch.randn(shape[0], shape[1] + 3, shape[2], shape[3])[:, 2:2 + shape[1]]
    x = x.to(dtype)
    expected = torch.flatten(F.adaptive_avg_pool2d(x.double(), 1), 1).to(dtype)
    with torch.no_grad():
        out = ops.global_avg_pool_nhwc(x)
    assert out.dtype == dtype and out.shape == expected.shape
    tol = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(out.float(), expected.float(), rtol=tol, atol=tol)


def test_global_avg_pool_nhwc_keeps_nan_and_inf():
    x = torch.randn(2, 5, 4, 4)
    x[0, 1, 2, 3] = float("nan")
    x[0, 2, 0, 0] = float("inf")
    x[1, 3, 1, 1], x[1, 3, 2, 2] = float("inf"), float("-inf")
    expected = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
    out = ops.global_avg_pool_nhwc(channels_last(x))
    torch.testing.assert_close(out, expected, equal_nan=True)
    assert out[0, 1].isnan() and out[0, 2].isposinf() and out[1, 3].isnan()


def test_global_avg_pool_nhwc_refuses_what_it_cannot_take():
    with pytest.raises(ValueError, match="empty"):
        ops.global_avg_pool_nhwc(torch.randn(2, 3, 0, 4))
    with pytest.raises(RuntimeError, match="no gradient"):
        ops.global_avg_pool_nhwc(torch.randn(2, 3, 4, 4, requires_grad=True))
    with pytest.raises(ValueError):
        ops.global_avg_pool_nhwc(torch.randn(3, 4, 4))
    assert ops.global_avg_pool_nhwc(torch.randn(0, 6, 3, 3)).shape == (0, 6)


def test_opcheck_global_avg_pool_nhwc():
    torch.library.opcheck(torch.ops.resnet_fast.global_avg_pool_nhwc.default, (channels_last(torch.randn(2, 7, 3, 5)),))


def _resnet18_pair(dtype):
    torch.manual_seed(0)
    tv = randomize_batchnorm_(torchvision.models.resnet18(num_classes=10)).eval().to(dtype)
    return tv, resnet_fast.from_torchvision(tv).eval()


def _count_calls(monkeypatch, op_name):
    """A list that grows by one on each call of ops.<op_name>."""
    calls = []
    real = getattr(ops, op_name)
    monkeypatch.setattr(ops, op_name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_head_averages_by_the_op_unless_something_must_see_the_pooling(dtype, monkeypatch):
    tv, ours = _resnet18_pair(dtype)
    calls = _count_calls(monkeypatch, "global_avg_pool_nhwc")
    x = channels_last(torch.randn(2, 3, 40, 36, dtype=dtype))
    fc, wide_fc = ours.fc, torch.nn.Linear(1024, 10).to(dtype)
    with torch.inference_mode():
        expected = tv(x)
        assert_rel(ours(x), expected, dtype)
        assert len(calls) == 1
        seen = []
        handle = ours.avgpool.register_forward_hook(lambda m, i, o: seen.append(o.shape))
        assert_rel(ours(x), expected, dtype)
        handle.remove()
        assert len(calls) == 1 and seen == [(2, 512, 1, 1)]
        ours.avgpool = torch.nn.AdaptiveAvgPool2d((2, 1))  # not a global average: the module runs
        ours.fc = wide_fc
        assert ours(x).shape == (2, 10) and len(calls) == 1
    ours.avgpool, ours.fc = torch.nn.AdaptiveAvgPool2d(1), fc
    ours.train()
    ours(x).float().sum().backward()  # training: the module, for its gradient
    assert len(calls) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_stem_pools_without_indices_and_as_torchvision_does(dtype, monkeypatch):
    tv, ours = _resnet18_pair(dtype)
    calls = _count_calls(monkeypatch, "max_pool2d_nhwc")
    x = channels_last(torch.randn(2, 3, 45, 39, dtype=dtype))
    with torch.inference_mode():
        out = ours(x)
        stem = ours.forward_intermediates(x, indices=[0, 1])[1]
        expected_stem = [tv.relu(tv.bn1(tv.conv1(x)))]
        expected_stem.append(tv.layer1(tv.maxpool(expected_stem[0])))
    assert len(calls) == 2
    if dtype == torch.float32:
        assert_rel(out, tv(x), dtype)
        for got, expected in zip(stem, expected_stem):
            assert_rel(got, expected, dtype)
    # In training the module runs, for its gradient.
    ours.train()
    ours(x.float().to(dtype)).float().sum().backward()
    assert len(calls) == 2 and ours.conv1.weight.grad is not None


# ------------------------------------------------ the stem, a few images at a time

def _stem_parts(monkeypatch, ours, images_per_part):
    """Make the stem go images_per_part images at a time; count its parts."""
    parts = []
    real = ours._stem_act
    monkeypatch.setattr(ours, "_stem_act", lambda x: parts.append(x.shape[0]) or real(x))
    one_image = ours.conv1.out_channels * 16 * 16 * 4  # 32x32 float32 inputs: 16x16 stem outputs
    monkeypatch.setattr(type(ours), "STEM_CHUNK_BYTES", images_per_part * one_image)
    return parts


@pytest.mark.parametrize("batch, images_per_part, expected_parts", [(5, 2, [2, 2, 1]), (6, 4, [3, 3]), (3, 3, [3])])
def test_the_stem_in_parts_computes_what_torchvision_computes(batch, images_per_part, expected_parts, monkeypatch):
    torch.manual_seed(0)
    tv = randomize_batchnorm_(torchvision.models.resnet18(num_classes=10)).eval()
    ours = resnet_fast.from_torchvision(tv).eval()
    parts = _stem_parts(monkeypatch, ours, images_per_part)
    x = torch.randn(batch, 3, 32, 32)
    x[1, 2, 7, 7] = float("nan")  # one image poisoned: the others stay exact, across the parts
    with torch.inference_mode():
        for layout in (x, channels_last(x)):
            del parts[:]
            out, expected = ours(layout), tv(layout)
            assert parts == expected_parts
            assert torch.equal(out.isnan(), expected.isnan()) and out[1].isnan().all()
            keep = [i for i in range(batch) if i != 1]
            assert_rel(out[keep], expected[keep], torch.float32)
        for _ in range(2):  # replayed: the parts as one recorded call, a whole stem as its recorded step
            del parts[:]
            out = ours(channels_last(x))
            assert parts == (expected_parts if len(expected_parts) > 1 else [])
        assert_rel(out[keep], expected[keep], torch.float32)


def test_the_stem_is_whole_where_its_output_is_wanted_or_in_training(monkeypatch):
    torch.manual_seed(0)
    tv = randomize_batchnorm_(torchvision.models.resnet18(num_classes=10)).eval()
    ours = resnet_fast.from_torchvision(tv).eval()
    parts = _stem_parts(monkeypatch, ours, 1)
    x = channels_last(torch.randn(3, 3, 32, 32))
    with torch.inference_mode():
        _, (stem, layer1) = ours.forward_intermediates(x, indices=[0, 1])
        assert parts == [3]
        assert_rel(stem, tv.relu(tv.bn1(tv.conv1(x))), torch.float32)
    del parts[:]
    ours.train()
    tv.train()
    out = ours(x)
    assert parts == [3]  # batch statistics over the whole batch
    assert_rel(out, tv(x), torch.float32, factor=10)


@pytest.mark.parametrize("conv1", [
    lambda: torch.nn.Conv2d(3, 64, 3, padding="same", bias=False),  # a size the stem cannot count ahead
    lambda: torch.nn.Conv2d(3, 64, 5, stride=2, padding=1, dilation=2, bias=False),
])
def test_a_replaced_stem_conv_still_goes_in_parts_or_whole(conv1, monkeypatch):
    torch.manual_seed(0)
    tv = randomize_batchnorm_(torchvision.models.resnet18(num_classes=10)).eval()
    tv.conv1 = conv1()
    ours = resnet_fast.from_torchvision(tv).eval()
    monkeypatch.setattr(type(ours), "STEM_CHUNK_BYTES", 1)  # one image at a time where the stem can go in parts
    x = channels_last(torch.randn(3, 3, 29, 31))
    with torch.inference_mode():
        for _ in range(3):
            assert_rel(ours(x), tv(x), torch.float32)
