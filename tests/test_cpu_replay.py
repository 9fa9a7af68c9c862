"""The CPU inference forward replayed from a recording (resnet_fast.cpu_replay):
it must be taken where it applies, compute what the layer-by-layer forward
computes, and give way to it whenever something its record rests on has
changed (weights, modes, modules, hooks, backends, settings)."""
import copy

import pytest
import torch
import torchvision
from torch import nn

import resnet_fast
from resnet_fast import cpu_replay, ops
from resnet_fast.models import resnet as resnet_module
from resnet_fast.testing import randomize_batchnorm_

from conftest import assert_rel, channels_last, kernel_backends, run_in_threads

pytestmark = pytest.mark.skipif("native" not in kernel_backends(), reason="the native extension is not built")


def _pair(arch="resnet18", **kwargs):
    torch.manual_seed(0)
    tv = randomize_batchnorm_(getattr(torchvision.models, arch)(num_classes=10, **kwargs)).eval()
    return tv, resnet_fast.from_torchvision(tv).eval()


@pytest.fixture
def layer_calls(monkeypatch):
    """How many fused layers ran through conv_norm_act (not replayed)."""
    calls = []
    real = resnet_module.conv_norm_act
    monkeypatch.setattr(resnet_module, "conv_norm_act", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _replays(model) -> int:
    cache = model.__dict__.get("_cpu_replays")
    return 0 if cache is None else len(cache._programs)


def _warm(model, x):
    """Calls enough for a recording (the first call decides each layer's
    step, the second records them); returns the last output."""
    for _ in range(2):
        out = model(x)
    return out


def _replayable_dtype(dtype) -> bool:
    # Where oneDNN has no kernels for a half dtype, the layers compute in
    # float32 through conversions the recording does not follow.
    return ops.cpu_compute_dtype(dtype) == dtype


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnext50_32x4d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced"])
def test_a_replayed_forward_computes_what_the_layers_compute(arch, dtype, layout, layer_calls):
    tv, ours = _pair(arch)
    tv, ours = tv.to(dtype), ours.to(dtype)
    x = torch.randn(2, 3, 41, 37, dtype=dtype)
    if layout == "channels_last":
        x = channels_last(x)
    elif layout == "sliced":
        x = torch.randn(2, 3, 41, 74, dtype=dtype)[..., ::2]
    with torch.inference_mode():
        first = _warm(ours, x)
        del layer_calls[:]
        replayed = [ours(x) for _ in range(2)]
        expected = tv(x)
    for out in replayed:
        assert torch.equal(out, first)  # the same operators on the same operands as layer by layer
    if dtype == torch.float32:  # (half precision's parity with torchvision: tests/test_cpu_half.py)
        assert_rel(replayed[-1], expected, dtype)
    if _replayable_dtype(dtype):
        assert _replays(ours) == 1 and layer_calls == []
    else:
        assert layer_calls


def test_each_kind_of_input_and_feature_selection_is_recorded_on_its_own(layer_calls):
    tv, ours = _pair("resnet50")
    inputs = [channels_last(torch.randn(1, 3, 32, 32)), channels_last(torch.randn(3, 3, 48, 40))]
    with torch.no_grad():
        for x in inputs:
            stages = [tv.relu(tv.bn1(tv.conv1(x)))]
            y = tv.maxpool(stages[0])
            for i in range(1, 5):
                y = getattr(tv, f"layer{i}")(y)
                stages.append(y)
            for indices in ([1, 3], [0, 2, 4], [2]):
                for _ in range(4):
                    final, features = ours.forward_intermediates(x, indices=indices)
                assert_rel(final, stages[4], torch.float32)
                for i, feature in zip(indices, features):
                    assert_rel(feature, stages[i], torch.float32)
    assert _replays(ours) == cpu_replay.ReplayCache.MAX_PROGRAMS  # 6 kinds, the most recent kept


def test_a_features_only_backbone_replays():
    _, tv_feats = _pair("resnet18")
    ours = resnet_fast.resnet18(features_only=True, out_indices=(1, 2, 3, 4)).eval()
    ours.load_state_dict({k: v for k, v in tv_feats.state_dict().items() if not k.startswith("fc.")})
    x = channels_last(torch.randn(2, 3, 64, 64))
    with torch.inference_mode():
        first = _warm(ours, x)
        again = ours(x)
    assert _replays(ours) == 1
    for a, b in zip(first, again):
        assert torch.equal(a, b)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_input_after_recording_reaches_the_output_as_in_torchvision(value):
    tv, ours = _pair("resnet18")
    x = channels_last(torch.randn(2, 3, 32, 32))
    with torch.inference_mode():
        _warm(ours, x)
        poisoned = x.clone()
        poisoned[1, 0, 5, 9] = value
        out, expected = ours(poisoned), tv(poisoned)
    assert torch.equal(out.isnan(), expected.isnan()) and torch.equal(out.isinf(), expected.isinf())
    assert not expected[1].isfinite().all()
    assert_rel(out[0], expected[0], torch.float32)


# ------------------------------------------- what a recording gives way to

def _edit_weight_in_place(tv, ours):
    for model in (tv, ours):
        model.layer2[0].conv1.weight.mul_(0.5)


def _edit_running_var(tv, ours):
    for model in (tv, ours):
        model.layer3[1].bn2.running_var.mul_(3.0)


def _edit_through_data(tv, ours):
    for model in (tv, ours):
        model.layer1[1].conv2.weight.data = model.layer1[1].conv2.weight.data * 0.5
    resnet_fast.clear_fold_caches(ours)


def _replace_a_conv(tv, ours):
    conv = nn.Conv2d(64, 64, 3, padding=1, bias=False)
    tv.layer1[0].conv1 = conv
    ours.layer1[0].conv1 = copy.deepcopy(conv)


def _replace_a_block(tv, ours):
    torch.manual_seed(3)
    block = randomize_batchnorm_(torchvision.models.resnet.BasicBlock(128, 128)).eval()
    tv.layer2[1] = block
    ours.layer2[1] = resnet_module.BasicBlock(128, 128)
    ours.layer2[1].load_state_dict(block.state_dict())
    ours.layer2[1].eval()


def _batch_statistics_in_one_norm(tv, ours):
    for model in (tv, ours):
        model.layer1[0].bn1.train()


def _load_other_weights(tv, ours):
    other = randomize_batchnorm_(torchvision.models.resnet18(num_classes=10)).state_dict()
    tv.load_state_dict(other)
    ours.load_state_dict(other)


def _change_the_eps(tv, ours):
    for model in (tv, ours):
        model.layer4[0].bn2.eps = 0.5


def _give_a_conv_a_bias(tv, ours):
    bias = torch.randn(128)
    for model in (tv, ours):
        model.layer2[1].conv1.bias = nn.Parameter(bias.clone())  # was None


def _give_a_conv_a_plain_tensor_bias(tv, ours):
    bias = torch.randn(128)
    for model in (tv, ours):
        conv = model.layer2[1].conv1
        del conv.bias  # was a None parameter
        conv.bias = bias.clone()  # now an attribute


def _replace_a_parameter(tv, ours):
    for model in (tv, ours):
        norm = model.layer3[0].bn1
        norm.weight = nn.Parameter(norm.weight.detach() * -1.5)


@pytest.mark.parametrize("change", [
    _edit_weight_in_place, _edit_running_var, _edit_through_data, _replace_a_conv, _replace_a_block,
    _batch_statistics_in_one_norm, _load_other_weights, _change_the_eps, _give_a_conv_a_bias,
    _give_a_conv_a_plain_tensor_bias, _replace_a_parameter,
])
def test_a_recording_gives_way_to_a_changed_model(change):
    tv, ours = _pair("resnet18")
    x = channels_last(torch.randn(2, 3, 40, 36))
    with torch.no_grad():
        assert_rel(_warm(ours, x), tv(x))
        assert _replays(ours) == 1
        change(tv, ours)
        for _ in range(3):  # the changed model, then its own recording and replay
            assert_rel(ours(x), tv(x))


class FrozenBatchNorm2d(nn.Module):
    """A FrozenBatchNorm2d look-alike that keeps its tensors as plain
    attributes, neither parameters nor buffers."""

    def __init__(self, norm: nn.BatchNorm2d):
        super().__init__()
        self.weight, self.bias = norm.weight.detach().clone(), norm.bias.detach().clone()
        self.running_mean, self.running_var = norm.running_mean.clone(), norm.running_var.clone()
        self.eps = norm.eps

    def forward(self, x):
        return torch.nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                              False, 0.0, self.eps)


