"""Activation memory kept between CPU inference forwards
(resnet_fast.cpu_memory, csrc/cpu/activation_memory.cpp): blocks freed in
one forward serve the next, idle ones go back to the system, and memory
allocated under one allocator and freed under the other (as aten's oneDNN
glue does) stays sound both ways."""
import subprocess
import sys

import pytest
import torch
import torchvision

import resnet_fast
from resnet_fast import ops
from resnet_fast.cpu_memory import cached_cpu_memory, empty_cpu_cache, empty_for_step, reused_activation_memory
from resnet_fast.testing import randomize_batchnorm_

from conftest import assert_rel, channels_last, kernel_backends, run_in_threads

pytestmark = pytest.mark.skipif("native" not in kernel_backends(), reason="the native extension is not built")

BIG = 1 << 20  # elements of float32: 4 MiB, well above the cached size


@pytest.fixture(autouse=True)
def _empty_cache():
    empty_cpu_cache()
    yield
    empty_cpu_cache()


def test_a_block_freed_in_one_forward_serves_the_next():
    with reused_activation_memory():
        first = torch.empty(BIG)
        address = first.data_ptr()
        del first
    assert cached_cpu_memory() == BIG * 4
    with reused_activation_memory():
        again = torch.randn(BIG)
        assert again.data_ptr() == address
        assert cached_cpu_memory() == 0
    assert torch.isfinite(again).all()


def test_small_tensors_and_other_sizes_are_not_kept():
    with reused_activation_memory():
        small = torch.empty(100)
        other = torch.empty(BIG + 16)
        del small, other
    assert cached_cpu_memory() == (BIG + 16) * 4
    with reused_activation_memory():
        fresh = torch.empty(BIG)  # a different size: not the kept block
        assert cached_cpu_memory() == (BIG + 16) * 4
        del fresh


def test_a_block_no_forward_took_is_freed_when_the_next_forward_ends():
    with reused_activation_memory():
        t = torch.empty(BIG)
        del t
    with reused_activation_memory():
        assert cached_cpu_memory() == BIG * 4  # kept while this forward might still want it
    assert cached_cpu_memory() == 0


def test_empty_cpu_cache_frees_everything_kept():
    with reused_activation_memory():
        a, b = torch.empty(BIG), torch.empty(2 * BIG)
        del a, b
    assert empty_cpu_cache() == 3 * BIG * 4
    assert cached_cpu_memory() == 0


def test_outside_a_forward_nothing_is_kept():
    t = torch.empty(BIG)
    del t
    assert cached_cpu_memory() == 0


def test_a_tensor_outliving_its_forward_is_kept_when_freed_later():
    with reused_activation_memory():
        out = torch.randn(BIG)
    assert cached_cpu_memory() == 0
    expected = out.clone()
    assert torch.equal(out, expected)  # its memory is its own until freed
    del out
    assert cached_cpu_memory() == BIG * 4


