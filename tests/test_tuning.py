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
    original = layers.ops.conv_bias_act

    def broken_native(*args, **kwargs):
        out = original(*args, **kwargs)
        return out * 1.01 if args[-1] == "native" else out

    monkeypatch.setattr(layers.ops, "conv_bias_act", broken_native)
    plan = resnet_fast.tune(model, x, candidates=["native", "reference"], repeats=1, save=False)
    assert plan and set(plan.values()) == {"reference"}


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
    (lambda m, x: resnet_fast.tune(m, x, repeats=0), ValueError, "repeats must be at least 1"),
    (lambda m, x: resnet_fast.tune(torch.nn.Identity().eval(), x), ValueError, "ran no fused eval layer"),
    (lambda m, x: resnet_fast.tune("resnet18", x), TypeError, "must be an nn.Module"),
])
def test_bad_tune_arguments(call, error, message):
    model, x = _model_and_input()
    with pytest.raises(error, match=re.escape(message)):
        call(model, x)
