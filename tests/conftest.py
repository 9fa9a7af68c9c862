"""Shared test helpers: the tolerance table, backends to test, and checks."""
import os
import threading

import torch

# Without a GPU the Triton kernels run in Triton's interpreter; it must be on
# before anything defines them or imports triton (torchvision does). Whether
# torch sees a GPU decides, not a device file: a driver without a usable GPU
# (or CUDA_VISIBLE_DEVICES="") means the interpreter too.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

import resnet_fast  # noqa: E402
from resnet_fast.backends import _unavailable_reason, available_backends, triton_interpreted  # noqa: E402
from resnet_fast.testing import REL_TOL, TF32_REL_TOL, rel_err  # noqa: E402,F401  (tests import them from here)

# Elementwise tolerances for torch.testing.assert_close, per dtype.
ELEM_TOL = {
    torch.float32: dict(rtol=1e-4, atol=1e-5),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}

HAS_CUDA = torch.cuda.is_available()

# Hypothesis profiles of the fuzz tests (tests/test_fuzz.py). "ci", the
# default: bounded and derandomized, so every CI run draws the same examples.
# "long" (RESNET_FAST_FUZZ_PROFILE=long): thousands of fresh examples per op.
_FUZZ_COMMON = dict(deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", max_examples=40, derandomize=True, database=None, **_FUZZ_COMMON)
settings.register_profile("long", max_examples=2000, **_FUZZ_COMMON)
settings.load_profile(os.environ.get("RESNET_FAST_FUZZ_PROFILE", "ci"))


def kernel_backends():
    """Backends other than the reference that the general op and model tests
    run: those tests use CPU tensors, so the backends that take them, less
    Triton under its interpreter (~1000x slower: tests/test_triton.py covers it
    with tiny shapes instead). On a GPU machine Triton takes CUDA tensors only
    and its tests are in tests/test_triton.py too."""
    return [
        name for name, status in available_backends().items()
        if status.available and name != "reference" and _unavailable_reason(name, torch.device("cpu")) is None
        and not (name == "triton" and triton_interpreted())
    ]


def assert_rel(out: torch.Tensor, ref: torch.Tensor, dtype=None, factor: float = 1.0):
    tol = REL_TOL[dtype or ref.dtype] * factor
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), "output has NaN/Inf (unwritten or poisoned memory?)"
    err = rel_err(out, ref)
    assert err <= tol, f"relative error {err:.3g} > {tol:.3g}"


@pytest.fixture
def tf32():
    """A setter of torch.backends.cudnn.allow_tf32 (a process-wide flag) whose
    value is restored after the test."""
    saved = torch.backends.cudnn.allow_tf32

    def allow(value: bool):
        torch.backends.cudnn.allow_tf32 = value
    yield allow
    torch.backends.cudnn.allow_tf32 = saved


def poison_allocator(numel: int, device="cpu"):
    """Fill memory the allocator is about to hand out again with NaN, so an
    output element a kernel forgets to write shows up as NaN."""
    junk = [torch.full((numel,), float("nan"), device=device) for _ in range(4)]
    del junk


def record_cpu_convolutions(monkeypatch, names):
    """[(op name, x)] of every call of these resnet_fast.ops convolutions by
    the CPU inference layers: a layer's first call of a kind goes through
    ops.<name>, its later ones through the step kept for it
    (resnet_fast.cpu_inference.CpuStep), which calls the operator itself."""
    from resnet_fast import cpu_inference, ops

    calls = []
    for name in names:
        def counted(*args, real=getattr(ops, name), name=name, **kwargs):
            calls.append((name, args[1 if name.endswith("_") else 0]))
            return real(*args, **kwargs)

        monkeypatch.setattr(ops, name, counted)
    run_trusted = cpu_inference.CpuStep.run_trusted

    def trusted(step, x, residual):
        if step.op in names and step.calls_operator:  # otherwise it calls ops.<name>, counted above
            calls.append((step.op, x))
        return run_trusted(step, x, residual)

    monkeypatch.setattr(cpu_inference.CpuStep, "run_trusted", trusted)
    return calls


def channels_last(t):
    return t.contiguous(memory_format=torch.channels_last)


def run_in_threads(work, count: int) -> list:
    """work(i) for i in range(count), each on its own thread at once; the
    exceptions they raised (an assertion in a thread fails no test by itself)."""
    errors = []

    def guarded(i):
        try:
            work(i)
        except Exception as e:  # returned to the test, which asserts there are none
            errors.append(e)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


@pytest.fixture
def cached_resnet18(tmp_path, monkeypatch):
    """torchvision's resnet18 (random weights and BatchNorm statistics, 1000
    classes), saved in a fresh torch.hub cache under the file name of
    torchvision's ResNet18_Weights.IMAGENET1K_V1: builders read it from there
    and never download. Returns the model, in eval mode."""
    torchvision = pytest.importorskip("torchvision")
    from resnet_fast.testing import randomize_batchnorm_

    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    model = torchvision.models.resnet18()
    randomize_batchnorm_(model)
    os.makedirs(tmp_path / "hub" / "checkpoints")
    torch.save(model.state_dict(), tmp_path / "hub" / "checkpoints" / os.path.basename(weights.url))
    return model.eval()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


def pytest_report_header(config):
    lines = [f"torch {torch.__version__}, resnet_fast {resnet_fast.__version__}, CUDA available: {HAS_CUDA}"]
    for name, status in available_backends().items():
        lines.append(f"  backend {name}: {'yes' if status.available else 'no'} ({status.detail})")
    return lines
