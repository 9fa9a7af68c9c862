"""Per-layer backend plans: measure each fused eval layer of a model on every
candidate backend, keep the fastest one whose output is right, and remember
the choice on disk.

    plan = resnet_fast.tune(model.eval(), example_input)   # measures, saves, installs
    model(x)                                                # backend=None layers use the plan

A plan is keyed by the device (card or CPU model), the torch and Triton
versions and the dtype; within it each layer by its conv geometry, input
shape, residual and ReLU. It lives in one JSON file per key under the cache
directory: $RESNET_FAST_CACHE_DIR, else ~/.cache/resnet_fast/plans. Writers
take an exclusive lock and replace the file atomically, so processes tuning
at the same time merge their entries and readers never see half a file.
Layers with an explicit backend, and shapes the plan has not seen, ignore it.
"""
import contextlib
import functools
import hashlib
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .backends import BACKENDS, _unavailable_reason, triton_interpreted

PLAN_FORMAT = 1
_lock = threading.Lock()
_plans: Dict[str, Dict[str, str]] = {}  # plan key -> {layer key: backend}; loaded from disk once per key
_recording: Optional[List[Tuple]] = None


def cache_dir() -> str:
    return os.environ.get("RESNET_FAST_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "resnet_fast", "plans")


@functools.lru_cache(maxsize=None)
def device_name(device: torch.device) -> str:
    """The GPU's or the CPU's model name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


@functools.lru_cache(maxsize=None)
def plan_key(device: torch.device, dtype: torch.dtype) -> str:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return f"{device.type}|{device_name(device)}|torch {torch.__version__}|triton {triton_version}|{dtype}"


def layer_key(conv: nn.Conv2d, x: Tensor, residual: Optional[Tensor], relu: bool) -> str:
    return (f"{tuple(x.shape)}|{conv.out_channels}|{conv.kernel_size}|{conv.stride}|{conv.padding}|"
            f"{conv.dilation}|{conv.groups}|{residual is not None}|{relu}")


def _plan_path(key: str) -> str:
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return os.path.join(cache_dir(), f"plan-{digest}.json")


def _read_plan_file(path: str, key: str) -> Dict[str, str]:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}  # no plan yet, or an unreadable one: measure again
    if data.get("format") != PLAN_FORMAT or data.get("key") != key:
        return {}
    return {k: v for k, v in data.get("layers", {}).items() if v in BACKENDS}


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "w") as lock:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
        except ImportError:  # no fcntl (Windows): the atomic rename alone
            pass
        yield


def _save(key: str, layers: Dict[str, str]) -> str:
    """Merge `layers` into the plan file of `key` (other processes' entries
    kept) and return its path."""
    path = _plan_path(key)
    with _file_lock(path):
        merged = {**_read_plan_file(path, key), **layers}
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path))
        with os.fdopen(fd, "w") as f:
            json.dump({"format": PLAN_FORMAT, "key": key, "layers": merged}, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    return path


def planned_backend(conv: nn.Conv2d, norm: nn.Module, x: Tensor, residual: Optional[Tensor],
                    relu: bool) -> Optional[str]:
    """The backend the plan for x's device and dtype picked for this layer,
    or None when there is no plan entry (or while torch.compile traces)."""
    if torch.compiler.is_compiling():
        return None
    if _recording is not None:
        _recording.append((conv, norm, x, residual, relu))
    key = plan_key(x.device, x.dtype) if _plans or os.path.isdir(cache_dir()) else None
    if key is None:
        return None
    with _lock:
        plan = _plans.get(key)
        if plan is None:
            plan = _plans[key] = _read_plan_file(_plan_path(key), key)
    return plan.get(layer_key(conv, x, residual, relu))


def clear_loaded_plans() -> None:
    """Forget the plans read into this process (the files stay)."""
    with _lock:
        _plans.clear()


def _candidates(device: torch.device, requested: Optional[Sequence[str]]) -> List[str]:
    names = list(requested) if requested is not None else [
        b for b in BACKENDS if not (b == "triton" and triton_interpreted())]
    unknown = [b for b in names if b not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown candidate backend(s) {unknown}; expected some of {BACKENDS}")
    return [b for b in names if _unavailable_reason(b, device) is None]


def _median_time(fn, device: torch.device, repeats: int) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()  # warm-up (and Triton autotuning / oneDNN packing)
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def tune(model: nn.Module, example_input: Tensor, candidates: Optional[Sequence[str]] = None,
         repeats: int = 5, rtol: Optional[float] = None, save: bool = True) -> Dict[str, str]:
    """Measure every fused eval layer of `model` (run on `example_input`) on
    each candidate backend, and pick per layer the fastest whose output is
    within `rtol` (relative norm error; default 1e-4 in fp32, 2e-2 otherwise)
    of the reference backend. The plan is installed for this process and,
    with save=True, merged into the on-disk cache. Returns {layer key: backend}.
    """
    global _recording
    from .layers import FoldCache, conv_norm_act

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if model.training:
        raise ValueError("tune() measures inference: call model.eval() first")
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    device, dtype = example_input.device, example_input.dtype
    names = _candidates(device, candidates)
    if not names:
        raise ValueError(f"none of the candidate backends runs on {device}")
    tol = rtol if rtol is not None else (1e-4 if dtype == torch.float32 else 2e-2)
    with _lock:
        _recording = []
    try:
        with torch.inference_mode():
            model(example_input)
        layers, _recorded = {}, _recording
    finally:
        with _lock:
            _recording = None
    if not _recorded:
        raise ValueError(f"{type(model).__name__} ran no fused eval layer: tune() plans resnet_fast models")
    seen: Dict[str, Tuple] = {}
    for conv, norm, x, residual, relu in _recorded:
        seen.setdefault(layer_key(conv, x, residual, relu), (conv, norm, x, residual, relu))
    with torch.inference_mode():
        for key, (conv, norm, x, residual, relu) in seen.items():
            cache = FoldCache()  # fold (and prepack) once, as the model's own layers do

            def run(backend: str) -> Tensor:
                return conv_norm_act(conv, norm, x, residual, relu, backend, cache)

            expected = run("reference").float()
            best: Optional[Tuple[float, str]] = None
            for name in names:
                out = run(name).float()
                err = ((out - expected).norm() / expected.norm().clamp_min(1e-30)).item()
                if not err <= tol:  # also rejects NaN
                    continue
                t = _median_time(lambda: run(name), device, repeats)
                if best is None or t < best[0]:
                    best = (t, name)
            if best is not None:
                layers[key] = best[1]
    pkey = plan_key(device, dtype)
    with _lock:
        _plans[pkey] = {**_plans.get(pkey, {}), **layers}
    if save:
        _save(pkey, layers)
    return layers

