"""The models against torchvision: structure, weights, eval and train."""
import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision

import resnet_fast

from conftest import assert_rel, kernel_backends
from models_util import pair
from resnet_fast.testing import randomize_batchnorm_

ALL_BUILDERS = [
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
    "wide_resnet50_2", "wide_resnet101_2",
]
BACKENDS = ["reference"] + kernel_backends()


@pytest.mark.parametrize("arch", ALL_BUILDERS)
def test_same_state_dict_keys_and_shapes_both_ways(arch):
    tv = getattr(torchvision.models, arch)(num_classes=17)
    ours = getattr(resnet_fast, arch)(num_classes=17)
    tv_sd, our_sd = tv.state_dict(), ours.state_dict()
    assert list(tv_sd) == list(our_sd)
    assert all(tv_sd[k].shape == our_sd[k].shape for k in tv_sd)
    assert [n for n, _ in tv.named_modules()] == [n for n, _ in ours.named_modules()]
    ours.load_state_dict(tv_sd, strict=True)
    tv.load_state_dict(ours.state_dict(), strict=True)


@pytest.mark.parametrize("arch", ALL_BUILDERS)
def test_every_builder_matches_torchvision_in_eval(arch):
    tv, ours = pair(arch, num_classes=10)
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        assert_rel(ours.eval()(x), tv.eval()(x))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnext50_32x4d"])
@pytest.mark.parametrize("batch,height,width", [(1, 64, 64), (3, 97, 131)])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_eval_matches_torchvision(backend, arch, batch, height, width, memory_format):
    tv, ours = pair(arch, backend=backend)
    x = torch.randn(batch, 3, height, width).contiguous(memory_format=memory_format)
    with torch.no_grad():
        expected = tv.eval()(x)
        assert_rel(ours.eval()(x), expected)
        assert_rel(ours(x), expected)  # second call: served from the fold cache


def test_dilated_variant_matches_torchvision():
    tv, ours = pair("resnet50", replace_stride_with_dilation=[False, True, True])
    x = torch.randn(2, 3, 65, 49)
    with torch.no_grad():
        assert_rel(ours.eval()(x), tv.eval()(x))


def _train_steps(model, batches, lr=0.01):
    """SGD on (images, labels) batches; returns the outputs of the first
    step, the losses, and the gradients of the last step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    losses, first_outputs = [], None
    for images, labels in batches:
        optimizer.zero_grad()
        outputs = model(images.to(next(model.parameters()).dtype))
        first_outputs = outputs.detach().double() if first_outputs is None else first_outputs
        loss = F.cross_entropy(outputs, labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach().double())
    return first_outputs, losses, {n: p.grad.detach().double() for n, p in model.named_parameters()}


def _fp32_as_accurate_as_torchvision(ours, tv, truth, what, floor):
    """ours (fp32) is as close to truth (fp64) as torchvision's fp32 is,
    within a factor of 4, or within `floor` relative to the truth's norm."""
    err_ours = (ours.double() - truth).norm().item()
    err_tv = (tv.double() - truth).norm().item()
    assert err_ours <= 4 * err_tv + floor * truth.norm().item(), (
        f"{what}: error vs float64 {err_ours:.3g}, torchvision fp32's {err_tv:.3g}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnext50_32x4d"])
