"""The CPU inference path's two savings, each against what it may not change:
conv_bias_act_ (the result written into the residual's memory) against the
reference, and the network that scans its input once for NaN/Inf instead of
every layer scanning its own, against torchvision wherever a NaN or Inf
starts (input or any weight)."""
import pytest
import torch
import torchvision
from torch import nn

import resnet_fast
from resnet_fast import ops, reference
from resnet_fast.testing import randomize_batchnorm_

from conftest import assert_rel, channels_last, kernel_backends
from test_ops import CONV_CASES, conv_out_shape, make_conv

BACKENDS = kernel_backends()
needs_native = pytest.mark.skipif("native" not in BACKENDS, reason="the native extension is not built")


def _pairs(args):
    return {k: (v, v) if k != "groups" else v for k, v in args.items()}


def _poison_middle(t: torch.Tensor, value: float) -> None:
    """value at the middle of every dimension: for a conv weight the kernel's
    centre tap, which never meets padding (where a NaN weight times a padded
    zero is NaN to some convolution algorithms and skipped by others)."""
    t[tuple(size // 2 for size in t.shape)] = value


# ------------------------------------------------------------ conv_bias_act_

@pytest.mark.parametrize("case", sorted(CONV_CASES))
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("prepacked", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_bias_act_into_residual_matches_reference(case, relu, prepacked, backend):
    x, weight, bias, args = make_conv(case, torch.float32)
    residual = channels_last(torch.randn(conv_out_shape(x, weight, args)))
    expected = reference.conv_bias_act(x, weight, bias, residual, relu=relu, **_pairs(args))
    if prepacked:
        if backend != "native":
            pytest.skip("a prepacked weight is the native CPU backend's")
        weight = ops.prepack_conv_weight(weight, input_size=x.shape, **args)
        assert weight is not None and weight.is_mkldnn
    address = residual.data_ptr()
    with torch.inference_mode():
        out = ops.conv_bias_act_(residual, x, weight, bias, relu=relu, backend=backend, **args)
    assert out is residual and residual.data_ptr() == address
    assert_rel(out, expected, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_conv_bias_act_into_residual_other_dtypes(dtype):
    x, weight, bias, args = make_conv("3x3s2_odd", dtype, layout="sliced")
    residual = channels_last(torch.randn(conv_out_shape(x, weight, args), dtype=dtype))
    expected = reference.conv_bias_act(x, weight, bias, residual, relu=True, **_pairs(args))
    with torch.no_grad():
        out = ops.conv_bias_act_(residual, x, weight, bias, **args)
    assert out is residual
    assert_rel(out, expected, dtype)


@pytest.mark.parametrize("where", ["x", "weight", "bias", "residual"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_conv_bias_act_into_residual_keeps_nan(where, value):
    x, weight, bias, args = make_conv("3x3s1_batch1", torch.float32)
    inputs = dict(x=x, weight=weight, bias=bias, residual=channels_last(torch.randn(conv_out_shape(x, weight, args))))
    inputs[where] = inputs[where].clone()
    _poison_middle(inputs[where], value)
    expected = reference.conv_bias_act(**inputs, relu=True, **_pairs(args))
    with torch.no_grad():
        out = ops.conv_bias_act_(inputs.pop("residual"), **inputs, **args)
    assert not expected.isfinite().all()
    torch.testing.assert_close(out, expected, equal_nan=True)


# --------------------------------------------------- the network's NaN scan

def _pair_of_models(arch):
    torch.manual_seed(0)
    tv = randomize_batchnorm_(getattr(torchvision.models, arch)(num_classes=10)).eval()
    return tv, resnet_fast.from_torchvision(tv).eval()


def _same_non_finite(out, expected, dtype=torch.float32):
    assert torch.equal(out.isnan(), expected.isnan()), "NaN where torchvision has none, or none where it has"
    assert torch.equal(out.isposinf(), expected.isposinf()) and torch.equal(out.isneginf(), expected.isneginf())
    finite = expected.isfinite()
    if finite.any():
        assert_rel(out[finite], expected[finite], dtype)


def non_finite_input_or_weight_matches_torchvision(pair, value, dtype=torch.float32):
    """A NaN or Inf in the input, then in one of three weights of a resnet18
    (a 3x3 conv, a 1x1-stage conv, a BN scale): out as torchvision gives it.
    pair() makes a fresh (torchvision, resnet_fast) pair in dtype."""
    tv, ours = pair()
    x = torch.randn(2, 3, 32, 32, dtype=dtype)
    x[1, 0, 9, 20] = value
    with torch.inference_mode():
        _same_non_finite(ours(channels_last(x)), tv(channels_last(x)), dtype)
    x = channels_last(torch.randn(2, 3, 32, 32, dtype=dtype))
    for layer in ("layer1.0.conv2", "layer2.1.conv1", "layer3.1.bn2"):
        tv, ours = pair()
        with torch.no_grad():
            for model in (tv, ours):
                _poison_middle(model.get_submodule(layer).weight, value)
            with torch.inference_mode():
                expected, out = tv(x), ours(x)
        assert not expected.isfinite().all()
        _same_non_finite(out, expected, dtype)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_reaches_the_output_as_in_torchvision(arch, value):
    tv, ours = _pair_of_models(arch)
    x = torch.randn(3, 3, 40, 40)
    x[1, 2, 17, 5] = value  # one image poisoned, the others must stay exact
    with torch.inference_mode():
        _same_non_finite(ours(channels_last(x)), tv(x))


def _float_tensors(model: nn.Module):
    named = list(model.named_parameters()) + list(model.named_buffers())
    return [(name, t) for name, t in named if t.is_floating_point()]


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_value_in_any_weight_reaches_the_output_as_in_torchvision(value):
    """Every parameter and BatchNorm buffer of a resnet18 in turn (for Inf,
    every conv weight: an infinite BatchNorm scale folded into the conv is
    infinity times a weight, no longer torchvision's arithmetic): the layers
    after the poisoned one must look at their activations again."""
    tv, ours = _pair_of_models("resnet18")
    x = channels_last(torch.randn(2, 3, 32, 32))
    checked = 0
    for (name, t_tv), (_, t_ours) in zip(_float_tensors(tv), _float_tensors(ours)):
        if value == float("inf") and t_tv.dim() != 4:
            continue
        with torch.no_grad():
            kept = t_tv.clone()
            for t in (t_tv, t_ours):
                _poison_middle(t, value)
            with torch.inference_mode():
                expected, out = tv(x), ours(x)
            for t in (t_tv, t_ours):
                t.copy_(kept)
        if expected.isfinite().all():
            continue  # e.g. an infinite running_var: the channel is zero in both
        _same_non_finite(out, expected)
        checked += 1
    assert checked >= 20  # most tensors do poison the output


@needs_native
def test_forward_scans_its_input_once_not_every_layer():
    """Only the input (and the head's mean) is summed, not every activation."""
    _, ours = _pair_of_models("resnet50")
    x = channels_last(torch.randn(2, 3, 64, 64))
    with torch.inference_mode():
        ours(x)
        with torch.profiler.profile(record_shapes=True) as prof:
            ours(x)
    scanned = [e.input_shapes[0] for e in prof.events() if e.name == "aten::sum" and len(e.input_shapes[0]) == 4]
    assert len(scanned) <= 2, scanned


@needs_native
def test_a_hooked_layer_or_an_unknown_module_brings_the_per_layer_scan_back():
    """A hook that puts a NaN between layers: the next ReLU must keep it."""
    tv, ours = _pair_of_models("resnet18")
    x = channels_last(torch.randn(2, 3, 32, 32))

    def poison(module, inputs, output):
        output = output.clone()
        output[0, 0, 0, 0] = float("nan")
        return output

    for model in (tv, ours):
        model.layer2[0].register_forward_hook(poison)
    with torch.inference_mode():
        _same_non_finite(ours(x), tv(x))

    class Poison(nn.Module):
        def forward(self, x):
            x = x.clone()
            x[0, 0, 0, 0] = float("nan")
            return x

    tv, ours = _pair_of_models("resnet18")
    for model in (tv, ours):
        model.maxpool = nn.Sequential(nn.MaxPool2d(3, 2, 1), Poison())
    with torch.inference_mode():
        _same_non_finite(ours(x), tv(x))


# ------------------------------------------- outputs written into inputs

@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_feature_maps_survive_the_blocks_that_follow(arch):
    """Blocks write their output into their input when nothing else holds it:
    every feature map returned (any subset of stages), and the caller's
    input, must stay as torchvision computes them."""
    tv, ours = _pair_of_models(arch)
    x = channels_last(torch.randn(2, 3, 64, 64))
    kept = x.clone()
    with torch.inference_mode():
        stages = [tv.relu(tv.bn1(tv.conv1(x)))]
        y = tv.maxpool(stages[0])
        for i in range(1, 5):
            y = getattr(tv, f"layer{i}")(y)
            stages.append(y)
        for indices in ([0], [1], [0, 1], [2, 3], [1, 2, 3, 4], [0, 1, 2, 3, 4], [4]):
            final, features = ours.forward_intermediates(x, indices=indices)
            assert_rel(final, stages[4], torch.float32)
            for i, feature in zip(indices, features):
                assert_rel(feature, stages[i], torch.float32)
    assert torch.equal(x, kept)


def test_stem_output_kept_when_the_maxpool_is_gone():
    """A CIFAR-style resnet18 (maxpool replaced by Identity): layer1's first
    block has no downsample, so its shortcut is the stem's output itself,
    which forward_intermediates also returns."""
    tv, ours = _pair_of_models("resnet18")
    for model in (tv, ours):
        model.maxpool = nn.Identity()
    x = channels_last(torch.randn(2, 3, 32, 32))
    with torch.inference_mode():
        stem = tv.relu(tv.bn1(tv.conv1(x)))
        layer1 = tv.layer1(stem)
        _, (got_stem, got_layer1) = ours.forward_intermediates(x, indices=[0, 1])
    assert_rel(got_stem, stem, torch.float32)
    assert_rel(got_layer1, layer1, torch.float32)


def test_blocks_called_one_by_one_leave_their_inputs_alone():
    tv, ours = _pair_of_models("resnet50")
    x = channels_last(torch.randn(2, 256, 16, 16))
    kept = x.clone()
    with torch.inference_mode():
        out = ours.layer1[1](x)
        expected = tv.layer1[1](x)
    assert torch.equal(x, kept)
    assert_rel(out, expected, torch.float32)


def test_backward_hook_on_a_block_still_fires():
    """Blocks called directly must not bypass what nn.Module.__call__ sets
    up: a full backward hook sees the same gradient as torchvision's."""
    tv, ours = _pair_of_models("resnet18")
    seen = {}
    for name, model in (("torchvision", tv), ("resnet_fast", ours)):
        def hook(module, grad_in, grad_out, name=name):
            seen[name] = grad_out[0].clone()

        model.layer2[1].register_full_backward_hook(hook)
        torch.manual_seed(1)
        model(channels_last(torch.randn(2, 3, 32, 32))).square().sum().backward()
    assert set(seen) == {"torchvision", "resnet_fast"}
    assert_rel(seen["resnet_fast"], seen["torchvision"], torch.float32, factor=10)


def test_from_torchvision_keeps_channels_last_weights():
    """A weight in another layout than the activations costs a copy on every
    training step: converting a channels_last model keeps it channels_last."""
    tv = torchvision.models.resnet18().to(memory_format=torch.channels_last)
    ours = resnet_fast.from_torchvision(tv)
    for (name, mine), (_, theirs) in zip(ours.named_parameters(), tv.named_parameters()):
        if mine.dim() == 4:
            assert mine.is_contiguous(memory_format=torch.channels_last), name
    plain = resnet_fast.from_torchvision(torchvision.models.resnet18())
    assert plain.layer1[0].conv1.weight.is_contiguous()