def test_memory_for_a_training_step_is_kept_outside_a_forward():
    # What a training step allocates afresh at every step (cpu_memory.empty_for_step)
    # comes back from the cache, no forward running.
    like = torch.randn(3, dtype=torch.float64)
    first = empty_for_step(like, (BIG // 2, 2))
    assert first.shape == (BIG // 2, 2) and first.dtype == torch.float64 and first.is_contiguous()
    address = first.data_ptr()
    del first
    assert cached_cpu_memory() == BIG * 8
    again = empty_for_step(like, [BIG // 2, 2])
    assert again.data_ptr() == address and cached_cpu_memory() == 0
    again.copy_(torch.arange(BIG, dtype=torch.float64).view(BIG // 2, 2))  # its memory, whole and writable
    assert again[-1, -1].item() == BIG - 1
    small = empty_for_step(like, (4,))  # below the cached size: aten's own
    del again, small
    assert cached_cpu_memory() == BIG * 8
    with reused_activation_memory():  # a forward that does not take it frees it at its end
        pass
    assert cached_cpu_memory() == 0


def test_memory_for_a_training_step_refuses_other_devices_and_arguments():
    from resnet_fast import _C

    with pytest.raises(TypeError, match="a tensor and a tuple of sizes"):
        _C.empty_from_activation_memory([1], (2,))
    with pytest.raises(TypeError):
        _C.empty_from_activation_memory(torch.empty(1), ("two",))
    with pytest.raises(RuntimeError, match="CPU tensors"):
        _C.empty_from_activation_memory(torch.empty(1, device="meta"), (2,))
    assert empty_for_step(torch.empty(1, device="meta"), (2, 3)).device.type == "meta"


def test_batchnorm_backward_reuses_its_gradients_memory_across_steps():
    shape = (2, 64, 32, 32)  # 512 KiB per gradient, above the cached size
    x, grad, out = (torch.randn(shape).contiguous(memory_format=torch.channels_last) for _ in range(3))
    out = out.relu()
    weight, mean, invstd = torch.rand(64) + 0.5, torch.randn(64) * 0.1, torch.rand(64) + 0.5
    first = torch.ops.resnet_fast.bn_act_backward(grad, x, out, weight, mean, invstd, True)
    addresses = {first[0].data_ptr(), first[3].data_ptr()}
    expected = [t.clone() for t in first]
    del first
    again = torch.ops.resnet_fast.bn_act_backward(grad, x, out, weight, mean, invstd, True)
    assert {again[0].data_ptr(), again[3].data_ptr()} == addresses
    for got, want in zip(again, expected):
        assert torch.equal(got, want)


def test_scopes_nest_and_an_unmatched_exit_raises():
    from resnet_fast import _C

    with reused_activation_memory():
        with reused_activation_memory():
            t = torch.empty(BIG)
            del t
        # the inner end is not the end of the forward: nothing is released or restored yet
        assert cached_cpu_memory() == BIG * 4
        again = torch.empty(BIG)
        assert cached_cpu_memory() == 0
        del again
    with pytest.raises(RuntimeError, match="without enter_activation_memory"):
        _C.exit_activation_memory()


def test_memory_crossing_between_the_allocators_stays_sound():
    """aten's oneDNN glue frees through whichever allocator is installed at
    the time: blocks made outside and freed inside, and made inside and freed
    outside, including oneDNN's prepacked weights. Run in a child process: an
    unsound free aborts it."""
    code = """
import torch, resnet_fast
from resnet_fast.cpu_memory import reused_activation_memory, empty_cpu_cache
from resnet_fast import ops
outside = [torch.randn(1 << 20) for _ in range(4)]
w = torch.randn(256, 128, 3, 3)
packed_outside = ops.prepack_conv_weight(w, 1, 1, 1, 1, (2, 128, 14, 14))
with reused_activation_memory():
    inside = [torch.randn(1 << 20) for _ in range(4)]
    packed_inside = ops.prepack_conv_weight(w, 1, 1, 1, 1, (2, 128, 14, 14))
    del outside[:2], packed_outside
del inside[:2], packed_inside
with reused_activation_memory():
    del outside, inside
    again = [torch.empty(1 << 20) for _ in range(6)]
empty_cpu_cache()
del again
empty_cpu_cache()
print("sound")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "sound" in result.stdout, result.stderr[-2000:]


def _pair(arch="resnet18"):
    torch.manual_seed(0)
    tv = randomize_batchnorm_(getattr(torchvision.models, arch)(num_classes=10)).eval()
    return tv, resnet_fast.from_torchvision(tv).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_repeated_forwards_reuse_their_activations_and_stay_right(dtype):
    tv, model = _pair()
    tv, model = tv.to(dtype), model.to(dtype)
    x = channels_last(torch.randn(2, 3, 64, 48, dtype=dtype))
    with torch.no_grad():
        expected = tv(x)
        outputs = [model(x) for _ in range(4)]
    assert cached_cpu_memory() > 0  # the forward's freed activations, kept for the next
    for out in outputs:
        assert_rel(out, expected)


def test_concurrent_forwards_share_the_memory_soundly():
    tv, model = _pair()
    inputs = [channels_last(torch.randn(2, 3, 64, 64)) for _ in range(4)]
    with torch.no_grad():
        expected = [tv(x) for x in inputs]

    def run(i):
        with torch.no_grad():
            for _ in range(5):
                assert_rel(model(inputs[i]), expected[i])

    errors = run_in_threads(run, 4)
    assert not errors, errors
    # Every forward has ended: aten's allocator is back, and nothing freed now is kept.
    kept = cached_cpu_memory()
    t = torch.empty(BIG)
    del t
    assert cached_cpu_memory() == kept


def test_pooling_into_kept_memory_matches_the_reference():
    """An op of our own allocating its output inside a forward."""
    x = channels_last(torch.randn(3, 16, 40, 40))
    expected = torch.nn.functional.max_pool2d(x, 3, 2, 1)
    for _ in range(3):
        with reused_activation_memory():
            out = ops.max_pool2d_nhwc(x, [3, 3], [2, 2], [1, 1], [1, 1], False)
        assert torch.equal(out, expected)