def test_train_steps_match_torchvision(backend, arch):
    """Outputs, losses, gradients, weights and running statistics over three
    SGD steps, measured, as torchvision's own fp32 is, against torchvision in
    float64.

    Each step starts both fp32 models from the float64 model's state: fp32
    training trajectories drift apart chaotically (the losses of two fp32 runs
    differ by percents after two steps), which would measure the chaos, not
    the kernels. Within one step, too, deep networks at these sizes are
    ill-conditioned: a pre-activation within rounding of zero sends a ReLU's
    gradient one way or the other, and torchvision's own fp32 gradient is 1-3%
    off the float64 one as a whole, single BatchNorm gradients by up to ~5%.
    So each parameter's gradient is held to 4x torchvision's error or 10%
    (a wrong formula is off by order one); the whole gradient and the state
    after the step to 4x or 1%; outputs and losses to 4x or 1e-4."""
    tv, ours = pair(arch, backend=backend, num_classes=10)
    truth = copy.deepcopy(tv).double()
    batches = [(torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,))) for _ in range(3)]
    for step, batch in enumerate(batches):
        start = truth.state_dict()
        tv.load_state_dict(start)
        ours.load_state_dict(start)
        runs = {name: _train_steps(model.train(), [batch]) for name, model in (("tv", tv), ("ours", ours),
                                                                                 ("truth", truth))}
        (out_o, (loss_o,), grads_o), (out_t, (loss_t,), grads_t), (out_64, (loss_64,), grads_64) = (
            runs["ours"], runs["tv"], runs["truth"])
        _fp32_as_accurate_as_torchvision(out_o, out_t, out_64, f"step {step}: outputs in train mode", 1e-4)
        _fp32_as_accurate_as_torchvision(loss_o, loss_t, loss_64, f"step {step}: loss", 1e-4)
        flat = [torch.cat([g[name].flatten() for name in grads_64]) for g in (grads_o, grads_t, grads_64)]
        _fp32_as_accurate_as_torchvision(*flat, f"step {step}: the whole gradient", 1e-2)
        for name, g64 in grads_64.items():
            _fp32_as_accurate_as_torchvision(grads_o[name], grads_t[name], g64, f"step {step}: grad of {name}", 1e-1)
        tv_state, our_state, true_state = tv.state_dict(), ours.state_dict(), truth.state_dict()
        for name, value in true_state.items():
            if name.endswith("num_batches_tracked"):
                assert our_state[name] == value == step + 1
            else:
                _fp32_as_accurate_as_torchvision(our_state[name], tv_state[name], value.double(),
                                                 f"step {step}: {name}", 1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_bn_training_matches_torchvision(backend):
    """FrozenBatchNorm2d (the detection default) runs the folded, differentiable path."""
    from torchvision.ops import FrozenBatchNorm2d

    tv = torchvision.models.resnet18(num_classes=5, norm_layer=FrozenBatchNorm2d)
    with torch.no_grad():
        for m in tv.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.2), m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    ours = resnet_fast.from_torchvision(tv, backend=backend)
    x, labels = torch.randn(2, 3, 48, 48), torch.tensor([1, 3])
    F.cross_entropy(tv(x), labels).backward()
    F.cross_entropy(ours(x), labels).backward()
    for (name, p_tv), p_ours in zip(tv.named_parameters(), ours.parameters()):
        assert_rel(p_ours.grad, p_tv.grad, factor=20), name


# ------------------------------------------------------------ fold cache

def _assert_eval_matches_torchvision(ours, x, factor=1.0):
    tv = torchvision.models.resnet18(num_classes=ours.fc.out_features).to(next(ours.parameters()).dtype)
    tv.load_state_dict(ours.state_dict())
    with torch.no_grad():
        expected = tv.eval()(x)
        assert_rel(ours.eval()(x), expected, factor=factor)


def test_fold_cache_follows_every_weight_change():
    _, ours = pair("resnet18", num_classes=10)
    x = torch.randn(2, 3, 48, 48)
    _assert_eval_matches_torchvision(ours, x)  # fills the cache

    ours.train()
    _train_steps(ours, [(torch.randn(4, 3, 48, 48), torch.randint(0, 10, (4,)))])  # optimizer step
    _assert_eval_matches_torchvision(ours, x)

    other = torchvision.models.resnet18(num_classes=10)
    randomize_batchnorm_(other)
    ours.load_state_dict(other.state_dict())
    _assert_eval_matches_torchvision(ours, x)

    with torch.no_grad():
        ours.layer2[0].bn1.running_var.mul_(3.0)  # in-place buffer edit
        ours.layer3[1].conv2.weight.add_(0.01)  # in-place weight edit
    _assert_eval_matches_torchvision(ours, x)

    ours.to(torch.bfloat16)
    _assert_eval_matches_torchvision(ours, x.bfloat16(), factor=1e3)  # bf16 tolerance


def test_edits_through_data_need_clear_fold_caches():
    """.data bypasses PyTorch's version counter: clear_fold_caches() is the
    documented way to make such edits visible."""
    _, ours = pair("resnet18", num_classes=10)
    x = torch.randn(2, 3, 48, 48)
    _assert_eval_matches_torchvision(ours, x)
    ours.layer1[0].bn1.running_var.data.mul_(4.0)
    ours.layer2[1].conv1.weight.data.mul_(-1.0)
    resnet_fast.clear_fold_caches(ours)
    _assert_eval_matches_torchvision(ours, x)


def test_fold_cache_is_not_in_state_dict_and_survives_copies():
    _, ours = pair("resnet18")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = ours.eval()(x)
        clone = copy.deepcopy(ours)
        assert_rel(clone(x), expected)
    assert list(ours.state_dict()) == list(torchvision.models.resnet18().state_dict())


# ------------------------------------------------------------- bad input

