"""The classifier of CPU inference on a prepacked weight (cpu_linear):
the same logits as nn.Linear, in float32 and bfloat16, for batch sizes on
both sides of the float32 threshold; the packed weight made again when the
weight changes; the plain module wherever a gradient, a hook or a traced
call needs it."""
import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import resnet_fast
from resnet_fast import cpu_linear, ops
from resnet_fast.testing import randomize_batchnorm_

from conftest import assert_rel, channels_last, kernel_backends

pytestmark = pytest.mark.skipif("native" not in kernel_backends(), reason="the native extension is not built")


def _packs(dtype: torch.dtype, batch: int) -> bool:
    """Whether this CPU and torch pack the classifier for this case."""
    if dtype == torch.bfloat16:
        return ops.cpu_compute_dtype(torch.bfloat16) == torch.bfloat16 and torch.backends.mkldnn.is_available()
    return batch >= cpu_linear.PACKED_FLOAT32_MIN_ROWS and torch.backends.mkl.is_available()


def _packed_batches(fc: nn.Linear) -> list:
    cache = fc.__dict__.get("_fold_caches", {}).get("packed")
    entry = None if cache is None else cache._entry
    return [] if entry is None else list(entry[1])


def _linear(in_features=37, out_features=11, dtype=torch.float32):
    fc = nn.Linear(in_features, out_features).to(dtype)
    with torch.no_grad():
        fc.bias.normal_()
    return fc


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 3, 4, 9])
def test_same_result_as_the_module(dtype, batch):
    fc = _linear(dtype=dtype)
    x = torch.randn(batch, fc.in_features, dtype=dtype)
    with torch.no_grad():
        out = cpu_linear.linear(fc, x)
        expected = F.linear(x.double(), fc.weight.double(), fc.bias.double())
    assert out.dtype == dtype and out.shape == (batch, fc.out_features)
    assert_rel(out, expected, dtype)
    assert (batch in _packed_batches(fc)) == _packs(dtype, batch)


def test_weight_not_contiguous():
    fc = _linear()
    fc.weight = nn.Parameter(torch.randn(fc.in_features, fc.out_features).t())  # a transposed view
    x = torch.randn(6, fc.in_features)
    with torch.no_grad():
        assert_rel(cpu_linear.linear(fc, x), F.linear(x.double(), fc.weight.double(), fc.bias.double()),
                   torch.float32)


def test_packed_again_when_the_weight_changes():
    fc = _linear()
    x = torch.randn(5, fc.in_features)
    with torch.no_grad():
        cpu_linear.linear(fc, x)
        fc.weight.mul_(-2)  # in place: the version counter moves
        assert_rel(cpu_linear.linear(fc, x), F.linear(x, fc.weight, fc.bias), torch.float32)
        fc.load_state_dict({"weight": torch.randn_like(fc.weight), "bias": fc.bias.clone()})
        assert_rel(cpu_linear.linear(fc, x), F.linear(x, fc.weight, fc.bias), torch.float32)


def test_batch_sizes_past_the_kept_ones():
    fc = _linear()
    with torch.no_grad():
        for batch in range(4, 4 + cpu_linear.PackedLinearWeight.MAX_BATCH_SIZES + 2):
            x = torch.randn(batch, fc.in_features)
            assert_rel(cpu_linear.linear(fc, x), F.linear(x, fc.weight, fc.bias), torch.float32)
    if torch.backends.mkl.is_available():
        kept = cpu_linear.PackedLinearWeight.MAX_BATCH_SIZES
        assert _packed_batches(fc) == list(range(batch - kept + 1, batch + 1))
        with torch.no_grad():  # a kept batch size used again is kept longest
            cpu_linear.linear(fc, torch.randn(batch - kept + 1, fc.in_features))
            cpu_linear.linear(fc, torch.randn(batch + 1, fc.in_features))
        assert batch - kept + 1 in _packed_batches(fc)


def test_gradients_take_the_module():
    fc = _linear()
    x = torch.randn(6, fc.in_features)
    cpu_linear.linear(fc, x).sum().backward()
    assert fc.weight.grad is not None and _packed_batches(fc) == []


def test_autocast_takes_the_module():
    fc = _linear()
    x = torch.randn(6, fc.in_features)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = cpu_linear.linear(fc, x)
        expected = fc(x)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)
    assert _packed_batches(fc) == []


def test_weights_made_in_inference_mode_take_the_module():
    with torch.inference_mode():
        fc = _linear()
        x = torch.randn(6, fc.in_features)
        out = cpu_linear.linear(fc, x)
    assert_rel(out, F.linear(x, fc.weight, fc.bias), torch.float32)
    assert _packed_batches(fc) == []


def _resnet(dtype):
    model = resnet_fast.models.resnet18(num_classes=13)
    randomize_batchnorm_(model)
    return model.eval().to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resnet_logits(dtype):
    model = _resnet(dtype)
    x = channels_last(torch.randn(5, 3, 40, 40, dtype=dtype))
    with torch.no_grad():
        out = model(x)
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
        expected = F.linear(pooled.double(), model.fc.weight.double(), model.fc.bias.double())
    assert_rel(out, expected, dtype)
    assert (5 in _packed_batches(model.fc)) == _packs(dtype, 5)


def test_resnet_hook_on_the_classifier_is_called():
    model = _resnet(torch.float32)
    seen = []
    model.fc.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    with torch.no_grad():
        model(torch.randn(4, 3, 32, 32))
    assert seen == [(4, 13)] and _packed_batches(model.fc) == []


def test_resnet_copies_and_pickles_after_use():
    model = _resnet(torch.float32)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            torch.testing.assert_close(twin(x), out, rtol=0, atol=0)
    resnet_fast.clear_fold_caches(model)
    assert _packed_batches(model.fc) == []
