"""resnet_fast.tune(): per-layer backend plans, measured, checked, cached on
disk and used by backend=None layers."""
import json
import multiprocessing
import os
import re

import pytest
import torch

import resnet_fast
from resnet_fast import plans
from resnet_fast.backends import available_backends
from resnet_fast.testing import randomize_batchnorm_

needs_native = pytest.mark.skipif(not available_backends()["native"].available, reason="compiled extension missing")


@pytest.fixture(autouse=True)
def plan_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("RESNET_FAST_CACHE_DIR", str(tmp_path / "plans"))
    plans.clear_loaded_plans()
    yield tmp_path / "plans"
    plans.clear_loaded_plans()


def _model_and_input():
    model = randomize_batchnorm_(resnet_fast.resnet18(num_classes=10)).eval()
    return model, torch.randn(1, 3, 32, 32)


def _backends_used(model, x, monkeypatch):
    """The backend each fused eval layer resolved to in one forward."""
    import resnet_fast.layers as layers

    used = []
    original = layers.resolve_backend

    def spy(backend, device):
        resolved = original(backend, device)
        used.append(resolved)
        return resolved

    monkeypatch.setattr(layers, "resolve_backend", spy)
    with torch.no_grad():
        out = model(x)
    monkeypatch.setattr(layers, "resolve_backend", original)
    return used, out


@needs_native
def test_tune_plans_every_layer_saves_the_plan_and_the_model_uses_it(plan_dir, monkeypatch):
    model, x = _model_and_input()
    with torch.no_grad():
        expected = model(x)
    plan = resnet_fast.tune(model, x, candidates=["native", "reference"], repeats=1)
    used, out = _backends_used(model, x, monkeypatch)
    # resnet18: 20 fused layers (stem, 16 block convs, 3 downsamples) of 15 distinct shapes.
    assert len(used) == 20 and len(plan) == 15
    assert set(plan.values()) <= {"native", "reference"}
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)

    (path,) = plan_dir.glob("plan-*.json")
    saved = json.loads(path.read_text())
    assert saved["layers"] == plan and saved["key"] == plans.plan_key(x.device, x.dtype)

    # A fresh process state reads the file, and every layer follows it.
    plans.clear_loaded_plans()
    forced = {key: "reference" for key in plan}
    path.write_text(json.dumps({**saved, "layers": forced}))
    used, _ = _backends_used(model, x, monkeypatch)
    assert used == ["reference"] * 20
    # An explicit backend overrides the plan.
    model.backend = "native"
    used, _ = _backends_used(model, x, monkeypatch)
    assert used == ["native"] * 20


@needs_native
def test_a_candidate_with_wrong_output_is_never_picked(monkeypatch):
    import resnet_fast.layers as layers

    model, x = _model_and_input()
    original = layers.cpu_inference  # the native backend's eval layers on the CPU

    def broken_native(*args, **kwargs):
        return original(*args, **kwargs) * 1.01

    monkeypatch.setattr(layers, "cpu_inference", broken_native)
    plan = resnet_fast.tune(model, x, candidates=["native", "reference"], repeats=1, save=False)
    assert plan and set(plan.values()) == {"reference"}


@needs_native
def test_a_candidate_that_loses_nan_is_never_picked(monkeypatch):
    """Right on finite inputs, but its ReLU turns NaN into 0 (as a fused
    library ReLU may): tune() must not choose it."""
    import resnet_fast.layers as layers

    model, x = _model_and_input()
    original = layers.cpu_inference  # the native backend's eval layers on the CPU

    def nan_dropping_native(*args, **kwargs):
        return torch.nan_to_num(original(*args, **kwargs), nan=0.0)

    monkeypatch.setattr(layers, "cpu_inference", nan_dropping_native)
    plan = resnet_fast.tune(model, x, candidates=["native", "reference"], repeats=1, save=False)
    assert plan and set(plan.values()) == {"reference"}


