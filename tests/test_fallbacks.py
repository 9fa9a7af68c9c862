"""The package imports and works without its optional parts, picks the next
backend and says why once; a backend asked for by name that cannot run
raises. Missing parts are simulated in a fresh interpreter (the backends are
decided at import), with the module's sys.modules entry set to None: its
import raises ImportError, as when it is not installed or fails to load.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from resnet_fast import backends, ops, reference

from conftest import assert_rel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run in the child: block `blocked` modules, import resnet_fast, exercise it,
# print a JSON report on the last line.
CHILD = r"""
import json, sys, warnings

for name in BLOCKED:  # `import name` now raises ImportError; find_spec(name) is None
    sys.modules[name] = None
warnings.simplefilter("always")  # our own once-only logic is under test, not Python's
with warnings.catch_warnings(record=True) as caught:
    import torch
    import resnet_fast
    from resnet_fast import ops, reference
    x, w, b = torch.randn(2, 3, 9, 8), torch.randn(5, 3, 3, 3), torch.randn(5)
    outs = [ops.conv_bias_act(x, w, b, padding=1) for _ in range(3)]
    model = resnet_fast.resnet18(num_classes=3).eval()
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 32, 32))
        logits = model(torch.randn(1, 3, 32, 32))
ref = reference.conv_bias_act(x, w, b, None, (1, 1), (1, 1), (1, 1), 1, True)
explicit = {}
for name in resnet_fast.BACKENDS:
    try:
        ops.conv_bias_act(x, w, b, padding=1, backend=name)
        explicit[name] = "ran"
    except RuntimeError as exc:
        explicit[name] = str(exc)
print(json.dumps({
    "status": {k: [v.available, v.detail] for k, v in resnet_fast.available_backends().items()},
    "warnings": [f"{w.category.__name__}: {w.message}" for w in caught if "resnet_fast" in str(w.message)],
    "max_err": max(float((o - ref).abs().max()) for o in outs),
    "logits_finite": bool(torch.isfinite(logits).all()),
    "explicit": explicit,
}))
"""


def run_child(blocked, prelude="", **env):
    """CHILD in a fresh interpreter, after `prelude` (code that breaks
    something on purpose)."""
    environment = dict(os.environ, PYTHONPATH=ROOT, **env)
    code = f"BLOCKED = {tuple(blocked)!r}\n" + textwrap.dedent(prelude) + textwrap.dedent(CHILD)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment,
                          cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_without_the_compiled_extension():
    report = run_child(["resnet_fast._C"])
    available, detail = report["status"]["native"]
    assert not available and "resnet_fast._C did not load" in detail
    # One warning, naming the reason, however many calls and layers follow.
    assert len(report["warnings"]) == 1, report["warnings"]
    assert report["warnings"][0].startswith("RuntimeWarning: resnet_fast: the native backend cannot run on cpu")
    assert "did not load" in report["warnings"][0] and "using the reference" in report["warnings"][0]
    assert report["max_err"] < 1e-5 and report["logits_finite"]
    assert report["explicit"]["reference"] == "ran"
    assert "backend 'native' is not available on cpu" in report["explicit"]["native"]


def test_without_triton():
    report = run_child(["triton"], TRITON_INTERPRET="1")
    available, detail = report["status"]["triton"]
    assert not available and "triton does not import" in detail
    assert report["status"]["native"][0]
    assert report["warnings"] == []  # the default (native) needs no triton
    assert report["max_err"] < 1e-5 and report["logits_finite"]
    assert "backend 'triton' is not available on cpu: triton does not import" in report["explicit"]["triton"]


# What torch 2.11's triton_op did with the launchers before they were annotated.
BROKEN_REGISTRATION = """
import torch.library

def refuse(*args, **kwargs):
    raise ValueError("Parameter x must have a type annotation")

torch.library.custom_op = torch.library.triton_op = refuse
"""


def test_triton_kernels_that_fail_to_register():
    """An error while the Triton ops are defined makes that backend
    unavailable, with the error as the reason; import and the native
    backend carry on."""
    report = run_child([], prelude=BROKEN_REGISTRATION, TRITON_INTERPRET="1")
    available, detail = report["status"]["triton"]
    if "does not import" in detail:
        pytest.skip("triton is not installed")
    assert not available
    assert "the Triton kernels did not load (ValueError: Parameter x must have a type annotation)" in detail
    assert report["status"]["native"][0] and report["explicit"]["native"] == "ran"
    assert report["warnings"] == [] and report["max_err"] < 1e-5 and report["logits_finite"]
    assert "backend 'triton' is not available on cpu: the Triton kernels did not load" in report["explicit"]["triton"]


def test_without_extension_or_triton():
    report = run_child(["resnet_fast._C", "triton"])
    assert [report["status"][name][0] for name in ("reference", "native", "triton")] == [True, False, False]
    assert len(report["warnings"]) == 1
    assert report["max_err"] < 1e-5 and report["logits_finite"]


def test_without_a_gpu():
    """No visible GPU and no interpreter: Triton says so, CPU work is native
    with no warning at all."""
    report = run_child([], CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="0")
    available, detail = report["status"]["triton"]
    if "does not import" in detail:
        pytest.skip("triton is not installed")
    assert not available and "no CUDA GPU" in detail and "TRITON_INTERPRET=1" in detail
    assert report["warnings"] == []
    assert report["explicit"]["native"] == "ran"
    assert "backend 'triton' is not available on cpu" in report["explicit"]["triton"]
    assert "no CUDA GPU" in report["explicit"]["triton"]


def test_extension_built_without_cuda_falls_back_for_cuda_tensors(monkeypatch):
    """The device decides: an extension without CUDA kernels still serves
    CPU tensors, and CUDA tensors go to the reference, with the reason."""
    monkeypatch.setattr(backends, "_EXTENSION_ERROR", None)
    monkeypatch.setattr(backends, "_NATIVE_HAS_CUDA", False)
    monkeypatch.setattr(backends, "_WARNED", set())
    cuda = torch.device("cuda")
    with pytest.warns(RuntimeWarning, match="cannot run on cuda .*built without CUDA kernels"):
        assert backends.resolve_backend(None, cuda) == "reference"
    with pytest.raises(RuntimeError, match="backend 'native' is not available on cuda: .*built without CUDA"):
        backends.resolve_backend("native", cuda)
    assert backends.resolve_backend(None, torch.device("cpu")) == "native"
    x, w, b = torch.randn(1, 4, 5, 5), torch.randn(2, 4, 1, 1), torch.randn(2)
    assert_rel(ops.conv_bias_act(x, w, b), reference.conv_bias_act(x, w, b))
