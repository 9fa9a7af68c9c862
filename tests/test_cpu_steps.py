"""The CPU inference steps kept per layer (resnet_fast.cpu_inference): a
call under no_grad with the signature of an earlier one runs the kept step
(the decision is not made again), and anything the decision read that
changes (weights, BN statistics, input shape, residual, flags, the Winograd
setting, the thread count, the training mode) gives the answer the
reference gives for the new state, never the old one's."""
import pytest
import torch
import torchvision
from torch import nn

import resnet_fast
from resnet_fast import cpu_inference, ops, reference
from resnet_fast.folding import FoldCache
from resnet_fast.layers import conv_norm_act
from resnet_fast.testing import randomize_batchnorm_

from conftest import assert_rel, channels_last, kernel_backends

pytestmark = pytest.mark.skipif("native" not in kernel_backends(), reason="the native extension is not built")


@pytest.fixture
def decisions(monkeypatch):
    """How many times a layer's route was decided (not taken from a kept step)."""
    made = []
    real = cpu_inference._decide

    def counted(*args, **kwargs):
        made.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(cpu_inference, "_decide", counted)
    return made


def _layer(in_ch=8, out_ch=8, kernel=3, stride=1, seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(in_ch, out_ch, kernel, stride, padding=kernel // 2, bias=False)
    bn = randomize_batchnorm_(nn.BatchNorm2d(out_ch)).eval()
    return conv, bn


def _expected(conv, bn, x, residual=None, relu=True):
    with torch.no_grad():
        out = bn(conv(x))
        if residual is not None:
            out = out + residual
        return torch.relu(out) if relu else out


@pytest.mark.parametrize("kernel,stride,winograd", [(3, 1, True), (3, 1, False), (1, 1, False), (3, 2, False)])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_a_second_call_runs_the_kept_step_with_the_same_answer(decisions, monkeypatch, kernel, stride, winograd, mode):
    monkeypatch.setattr(ops, "WINOGRAD_MIN_TILES_PER_THREAD", 0 if winograd else 10**9)
    conv, bn = _layer(kernel=kernel, stride=stride)
    cache = FoldCache()
    x = channels_last(torch.randn(2, 8, 11, 9))
    residual = channels_last(torch.randn(2, 8, 11, 9)) if stride == 1 else None
    guard = torch.no_grad if mode == "no_grad" else torch.inference_mode
    with guard():
        first = conv_norm_act(conv, bn, x, residual, True, None, cache)
        second = conv_norm_act(conv, bn, x, residual, True, None, cache)
    assert len(decisions) == 1
    assert torch.equal(first, second)
    assert_rel(second, _expected(conv, bn, x, residual))
    algorithm = ops.cpu_conv_algorithm(x, conv.weight, conv.stride, conv.padding, conv.dilation, conv.groups)
    assert (algorithm == "winograd") == (winograd and kernel == 3 and stride == 1)


def test_with_autograd_on_nothing_is_kept(decisions):
    conv, bn = _layer()
    cache = FoldCache()
    x = channels_last(torch.randn(1, 8, 6, 6))
    for _ in range(2):
        out = conv_norm_act(conv, bn, x, None, True, None, cache)
    assert len(decisions) == 2
    out.sum().backward()  # the weights required grad: the fold is part of the graph
    assert conv.weight.grad is not None and bn.weight.grad is not None


@pytest.mark.parametrize("change", ["weight in place", "bn statistics", "load_state_dict", "weight replaced",
                                    "bn eps"])
def test_a_changed_source_is_folded_again(decisions, change):
    conv, bn = _layer()
    cache = FoldCache()
    x = channels_last(torch.randn(1, 8, 7, 7))
    with torch.no_grad():
        conv_norm_act(conv, bn, x, None, True, None, cache)
        if change == "weight in place":
            conv.weight.mul_(-1.5)
        elif change == "bn statistics":
            bn.running_mean.add_(0.7)
        elif change == "load_state_dict":
            other, _ = _layer(seed=1)
            conv.load_state_dict(other.state_dict())
        elif change == "weight replaced":
            conv.weight = nn.Parameter(torch.randn_like(conv.weight))
        elif change == "bn eps":
            bn.eps = 0.5
        out = conv_norm_act(conv, bn, x, None, True, None, cache)
    assert len(decisions) == 2
    assert_rel(out, _expected(conv, bn, x))


def test_each_signature_has_its_own_step(decisions):
    conv, bn = _layer()
    cache = FoldCache()
    calls = []
    for shape in [(1, 8, 7, 7), (2, 8, 7, 7), (1, 8, 9, 5)]:
        x = channels_last(torch.randn(shape))
        for residual in (None, channels_last(torch.randn(shape))):
            for relu in (True, False):
                calls.append((x, residual, relu))
    with torch.no_grad():
        for _ in range(2):
            for x, residual, relu in calls:
                out = conv_norm_act(conv, bn, x, residual, relu, None, cache)
                assert_rel(out, _expected(conv, bn, x, residual, relu))
    # More signatures than the cache keeps (the most recent MAX_STEPS): each decided again.
    assert len(calls) > FoldCache.MAX_STEPS and len(decisions) == 2 * len(calls)
    assert len(cache._entry[3]["steps"]) == FoldCache.MAX_STEPS


def test_written_into_the_residual_only_where_asked(decisions):
    conv, bn = _layer(kernel=1)
    cache = FoldCache()
    x = channels_last(torch.randn(1, 8, 5, 5))
    with torch.no_grad():
        for overwrite in (False, True, False, True):
            residual = channels_last(torch.randn(1, 8, 5, 5))
            kept = residual.clone()
            out = conv_norm_act(conv, bn, x, residual, True, None, cache, overwrite_residual=overwrite)
            assert_rel(out, _expected(conv, bn, x, kept))
            assert (out.data_ptr() == residual.data_ptr()) == overwrite
            if not overwrite:
                assert torch.equal(residual, kept)
    assert len(decisions) == 2


@pytest.mark.parametrize("winograd", [True, False])
def test_a_kept_step_still_refuses_a_residual_that_shares_memory_with_x(monkeypatch, winograd):
    monkeypatch.setattr(ops, "WINOGRAD_MIN_TILES_PER_THREAD", 0 if winograd else 10**9)
    conv, bn = _layer()
    cache = FoldCache()
    x = channels_last(torch.randn(1, 8, 8, 8))
    with torch.no_grad():
        conv_norm_act(conv, bn, x, x.clone(), True, None, cache, overwrite_residual=True)  # kept
        with pytest.raises(ValueError, match="shares memory with x"):
            conv_norm_act(conv, bn, x, x, True, None, cache, overwrite_residual=True)


def test_the_winograd_setting_and_thread_count_are_read_on_every_call(decisions, monkeypatch):
    monkeypatch.setattr(ops, "WINOGRAD_MIN_TILES_PER_THREAD", 4)
    conv, bn = _layer()
    cache = FoldCache()
    x = channels_last(torch.randn(1, 8, 16, 16))  # 16 tiles: Winograd for up to 4 threads
    seen = []
    monkeypatch.setattr(cpu_inference.CpuStep, "run_trusted",
                        lambda self, *a, real=cpu_inference.CpuStep.run_trusted: seen.append(self.tail) or real(self, *a))
    threads = torch.get_num_threads()
    try:
        with torch.no_grad():
            for setting, thread_count in (("1", 1), ("0", 1), ("1", 1), ("1", 8)):
                monkeypatch.setenv("RESNET_FAST_CPU_WINOGRAD", setting)
                torch.set_num_threads(thread_count)
                for _ in range(2):
                    out = conv_norm_act(conv, bn, x, None, True, None, cache)
                    assert_rel(out, _expected(conv, bn, x))
    finally:
        torch.set_num_threads(threads)
    assert len(decisions) == 3  # ("1", 1) comes back to its kept step
    # Winograd's trailing arguments are (relu,), the direct convolution's the geometry and relu.
    assert [len(tail) == 1 for tail in seen] == [True, False, True, True, False]


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_a_model_follows_its_weights_and_its_mode_between_calls(arch):
    torch.manual_seed(0)
    tv = randomize_batchnorm_(getattr(torchvision.models, arch)(num_classes=10)).eval()
    ours = resnet_fast.from_torchvision(tv).eval()
    x = channels_last(torch.randn(2, 3, 40, 36))
    with torch.no_grad():
        assert_rel(ours(x), tv(x))
        assert_rel(ours(x), tv(x))  # kept steps
        for model in (tv, ours):
            model.layer2[0].conv1.weight.mul_(0.5)
            model.layer3[-1].bn2.running_var.mul_(3.0)
        assert_rel(ours(x), tv(x))
        ours.load_state_dict(randomize_batchnorm_(getattr(torchvision.models, arch)(num_classes=10)).state_dict())
        tv.load_state_dict(ours.state_dict())
        assert_rel(ours(x), tv(x))
        ours.layer1[0].bn1.train()  # batch statistics for one layer
        tv.layer1[0].bn1.train()
        assert_rel(ours(x), tv(x))
        ours.eval()
        tv.eval()
        smaller = channels_last(torch.randn(1, 3, 33, 29))
        assert_rel(ours(smaller), tv(smaller))
        assert_rel(ours(x), tv(x))


def test_kept_steps_make_no_difference_to_the_reference_backend(decisions):
    conv, bn = _layer()
    cache = FoldCache()
    x = channels_last(torch.randn(1, 8, 6, 6))
    with torch.no_grad():
        for _ in range(2):
            out = conv_norm_act(conv, bn, x, None, True, "reference", cache)
    assert not decisions
    w, b = reference.fold_bn(conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
    assert_rel(out, reference.conv_bias_act(x, w, b, None, 1, 1, 1, 1, True))