@pytest.mark.parametrize(
    "make_input,error,message",
    [
        (lambda: torch.randn(1, 4, 32, 32), ValueError, "expected input with 3 channels, got 4"),
        (lambda: torch.randn(3, 32, 32), ValueError, "4-D input"),
        (lambda: torch.randn(1, 1, 3, 32, 32), ValueError, "4-D input"),
        (lambda: torch.randint(0, 255, (1, 3, 32, 32), dtype=torch.uint8), TypeError, "floating-point"),
        (lambda: torch.randn(1, 3, 32, 32, device="meta"), ValueError, "input is on meta but the model is on cpu"),
        (lambda: torch.randn(1, 3, 32, 32, dtype=torch.float16), TypeError, "does not match the model"),
        (lambda: [[1.0]], TypeError, "expected a Tensor"),
    ],
    ids=["channels", "3-D", "5-D", "uint8", "device", "dtype", "not-a-tensor"],
)
def test_model_rejects_bad_input(make_input, error, message):
    model = resnet_fast.resnet18().eval()
    with pytest.raises(error, match=message):
        model(make_input())


def test_bad_backend_names_are_rejected(monkeypatch):
    from resnet_fast import backends

    with pytest.raises(ValueError, match="unknown backend"):
        resnet_fast.resnet18(backend="cudnn")
    monkeypatch.setattr(backends, "_TRITON_AVAILABLE", False)
    monkeypatch.setattr(backends, "_TRITON_DETAIL", "no triton here")
    model = resnet_fast.resnet18(backend="triton")
    with pytest.raises(RuntimeError, match="backend 'triton' is not available on cpu: no triton here"):
        model.eval()(torch.randn(1, 3, 32, 32))


# ------------------------------------------------------------ integration

@pytest.mark.parametrize("mode", ["eval", "train"])
def test_torch_compile_fullgraph(mode):
    """The whole forward (and backward) traces into one graph: the fused ops
    are registered ops with fake kernels, and the fold cache steps aside."""
    tv, ours = pair("resnet18", num_classes=10)
    getattr(tv, mode)(), getattr(ours, mode)()
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 48, 48)
    out = compiled(x)
    with torch.no_grad():
        expected = tv(x)
    assert_rel(out.detach(), expected, factor=10)
    if mode == "train":
        out.sum().backward()
        assert ours.conv1.weight.grad is not None
        for name in ("bn1", "layer1.0.bn2", "layer4.1.bn2"):  # the running statistics, updated in the graph
            ours_bn, tv_bn = ours.get_submodule(name), tv.get_submodule(name)
            assert_rel(ours_bn.running_var, tv_bn.running_var)
            assert_rel(ours_bn.running_mean, tv_bn.running_mean, factor=10)
            assert int(ours_bn.num_batches_tracked) == int(tv_bn.num_batches_tracked) == 1


def test_intermediate_layer_getter_gives_torchvision_features():
    tv, ours = pair("resnet50")
    wanted = {"layer2": "c3", "layer4": "c5"}
    ours_body = torchvision.models._utils.IntermediateLayerGetter(ours.eval(), wanted)
    tv_body = torchvision.models._utils.IntermediateLayerGetter(tv.eval(), wanted)
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        ours_features, tv_features = ours_body(x), tv_body(x)
    for name in wanted.values():
        assert_rel(ours_features[name], tv_features[name])


def test_varying_input_shapes_stay_correct_and_bounded():
    """Weights prepacked per input shape: alternating shapes give the right
    answers, and each layer keeps at most MAX_PACKED_SHAPES of them."""
    from resnet_fast.folding import FoldCache

    tv, ours = pair("resnet18")
    tv.eval(), ours.eval()
    shapes = [(1, 40, 40), (2, 48, 40), (1, 40, 40), (1, 33, 57), (3, 40, 40), (1, 64, 64), (2, 32, 32), (1, 40, 40)]
    with torch.no_grad():
        for n, h, w in shapes:
            x = torch.randn(n, 3, h, w)
            assert_rel(ours(x), tv(x))
    caches = [c for m in ours.modules() for c in m.__dict__.get("_fold_caches", {}).values()]
    assert caches and all(len(c._packed) <= FoldCache.MAX_PACKED_SHAPES for c in caches)
    if "native" in kernel_backends() and torch.backends.mkldnn.is_available():
        assert all(len(c._packed) == FoldCache.MAX_PACKED_SHAPES for c in caches)


def test_other_norm_layers_run_unfused_and_match():
    """A norm layer the fused ops do not cover (GroupNorm) runs as it is."""
    norm = lambda channels: torch.nn.GroupNorm(4, channels)  # noqa: E731
    tv = torchvision.models.resnet18(num_classes=5, norm_layer=norm)
    ours = resnet_fast.resnet18(num_classes=5, norm_layer=norm)
    ours.load_state_dict(tv.state_dict())
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        assert_rel(ours.eval()(x), tv.eval()(x))
    ours.conv1.padding_mode = "reflect"  # not fusable: runs the module
    tv.conv1.padding_mode = "reflect"
    with torch.no_grad():
        assert_rel(ours(x), tv(x))