@pytest.mark.parametrize("geometry", [
    dict(kernel_size=1, stride=2), dict(kernel_size=3, stride=2, padding=1), dict(kernel_size=7, stride=2, padding=3),
    dict(kernel_size=3, padding=2, dilation=2), dict(kernel_size=1, stride=3), dict(kernel_size=3, padding=4),
])
@pytest.mark.parametrize("size", [(1, 1), (2, 5), (8, 8), (9, 7)])
def test_the_planted_nan_is_read_by_some_output(geometry, size):
    """Else the NaN check would pass any candidate on that layer (a strided
    1x1 conv skips every other input)."""
    from resnet_fast.tuning import _nan_poisoned

    conv = torch.nn.Conv2d(4, 6, bias=False, **geometry)
    x = torch.randn(2, 4, *size)
    poisoned, must_be_nan = _nan_poisoned(x, conv)
    assert torch.isnan(poisoned).sum() == 1
    assert must_be_nan.any()
    # Exactly the outputs aten's convolution turns into NaN.
    with torch.no_grad():
        assert torch.equal(torch.isnan(conv(poisoned)), must_be_nan)


@needs_native
def test_a_failing_candidate_is_skipped_with_a_warning(monkeypatch):
    import resnet_fast.layers as layers

    import resnet_fast.tuning as tuning

    model, x = _model_and_input()
    original, measure = layers.cpu_inference, tuning._fastest_right_candidate  # the native eval layers on the CPU
    measuring = []  # the model's own forward, which finds the layers, must run

    def failing_native(*args, **kwargs):
        if measuring:
            raise RuntimeError("no kernel for this layer\nsecond line")
        return original(*args, **kwargs)

    def measured(*args, **kwargs):
        measuring.append(True)
        return measure(*args, **kwargs)

    monkeypatch.setattr(layers, "cpu_inference", failing_native)
    monkeypatch.setattr(tuning, "_fastest_right_candidate", measured)
    with pytest.warns(RuntimeWarning, match=r"candidate 'native' failed \(no kernel for this layer\), first on layer"):
        plan = resnet_fast.tune(model, x, candidates=["native", "reference"], repeats=1, save=False)
    assert plan and set(plan.values()) == {"reference"}


def test_default_candidates():
    from resnet_fast.backends import CUDA_CONV_FAMILIES, _NATIVE_HAS_CUDA
    from resnet_fast.tuning import default_candidates

    cpu = default_candidates(torch.device("cpu"))
    assert cpu[0] == "reference" and not any(":" in name for name in cpu)
    assert ("native" in cpu) == available_backends()["native"].available
    cuda = default_candidates(torch.device("cuda"))
    families = [f"native:{family}" for family in CUDA_CONV_FAMILIES]
    # On CUDA the native backend is measured as each of its convolution families.
    assert [name for name in cuda if name.startswith("native")] == (families if _NATIVE_HAS_CUDA else [])


