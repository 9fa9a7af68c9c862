"""The all_finite operator (csrc/cpu/finite.cpp) behind the network's one
NaN/Inf scan per forward (resnet_fast/finite.py) and the convolution's fused
ReLU: against torch.isfinite(x).all() for every dtype, layout and place of
the bad value."""
import pytest
import torch

from conftest import channels_last, kernel_backends

pytestmark = pytest.mark.skipif("native" not in kernel_backends(), reason="the native extension is not built")

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
BAD = [float("nan"), float("inf"), float("-inf")]


def _all_finite(x):
    return torch.ops.resnet_fast.all_finite(x)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (7, 3, 5, 9), (2, 64, 33, 41), (3, 70000)])  # the last past one work item
def test_finite_tensors_are_finite(dtype, shape):
    x = torch.randn(shape).to(dtype)
    assert _all_finite(x) is True
    info = torch.finfo(dtype)
    extremes = torch.tensor([info.max, info.tiny / 4, -info.max, 0.0], dtype=dtype)
    assert extremes[1] > 0
    assert _all_finite(extremes) is True  # the largest and subnormal values are finite


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_one_bad_value_anywhere_is_found(dtype, bad, where):
    x = torch.randn(3, 70001).to(dtype)  # several work items, and a short last one
    index = {"first": 0, "middle": x.numel() // 2 + 13, "last": x.numel() - 1}[where]
    x.view(-1)[index] = bad
    assert _all_finite(x) is False


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["channels_last", "sliced", "transposed"])
def test_every_layout(dtype, layout):
    x = torch.randn(4, 6, 9, 11).to(dtype)
    if layout == "channels_last":
        x = channels_last(x)
    elif layout == "sliced":  # not dense: only the slice counts
        x = torch.randn(4, 8, 9, 11).to(dtype)
        x[:, 7] = float("nan")
        x = x[:, :6]
    else:
        x = x.transpose(1, 3)
    assert _all_finite(x) is True
    x[1, 2, 3, 4] = float("inf")
    assert _all_finite(x) is False


def test_integers_and_empty_tensors_are_finite():
    assert _all_finite(torch.arange(10)) is True
    assert _all_finite(torch.empty(0)) is True
    assert _all_finite(torch.empty(0, 3, 4, 4, dtype=torch.bfloat16)) is True