def test_a_norm_with_plain_tensor_attributes_is_watched_too():
    tv, ours = _pair("resnet18")
    for model in (tv, ours):
        model.layer2[0].bn2 = FrozenBatchNorm2d(tv.layer2[0].bn2)
    x = channels_last(torch.randn(2, 3, 40, 36))
    with torch.no_grad():
        assert_rel(_warm(ours, x), tv(x))
        assert _replays(ours) == 1
        for model in (tv, ours):
            model.layer2[0].bn2.running_var = model.layer2[0].bn2.running_var * 4.0  # a new tensor
        for _ in range(3):
            assert_rel(ours(x), tv(x))
        for model in (tv, ours):
            model.layer2[0].bn2.bias.add_(0.5)  # in place
        for _ in range(3):
            assert_rel(ours(x), tv(x))


def test_a_hook_added_after_recording_runs():
    tv, ours = _pair("resnet18")
    x = channels_last(torch.randn(2, 3, 32, 32))
    seen = []
    with torch.no_grad():
        _warm(ours, x)
        ours.layer3[0].conv2.register_forward_hook(lambda m, i, o: seen.append(o.shape))
        ours(x)
    assert seen == [torch.Size([2, 256, 2, 2])]


def test_a_backend_set_after_recording_is_followed(layer_calls):
    tv, ours = _pair("resnet18")
    x = channels_last(torch.randn(2, 3, 32, 32))
    with torch.no_grad():
        _warm(ours, x)
        del layer_calls[:]
        ours.layer2[0].backend = "reference"  # one block
        assert_rel(ours(x), tv(x))
        assert len(layer_calls) > 0
        del layer_calls[:]
        ours.backend = None
        for _ in range(3):
            assert_rel(ours(x), tv(x))
    # The layers' steps were kept: one call layer by layer records them, the others replay.
    assert _replays(ours) == 1 and len(layer_calls) == 20


