"""resnet_fast as the backbone of torchvision's detection and segmentation
models, and frozen-BN fine-tuning."""
import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops import FrozenBatchNorm2d

import resnet_fast
from resnet_fast.models.resnet import Bottleneck

from conftest import assert_rel
from resnet_fast.testing import randomize_batchnorm_


def _randomize_frozen_bn_(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.2), m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return model


def _synthetic_detection_batch():
    images = [torch.rand(3, 64, 80), torch.rand(3, 72, 64)]
    targets = [
        {"boxes": torch.tensor([[10.0, 12.0, 50.0, 60.0], [30.0, 5.0, 75.0, 40.0]]), "labels": torch.tensor([1, 2])},
        {"boxes": torch.tensor([[5.0, 20.0, 50.0, 66.0]]), "labels": torch.tensor([2])},
    ]
    return images, targets


def test_faster_rcnn_fpn_on_our_backbone_matches_torchvision():
    """The detection default: frozen BN, 3 trainable layers. One SGD step's
    losses and gradients, then the eval detections."""
    reference = torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=3, min_size=64, max_size=96,
        box_score_thresh=0.0, box_detections_per_img=20,
    )
    randomize_batchnorm_(reference.backbone.body)
    resnet_fast.freeze_batchnorm(reference.backbone.body)
    resnet_fast.set_trainable_layers(reference.backbone.body, 3)
    ours = resnet_fast.optimize(copy.deepcopy(reference))
    assert type(ours.backbone.body.layer1[0]) is Bottleneck  # inside the IntermediateLayerGetter
    assert list(ours.state_dict()) == list(reference.state_dict())
    images, targets = _synthetic_detection_batch()

    with torch.no_grad():
        expected = reference.eval()(images)
        got = ours.eval()(images)
    for mine, ref in zip(got, expected):
        assert len(mine["boxes"]) == len(ref["boxes"]) > 0
        assert torch.equal(mine["labels"], ref["labels"])
        assert_rel(mine["boxes"], ref["boxes"], factor=10)
        assert_rel(mine["scores"], ref["scores"], factor=10)

    losses = {}
    for name, model in (("tv", reference), ("ours", ours)):
        model.train()
        torch.manual_seed(0)  # the RPN and ROI heads sample proposals at random
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
        loss_dict = model(images, targets)
        sum(loss_dict.values()).backward()
        losses[name] = loss_dict
        optimizer.step()
    for key, value in losses["tv"].items():
        assert_rel(losses["ours"][key].detach(), value.detach(), factor=10)
    # This randomly initialised detector is ill-conditioned in fp32:
    # torchvision's own fp32 backbone gradients differ from float64 by up to
    # ~4e-4 relative (measured), hence the looser bound on gradients and on
    # the weights after the step.
    for (name, p_tv), p_ours in zip(reference.named_parameters(), ours.parameters()):
        assert p_tv.requires_grad == p_ours.requires_grad, name
        if p_tv.grad is not None and p_tv.grad.norm() > 0:
            assert_rel(p_ours.grad, p_tv.grad, factor=500), name
            assert_rel(p_ours.detach(), p_tv.detach(), factor=100), name


def test_deeplabv3_dilated_backbone_matches_torchvision():
    reference = torchvision.models.segmentation.deeplabv3_resnet50(
        weights=None, weights_backbone=None, num_classes=4, aux_loss=False
    )
    randomize_batchnorm_(reference)
    ours = resnet_fast.optimize(copy.deepcopy(reference))
    assert ours.backbone.layer4[1].conv2.dilation == (4, 4) and type(ours.backbone.layer4[1]) is Bottleneck
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_rel(ours.eval()(x)["out"], reference.eval()(x)["out"])
    # training mode (batch statistics): the loss and the running statistics.
    # Gradients are left to the model tests, which judge them against float64
    # (training-mode BatchNorm through 16 bottlenecks is ill-conditioned in fp32).
    target = torch.randint(0, 4, (2, 64, 64))
    losses = []
    for model in (reference, ours):
        model.train()
        torch.manual_seed(0)  # the ASPP head's dropout
        losses.append(F.cross_entropy(model(x)["out"], target).detach())
    assert_rel(losses[1], losses[0], factor=10)
    assert_rel(ours.backbone.layer2[0].bn1.running_var, reference.backbone.layer2[0].bn1.running_var)
    assert_rel(ours.backbone.layer4[2].bn3.running_mean, reference.backbone.layer4[2].bn3.running_mean, factor=10)


@pytest.mark.parametrize("trainable_layers", [0, 3, 5])
def test_frozen_bn_fine_tuning_gradients_match_torchvision(trainable_layers):
    """freeze_batchnorm + trainable_layers against torchvision's
    resnet_fpn_backbone body (FrozenBatchNorm2d), parameter by parameter."""
    tv_body = resnet_fpn_backbone(
        backbone_name="resnet18", weights=None, norm_layer=FrozenBatchNorm2d, trainable_layers=trainable_layers
    ).body
    _randomize_frozen_bn_(tv_body)
    full_state = {**tv_body.state_dict(), **{k: v for k, v in torchvision.models.resnet18().state_dict().items() if k.startswith("fc.")}}
    ours = resnet_fast.resnet18(features_only=True, out_indices=(1, 2, 3, 4), weights=full_state,
                                trainable_layers=trainable_layers)
    ours = resnet_fast.freeze_batchnorm(ours)
    assert all(not isinstance(m, torch.nn.BatchNorm2d) for m in ours.modules())
    assert [(n, p.requires_grad) for n, p in ours.named_parameters()] == [
        (n, p.requires_grad) for n, p in tv_body.named_parameters()
    ]
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    expected = tv_body(x)
    got = ours(x)
    weights = [torch.randn_like(t) for t in got]
    sum((t * w).sum() for t, w in zip(expected.values(), weights)).backward()
    grad_x_tv, x.grad = x.grad, None
    sum((t * w).sum() for t, w in zip(got, weights)).backward()
    assert_rel(x.grad, grad_x_tv, factor=20)
    for (name, p_tv), p_ours in zip(tv_body.named_parameters(), ours.parameters()):
        if p_tv.requires_grad:
            assert_rel(p_ours.grad, p_tv.grad, factor=20), name
        else:
            assert p_ours.grad is None, name


def test_freeze_batchnorm_keeps_statistics_dtype_and_output():
    model = randomize_batchnorm_(resnet_fast.resnet18(num_classes=3)).eval().to(torch.bfloat16)
    x = torch.randn(1, 3, 40, 40, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = model(x)
        assert resnet_fast.freeze_batchnorm(model) is model
        assert isinstance(model.layer1[0].bn1, FrozenBatchNorm2d) and model.layer1[0].bn1.weight.dtype == torch.bfloat16
        assert_rel(model.train()(x), expected, dtype=torch.bfloat16)  # frozen: train mode uses the same stats
    bn = torch.nn.BatchNorm2d(4)
    assert isinstance(resnet_fast.freeze_batchnorm(bn), FrozenBatchNorm2d)
    with pytest.raises(ValueError, match="keeps no running statistics"):
        resnet_fast.freeze_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(4, track_running_stats=False)))