@needs_native
def test_family_runs_is_what_the_native_op_would_run():
    """tune() measures a family only on layers it runs (a preference it
    cannot meet would be measured under another family's name)."""
    from resnet_fast.backends import _NATIVE_HAS_CUDA
    from resnet_fast.tuning import family_runs

    if not _NATIVE_HAS_CUDA:
        pytest.skip("the extension was built without its CUDA kernels")
    conv = torch.nn.Conv2d(16, 32, 1, bias=False)
    x = torch.randn(2, 16, 5, 5, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    weight = conv.weight.detach().half().contiguous(memory_format=torch.channels_last)
    assert family_runs("cudnn", conv, weight, x, None, relu=True)
    assert family_runs("cudnn_fused", conv, weight, x, None, relu=True)
    assert not family_runs("cudnn_fused", conv, weight, x, None, relu=False)
    assert not family_runs("cutlass_sm90", conv, weight, x, None, relu=True)  # a CPU tensor: no Hopper
    cutlass_built = "without the CUTLASS headers" not in resnet_fast.ops.cuda_conv_algorithm(x, weight)
    assert family_runs("cutlass_sm80", conv, weight, x, None, relu=True) == cutlass_built
    odd = torch.nn.Conv2d(16, 12, 1, bias=False)  # 12 output channels: not for the implicit GEMM
    assert not family_runs("cutlass_sm80", odd, odd.weight.detach().half(), x, None, relu=True)


@needs_native
def test_plans_keep_cuda_families_only_for_cuda(plan_dir):
    layers = {"a": "native:cutlass_sm80", "b": "native:cudnn_fused", "c": "triton", "d": "native:fastest",
              "e": "cudnn", "f": "reference:cudnn"}
    cuda_key, cpu_key = "cuda|H200|torch|triton|torch.bfloat16", "cpu|EPYC|torch|triton|torch.float32"
    for key in (cuda_key, cpu_key):
        plans.save(key, layers)
    plans.clear_loaded_plans()
    assert plans._read_plan_file(plans._plan_path(cuda_key), cuda_key) == {
        "a": "native:cutlass_sm80", "b": "native:cudnn_fused", "c": "triton"}
    assert plans._read_plan_file(plans._plan_path(cpu_key), cpu_key) == {"c": "triton"}


@needs_native
def test_a_cuda_family_is_refused_for_cpu_tensors():
    from resnet_fast.layers import conv_norm_act

    model, x = _model_and_input()
    with pytest.raises(ValueError, match="'native:cudnn' names a CUDA convolution family, and x is on cpu"):
        conv_norm_act(model.conv1, model.bn1, x, backend="native:cudnn")
    with pytest.raises(ValueError, match="unknown backend choice 'native:fastest'"):
        conv_norm_act(model.conv1, model.bn1, x, backend="native:fastest")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tune_on_cuda_chooses_among_the_convolution_families(plan_dir, monkeypatch):
    from resnet_fast.tuning import default_candidates

    model = randomize_batchnorm_(resnet_fast.resnet18(num_classes=10)).eval().cuda().half()
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 64, 64, device="cuda", dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    model.backend = "reference"
    with torch.no_grad():
        expected = model(x).float()
    model.backend = None
    plan = resnet_fast.tune(model, x, repeats=2)
    assert plan and set(plan.values()) <= set(default_candidates(x.device))
    used, out = _backends_used(model, x, monkeypatch)
    assert len(used) == 20
    rel = ((out.float() - expected).norm() / expected.norm()).item()
    assert rel < 2e-2


def _write_entries(args):
    cache, worker = args
    os.environ["RESNET_FAST_CACHE_DIR"] = cache
    for i in range(40):
        plans.save("shared key", {f"layer {worker}-{i}": "reference"})


def test_concurrent_writers_merge_their_entries(plan_dir):
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        pool.map(_write_entries, [(str(plan_dir), 0), (str(plan_dir), 1)])
    (path,) = plan_dir.glob("plan-*.json")
    layers = json.loads(path.read_text())["layers"]
    assert set(layers) == {f"layer {w}-{i}" for w in (0, 1) for i in range(40)}
    assert not list(plan_dir.glob(".tmp-*"))


def test_a_damaged_plan_file_is_ignored(plan_dir):
    model, x = _model_and_input()
    plan_dir.mkdir(parents=True)
    (plan_dir / os.path.basename(plans._plan_path(plans.plan_key(x.device, x.dtype)))).write_text("{not json")
    with torch.no_grad():
        model(x)  # runs on the default choice


@pytest.mark.parametrize("call, error, message", [
    (lambda m, x: resnet_fast.tune(m.train(), x), ValueError, "call model.eval() first"),
    (lambda m, x: resnet_fast.tune(m, x, candidates=["cudnn"]), ValueError, "unknown candidate backend"),
    (lambda m, x: resnet_fast.tune(m, x, candidates=["native:fastest"]), ValueError, "unknown candidate backend"),
    (lambda m, x: resnet_fast.tune(m, x, candidates=["native:cudnn"]), ValueError,
     "candidates ['native:cudnn'] name CUDA convolution families, and the input is on cpu"),
    (lambda m, x: resnet_fast.tune(m, x, repeats=0), ValueError, "repeats must be at least 1"),
    (lambda m, x: resnet_fast.tune(torch.nn.Identity().eval(), x), ValueError, "ran no fused eval layer"),
    (lambda m, x: resnet_fast.tune("resnet18", x), TypeError, "must be an nn.Module"),
])
def test_bad_tune_arguments(call, error, message):
    model, x = _model_and_input()
    with pytest.raises(error, match=re.escape(message)):
        call(model, x)