def test_the_thread_count_is_part_of_the_kind_of_input():
    tv, ours = _pair("resnet18")
    x = channels_last(torch.randn(1, 3, 64, 64))
    threads = torch.get_num_threads()
    try:
        with torch.no_grad():
            for count in (1, 2):
                torch.set_num_threads(count)
                for _ in range(3):
                    assert_rel(ours(x), tv(x))
    finally:
        torch.set_num_threads(threads)
    assert _replays(ours) == 2


@pytest.mark.parametrize("setting", ["RESNET_FAST_CPU_WINOGRAD", "RESNET_FAST_CPU_HALF_IN_FLOAT32"])
def test_the_settings_the_layers_read_are_part_of_the_kind_of_input(setting, monkeypatch, layer_calls):
    tv, ours = _pair("resnet18")
    x = channels_last(torch.randn(1, 3, 64, 64))
    with torch.no_grad():
        for value in ("0", "1"):
            monkeypatch.setenv(setting, value)
            for _ in range(3):
                assert_rel(ours(x), tv(x))
            del layer_calls[:]
            ours(x)
            assert layer_calls == []  # replayed
    assert _replays(ours) == 2


def test_a_block_subclass_is_not_recorded():
    """A subclass may compute more than its layers (here, in place on the
    block's output), which a recording of the layers would miss."""

    class Halving(resnet_module.BasicBlock):
        def _forward_fused(self, x, x_disposable=False):
            return super()._forward_fused(x, x_disposable).mul_(0.5)

    tv, ours = _pair("resnet18")
    ours.layer2[1].__class__ = Halving
    x = channels_last(torch.randn(2, 3, 32, 32))
    with torch.no_grad():
        outs = [ours(x) for _ in range(3)]
    assert _replays(ours) == 0
    assert torch.equal(outs[0], outs[2])


def test_nothing_is_recorded_with_gradients_or_autocast():
    tv, ours = _pair("resnet18")
    x = channels_last(torch.randn(2, 3, 32, 32))
    for _ in range(3):
        ours(x)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(3):
            ours(x)
    assert _replays(ours) == 0


def test_copies_start_without_recordings_and_follow_their_own_weights():
    tv, ours = _pair("resnet18")
    x = channels_last(torch.randn(2, 3, 32, 32))
    with torch.no_grad():
        _warm(ours, x)
        copied = copy.deepcopy(ours)
        assert _replays(copied) == 0
        for model in (tv, copied):
            model.layer1[0].conv1.weight.mul_(2.0)
        for _ in range(3):
            assert_rel(copied(x), tv(x))


def test_a_program_lets_go_of_every_intermediate_result():
    """Each slot but the outputs is dropped after its last use, as the
    layer-by-layer forward lets its activations go."""
    _, ours = _pair("resnet50")
    x = channels_last(torch.randn(1, 3, 32, 32))
    with torch.no_grad():
        _warm(ours, x)
    (program,) = ours.__dict__["_cpu_replays"]._programs.values()
    dropped = [s for *_, drop in program.calls for s in drop]
    assert len(dropped) == len(set(dropped))
    assert set(dropped) | set(program.outputs) == set(range(program.size))


def test_threads_replaying_one_model_each_get_their_own_results():
    tv, ours = _pair("resnet18")
    inputs = [channels_last(torch.randn(batch, 3, 32, 32)) for batch in (1, 2, 3)]
    with torch.no_grad():
        expected = [tv(x) for x in inputs]

    def run(i):
        with torch.inference_mode():
            for _ in range(6):
                torch.testing.assert_close(ours(inputs[i]), expected[i], rtol=1e-4, atol=1e-4)

    assert run_in_threads(run, 3) == []
