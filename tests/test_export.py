"""torch.compile, torch.export, ONNX export and CUDA-graph replay."""
import pytest
import torch

import resnet_fast

from conftest import HAS_CUDA, assert_rel, kernel_backends
from models_util import pair
from resnet_fast.testing import randomize_batchnorm_


def test_compile_fullgraph_features_only_and_intermediates():
    """features_only and forward_intermediates trace into one graph too, in
    training (batch-stat BN, backward) and eval. (The whole model on every
    backend: tests/test_models.py.)"""
    backend = (kernel_backends() or ["reference"])[0]
    model = randomize_batchnorm_(resnet_fast.resnet18(features_only=True, out_indices=(0, 2, 4), backend=backend))
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    sum(t.sum() for t in compiled(x)).backward()
    assert model.layer4[1].conv2.weight.grad is not None
    model.eval()
    with torch.no_grad():
        expected = model(x)
        for got, ref in zip(compiled(x), expected):
            assert_rel(got, ref, factor=10)
        intermediates = torch.compile(model.forward_intermediates, fullgraph=True, backend="eager")
        final, maps = intermediates(x, indices=(1, 3))
        assert_rel(maps[0], model.forward_intermediates(x, indices=(1,))[1][0], factor=10)


@pytest.mark.parametrize("backend", ["reference"] + kernel_backends())
def test_compile_fullgraph_eval_on_every_backend(backend):
    """Dynamo alone (backend="eager"): fullgraph=True fails on any graph break."""
    tv, ours = pair("resnet18", backend=backend, num_classes=3)
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(ours.eval(), fullgraph=True, backend="eager")
    with torch.no_grad():
        assert_rel(compiled(x), tv.eval()(x), factor=10)


def test_torch_export_of_the_eval_model():
    tv, ours = pair("resnet18", num_classes=4)
    x = torch.randn(2, 3, 48, 48)
    program = torch.export.export(ours.eval(), (x,))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert any("resnet_fast" in t and "conv_bias_act" in t for t in targets)  # the fused op itself
    fresh = torch.randn(2, 3, 48, 48)  # not the tracing example
    with torch.no_grad():
        assert_rel(program.module()(fresh), tv.eval()(fresh))


def test_onnx_export_matches_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = randomize_batchnorm_(resnet_fast.resnet18(num_classes=6)).eval()
    x = torch.randn(2, 3, 64, 64)
    path = tmp_path / "resnet18.onnx"
    resnet_fast.export_onnx(model, x, path)
    assert model.backend is None and model.layer1[0].backend is None  # the model's own setting comes back
    onnx = pytest.importorskip("onnx")
    assert {node.domain for node in onnx.load(str(path)).graph.node} <= {"", "ai.onnx"}  # standard ops only
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    fresh = torch.randn(2, 3, 64, 64)
    (out,) = session.run(None, {session.get_inputs()[0].name: fresh.numpy()})
    with torch.no_grad():
        expected = model(fresh)
    err = ((torch.from_numpy(out).double() - expected.double()).norm() / expected.double().norm()).item()
    assert err <= 1e-4, f"onnxruntime vs resnet_fast: relative error {err:.3g}"


def test_onnx_export_needs_the_eval_model(tmp_path):
    model = resnet_fast.resnet18()
    with pytest.raises(ValueError, match="exports the eval-mode model.*call model.eval"):
        resnet_fast.export_onnx(model, torch.randn(1, 3, 32, 32), tmp_path / "m.onnx")
    with pytest.raises(TypeError, match="example must be a Tensor or a tuple"):
        resnet_fast.export_onnx(model.eval(), [torch.randn(1, 3, 32, 32)], tmp_path / "m.onnx")


def test_using_backend_restores_settings():
    model = resnet_fast.resnet18(backend="reference")
    with resnet_fast.using_backend(model, "native" if "native" in kernel_backends() else None):
        assert model.layer2[0].backend != "reference"
    assert model.backend == "reference" and model.layer2[0].backend == "reference"
    with pytest.raises(ValueError, match="unknown backend"):
        with resnet_fast.using_backend(model, "onnx"):
            pass


def test_cuda_graphed_refuses_cpu_models():
    model = resnet_fast.resnet18().eval()
    with pytest.raises(RuntimeError, match="cuda_graphed needs a CUDA model.*example is on cpu"):
        resnet_fast.cuda_graphed(model, torch.randn(1, 3, 32, 32))


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_graphed_replays_the_model():
    tv, ours = pair("resnet50", num_classes=5)
    tv, ours = tv.cuda().eval(), ours.cuda().eval()
    graphed = resnet_fast.cuda_graphed(ours, torch.randn(2, 3, 64, 64, device="cuda"))
    for _ in range(2):
        x = torch.randn(2, 3, 64, 64, device="cuda")
        with torch.no_grad():
            expected = tv(x)
        assert_rel(graphed(x), expected, factor=100)  # cuDNN may pick other algorithms than eager
    with pytest.raises(ValueError, match="captured for inputs of shape"):
        graphed(torch.randn(1, 3, 64, 64, device="cuda"))
    features = resnet_fast.resnet18(features_only=True).cuda().eval()
    maps = resnet_fast.cuda_graphed(features, torch.randn(1, 3, 64, 64, device="cuda"))(torch.randn(1, 3, 64, 64, device="cuda"))
    assert len(maps) == 5
