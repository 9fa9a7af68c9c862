"""The native CUDA kernels on a GPU, against the reference on the same GPU.
Skipped without a CUDA device (benchmarks/gpu_check.sh runs them on one)."""
import pytest
import torch
import torchvision

import resnet_fast
from resnet_fast import ops, reference

from conftest import ELEM_TOL, HAS_CUDA, assert_rel, channels_last, poison_allocator
from resnet_fast.testing import randomize_batchnorm_
from test_ops import BN_SHAPES, CONV_CASES, DTYPES, conv_out_shape, make_conv

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU"),
]
CUDA = torch.device("cuda")


def _to_cuda(*tensors):
    return [t.to(CUDA) if t is not None else None for t in tensors]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CONV_CASES))
@pytest.mark.parametrize("residual,relu", [(True, True), (False, True), (False, False)])
def test_conv_bias_act_cuda(dtype, case, residual, relu, tf32):
    x, weight, bias, args = make_conv(case, dtype)
    res = channels_last(torch.randn(conv_out_shape(x, weight, args), dtype=dtype)) if residual else None
    x, weight, bias, res = _to_cuda(x, weight, bias, res)
    tf32(False)  # an exact float32 reference
    expected = ops.conv_bias_act(x, weight, bias, res, relu=relu, backend="reference", **args)
    tf32(True)
    poison_allocator(expected.numel(), CUDA)
    out = ops.conv_bias_act(x, weight, bias, res, relu=relu, backend="native", **args)
    assert out.device.type == "cuda" and out.is_contiguous(memory_format=torch.channels_last)
    # float32 may run on TF32 tensor cores (10 mantissa bits, ~5e-4 relative error).
    assert_rel(out, expected, factor=200 if dtype == torch.float32 else 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", BN_SHAPES + [(2, 64, 17, 9), (1, 8, 33, 31)])
@pytest.mark.parametrize("residual,relu", [(True, True), (False, True), (False, False)])
def test_bn_act_train_and_backward_cuda(dtype, shape, residual, relu):
    x = (torch.randn(shape) * 0.5 + 3.0).to(dtype)
    weight, bias = torch.rand(shape[1]) + 0.5, torch.randn(shape[1])
    res = torch.randn(shape, dtype=dtype) if residual else None
    grad = torch.randn(shape, dtype=dtype)
    x, weight, bias, res, grad = _to_cuda(channels_last(x), weight, bias, res, grad)
    ref = reference.bn_act_train(x, weight, bias, res, 1e-5, relu)
    poison_allocator(x.numel(), CUDA)
    got = torch.ops.resnet_fast.bn_act_train(x, weight, bias, res, 1e-5, relu)
    torch.testing.assert_close(got[0], ref[0], **ELEM_TOL[dtype])
    for g, e in zip(got[1:], ref[1:]):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    out, mean, invstd = ref[0], ref[1], ref[2]
    expected = reference.bn_act_backward(grad, x, out, weight, mean, invstd, relu)
    got = torch.ops.resnet_fast.bn_act_backward(grad, x, out, weight, mean, invstd, relu)
    for g, e in zip(got, expected):
        assert g.shape == e.shape
        if g.numel():
            torch.testing.assert_close(g.float(), e.float(), rtol=2e-2, atol=2e-2 if dtype != torch.float32 else 1e-4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("relu", [True, False])
def test_bias_act_cuda(dtype, relu):
    y, res, grad = (torch.randn(3, 40, 7, 5, dtype=dtype, device=CUDA) for _ in range(3))
    bias = torch.randn(40, device=CUDA)
    torch.testing.assert_close(ops.bias_act(y, bias, res, relu, backend="native"),
                               reference.bias_act(y, bias, res, relu), **ELEM_TOL[dtype])
    got_z, got_b = torch.ops.resnet_fast.bias_act_backward(grad, y, relu)
    ref_z, ref_b = reference.bias_act_backward(grad, y, relu)
    if relu:
        torch.testing.assert_close(got_z, ref_z, **ELEM_TOL[dtype])
    torch.testing.assert_close(got_b, ref_b, rtol=1e-3, atol=1e-3)


@pytest.fixture
def exact_fp32(tf32):
    """fp32 convolutions without TF32, so fp32 comparisons can be tight."""
    tf32(False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_resnet50_eval_and_train_step_cuda(dtype, exact_fp32):
    tv = torchvision.models.resnet50(num_classes=10)
    randomize_batchnorm_(tv)
    tv = tv.to(CUDA, dtype)
    ours = resnet_fast.from_torchvision(tv, backend="native")
    x = torch.randn(8, 3, 224, 224, device=CUDA, dtype=dtype)
    with torch.no_grad():
        assert_rel(ours.eval()(x), tv.eval()(x), dtype=dtype, factor=10 if dtype == torch.float32 else 2)
    labels = torch.randint(0, 10, (8,), device=CUDA)
    for model in (tv.train(), ours.train()):
        torch.nn.functional.cross_entropy(model(x).float(), labels).backward()
    # All gradients as one vector: single parameters of a deep bottleneck
    # network can be ill-conditioned (see test_models), the whole is not.
    diff = sum((p.grad.double() - q.grad.double()).square().sum() for p, q in zip(ours.parameters(), tv.parameters()))
    norm = sum(q.grad.double().square().sum() for q in tv.parameters())
    err = (diff / norm).sqrt().item()
    assert err < (5e-2 if dtype == torch.bfloat16 else 1e-3), f"gradient relative error {err:.3g}"


def test_cuda_input_on_cpu_model_is_rejected():
    model = resnet_fast.resnet18().eval()
    with pytest.raises(ValueError, match="input is on cuda"):
        model(torch.randn(1, 3, 32, 32, device=CUDA))
