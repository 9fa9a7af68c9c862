"""Feature extraction: features_only / out_indices, feature_info,
forward_intermediates, forward_head, create_feature_extractor."""
import pytest
import torch
import torchvision
from torchvision.models.feature_extraction import create_feature_extractor

import resnet_fast

from conftest import assert_rel
from models_util import pair
from resnet_fast.testing import randomize_batchnorm_

timm = pytest.importorskip("timm")


def _timm_pair(arch, **kwargs):
    """A timm model with random BN state and our model with its weights."""
    theirs = timm.create_model(arch, pretrained=False, **kwargs)
    randomize_batchnorm_(theirs)
    return theirs.eval()


def test_features_only_resnet50_matches_timm():
    theirs = _timm_pair("resnet50", features_only=True)
    ours = resnet_fast.resnet50(features_only=True, weights=theirs.state_dict()).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected, got = theirs(x), ours(x)
    assert len(got) == len(expected) == 5
    for mine, ref in zip(got, expected):
        assert_rel(mine, ref)
    assert ours.feature_info.channels() == theirs.feature_info.channels()
    assert ours.feature_info.reduction() == theirs.feature_info.reduction()
    # timm names the stem activation act1; torchvision's module tree calls it relu
    assert ours.feature_info.module_name() == ["relu", "layer1", "layer2", "layer3", "layer4"]


def test_out_indices_negative_prune_and_load_full_state_dict():
    tv = randomize_batchnorm_(torchvision.models.resnet18(num_classes=3)).eval()
    ours = resnet_fast.resnet18(features_only=True, out_indices=(-2, 1)).eval()
    assert ours.out_indices == (1, 3)
    assert not any(hasattr(ours, name) for name in ("layer4", "avgpool", "fc"))
    expected_keys = [k for k in tv.state_dict() if not k.startswith(("fc.", "layer4."))]
    assert list(ours.state_dict()) == expected_keys
    result = ours.load_state_dict(tv.state_dict(), strict=True)  # fc and layer4 keys ignored
    assert not result.missing_keys and not result.unexpected_keys
    body = torchvision.models._utils.IntermediateLayerGetter(tv, {"layer1": "c2", "layer3": "c4"})
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = body(x)
        got = ours(x)
    assert_rel(got[0], expected["c2"])
    assert_rel(got[1], expected["c4"])
    assert ours.feature_info.channels() == [64, 256] and ours.feature_info.reduction() == [4, 16]


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(features_only=True, out_indices=(5,)), ValueError, r"out_indices entry 5 is out of range.*\[-5, 4\]"),
        (dict(features_only=True, out_indices=(-6,)), ValueError, "out_indices entry -6 is out of range"),
        (dict(features_only=True, out_indices=()), ValueError, "out_indices must not be empty"),
        (dict(features_only=True, out_indices=(1, -4)), ValueError, "names a stage twice"),
        (dict(features_only=True, out_indices=3), TypeError, "out_indices must be a sequence of ints"),
        (dict(features_only=True, out_indices=(1.0,)), TypeError, "out_indices must hold ints"),
        (dict(out_indices=(1, 2)), ValueError, "pass features_only=True"),
        (dict(trainable_layers=6), ValueError, r"trainable_layers must be an int in \[0, 5\]"),
    ],
    ids=["too-big", "too-negative", "empty", "repeated", "int", "float", "without-features-only", "trainable"],
)
def test_bad_backbone_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        resnet_fast.resnet18(**kwargs)


def test_forward_intermediates_and_head_match_timm():
    theirs = _timm_pair("resnet18", num_classes=6)
    ours = resnet_fast.resnet18(num_classes=6, weights=theirs.state_dict()).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for kwargs in (dict(), dict(indices=2), dict(indices=(0, -1)), dict(indices=[1, 2], stop_early=True)):
            final_ref, maps_ref = theirs.forward_intermediates(x, **kwargs)
            final, maps = ours.forward_intermediates(x, **kwargs)
            assert_rel(final, final_ref)
            assert len(maps) == len(maps_ref)
            for mine, ref in zip(maps, maps_ref):
                assert_rel(mine, ref)
        only = ours.forward_intermediates(x, indices=(0,), intermediates_only=True)
        assert len(only) == 1 and only[0].shape == (2, 64, 32, 32)
        features = ours.forward_features(x)
        assert_rel(ours.forward_head(features, pre_logits=True), theirs.forward_head(features, pre_logits=True))
        assert_rel(ours.forward_head(features), theirs(x))
    with pytest.raises(ValueError, match=r"indices entry 7 is out of range"):
        ours.forward_intermediates(x, indices=(7,))
    with pytest.raises(ValueError, match="output_fmt must be 'NCHW'"):
        ours.forward_intermediates(x, output_fmt="NHWC")


def test_feature_info_matches_the_maps_for_a_dilated_backbone():
    model = resnet_fast.resnet50(features_only=True, replace_stride_with_dilation=[False, True, True]).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        maps = model(x)
    info = model.feature_info
    assert info.reduction() == [2, 4, 8, 8, 8]
    for i, feature in enumerate(maps):
        assert feature.shape[1] == info.channels(i) == info[i]["num_chs"]
        assert x.shape[-1] // feature.shape[-1] == info.reduction(i)


def test_create_feature_extractor_gives_torchvision_features():
    """The forward is torch.fx-traceable, with torchvision's node names for
    the stem activation and the layers."""
    tv, ours = pair("resnet18")
    tv.eval(), ours.eval()
    nodes = {"relu": "c1", "layer1": "c2", "layer2": "c3", "layer3": "c4", "layer4": "c5"}
    ours_body = create_feature_extractor(ours, nodes)
    tv_body = create_feature_extractor(tv, nodes)
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        got, expected = ours_body(x), tv_body(x)
        assert_rel(torch.fx.symbolic_trace(ours)(x), tv(x))
    for name in nodes.values():
        assert_rel(got[name], expected[name])
