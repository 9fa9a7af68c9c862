"""optimize() and to_torchvision() on torchvision and timm models, and timm
weights in our ResNet."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision

import resnet_fast
from resnet_fast.models.resnet import BasicBlock, Bottleneck, ResNet

from conftest import assert_rel
from resnet_fast.testing import randomize_batchnorm_

timm = pytest.importorskip("timm")


def _state_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_optimize_swaps_a_torchvision_resnet_in_place_and_back():
    model = randomize_batchnorm_(torchvision.models.resnet18(num_classes=5))
    model.layer2.train(False)  # mixed modes must survive
    untouched = copy.deepcopy(model)
    params = list(model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, labels = torch.randn(2, 3, 48, 48), torch.tensor([1, 4])

    assert resnet_fast.optimize(model) is model
    assert type(model) is ResNet and type(model.layer1[0]) is BasicBlock
    assert all(p is q for p, q in zip(params, model.parameters()))  # same objects: the optimizer still holds them
    assert [m.training for m in model.modules()] == [m.training for m in untouched.modules()]
    assert _state_equal(model, untouched)

    # training step (layer2 in eval) and eval, against the unconverted copy
    reference_optimizer = torch.optim.SGD(untouched.parameters(), lr=0.1)
    for net, opt in ((model, optimizer), (untouched, reference_optimizer)):
        opt.zero_grad()
        F.cross_entropy(net(x), labels).backward()
        opt.step()
    for (name, p), q in zip(untouched.named_parameters(), model.parameters()):
        assert_rel(q.detach(), p.detach(), factor=10), name
    with torch.no_grad():
        expected = untouched.eval()(x)
        assert_rel(model.eval()(x), expected)

    assert resnet_fast.optimize(model) is model  # idempotent
    assert type(model) is ResNet

    back = resnet_fast.to_torchvision(model)
    assert back is model and type(model) is torchvision.models.ResNet
    assert type(model.layer1[0]) is torchvision.models.resnet.BasicBlock
    assert set(vars(model)) == set(vars(untouched))  # no resnet_fast attributes left
    with torch.no_grad():
        assert_rel(model(x), expected)


def test_to_torchvision_of_a_resnet_fast_model():
    ours = randomize_batchnorm_(resnet_fast.resnext50_32x4d(num_classes=3)).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = ours(x)
        tv = resnet_fast.to_torchvision(ours)
        assert type(tv) is torchvision.models.ResNet and type(tv.layer3[2]) is torchvision.models.resnet.Bottleneck
        assert tv.groups == 32 and tv.layer3[2].conv2.groups == 32
        assert_rel(tv(x), expected)


def test_optimize_keeps_dtype_and_device():
    model = randomize_batchnorm_(torchvision.models.resnet18(num_classes=3)).to(torch.bfloat16).eval()
    x = torch.randn(2, 3, 40, 40, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = model(x)
        resnet_fast.optimize(model, backend="reference")
        assert model.backend == "reference" and model.layer1[0].backend == "reference"
        assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in model.parameters())
        # Two whole bf16 networks that round differently (folded weights are
        # rounded once to bf16, torchvision rounds after the conv and again
        # after BatchNorm): 3e-2, as the drop-in tests hold whole bf16 models.
        assert_rel(model(x), expected, dtype=torch.bfloat16, factor=3)


def test_optimize_timm_resnet_keeps_timm_api_and_reverts():
    model = randomize_batchnorm_(timm.create_model("resnet18", num_classes=4)).eval()
    untouched = copy.deepcopy(model)
    x = torch.randn(2, 3, 48, 48)
    resnet_fast.optimize(model)
    assert type(model) is type(untouched) and type(model.layer3[1]) is BasicBlock
    assert _state_equal(model, untouched)
    with torch.no_grad():
        assert_rel(model(x), untouched(x))
        assert_rel(model.forward_features(x), untouched.forward_features(x))
    resnet_fast.to_torchvision(model)
    assert type(model.layer3[1]) is type(untouched.layer3[1])  # timm's block again
    with torch.no_grad():
        assert_rel(model(x), untouched(x))


def test_optimize_timm_features_only_resnet50():
    model = randomize_batchnorm_(timm.create_model("resnet50", features_only=True, out_indices=(1, 2, 3, 4))).eval()
    untouched = copy.deepcopy(model)
    resnet_fast.optimize(model)
    assert type(model.layer4[0]) is Bottleneck
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for got, expected in zip(model(x), untouched(x)):
            assert_rel(got, expected)


def test_timm_weights_load_into_our_resnet():
    theirs = randomize_batchnorm_(timm.create_model("resnet18", num_classes=7)).eval()
    ours = resnet_fast.resnet18(num_classes=7, weights=theirs.state_dict()).eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert_rel(ours(x), theirs(x))


def test_a_model_without_resnet_is_refused_unchanged():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
    before = copy.deepcopy(model)
    with pytest.raises(ValueError, match="found no torchvision or timm ResNet.*in Sequential; nothing was changed"):
        resnet_fast.optimize(model)
    assert [type(m) for m in model.modules()] == [type(m) for m in before.modules()] and _state_equal(model, before)
    with pytest.raises(ValueError, match="found no resnet_fast ResNet or block in Sequential"):
        resnet_fast.to_torchvision(model)
    with pytest.raises(TypeError, match="module must be an nn.Module"):
        resnet_fast.optimize("resnet50")
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        resnet_fast.optimize(torchvision.models.resnet18(), backend="cuda")


@pytest.mark.parametrize(
    "make,part",
    [
        (lambda: timm.create_model("seresnet18"), r"attention module layer1\.0\.se \(SEModule\)"),
        (lambda: timm.create_model("resnet18d"), r"deep stem \(conv1 is Sequential"),
        (lambda: timm.create_model("resnet18", drop_path_rate=0.1), r"drop_path \(stochastic depth\) layer1\.1\.drop_path"),
        (lambda: timm.create_model("resnet18", aa_layer=torch.nn.AvgPool2d), r"anti-aliasing layer2\.0\.aa"),
        (lambda: timm.create_model("resnet18", act_layer=torch.nn.SiLU), r"activation act1 \(SiLU"),
    ],
    ids=["se", "deep-stem", "drop-path", "anti-aliasing", "activation"],
)
def test_unsupported_timm_variants_are_left_unchanged_with_a_warning(make, part):
    model = make()
    classes = [type(m) for m in model.modules()]
    with pytest.warns(UserWarning, match="left timm ResNet at <root> unchanged: unsupported .*" + part):
        assert resnet_fast.optimize(model) is model
    assert [type(m) for m in model.modules()] == classes


def test_unsupported_part_inside_a_larger_model_is_named_by_path():
    tv = torchvision.models.resnet18()
    tv.layer3[1].relu = torch.nn.GELU()
    model = torch.nn.Sequential(torch.nn.Identity(), tv)
    with pytest.warns(UserWarning, match=r"torchvision ResNet at 1 unchanged: unsupported activation layer3\.1\.relu \(GELU"):
        resnet_fast.optimize(model)
    assert type(model[1]) is torchvision.models.ResNet


def test_supported_models_convert_without_warnings():
    model = torch.nn.ModuleDict({"a": torchvision.models.resnet18(), "b": timm.create_model("resnet18")})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resnet_fast.optimize(model)
    assert type(model["a"]) is ResNet and type(model["b"].layer1[0]) is BasicBlock
