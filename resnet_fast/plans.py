"""Per-layer backend plans, as stored and looked up: which backend (and on
CUDA which convolution family, "native:<family>", see backends.split_choice)
each fused eval layer runs when it is given none (resnet_fast.tuning
measures and makes them).

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
import tempfile
import threading
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .backends import is_choice


PLAN_FORMAT = 1
_lock = threading.Lock()
_plans: Dict[str, Dict[str, str]] = {}  # plan key -> {layer key: choice}; loaded from disk once per key
_generation = 0  # bumped whenever _plans changes (see state)
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
    # Convolution families ("native:<family>") are choices for CUDA tensors only.
    families_allowed = key.startswith("cuda|")
    return {k: v for k, v in data.get("layers", {}).items()
            if is_choice(v) and (families_allowed or ":" not in v)}


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


def save(key: str, layers: Dict[str, str]) -> str:
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
    """The choice the plan for x's device and dtype made for this layer,
    or None when there is no plan entry (or while torch.compile traces)."""
    if torch.compiler.is_compiling():
        return None
    if _recording is not None:
        _recording.append((conv, norm, x, residual, relu))
    key = plan_key(x.device, x.dtype) if _plans or _plan_dir_exists() else None
    if key is None:
        return None
    with _lock:
        plan = _plans.get(key)
        if plan is None:
            plan = _plans[key] = _read_plan_file(_plan_path(key), key)
            _changed()
    return plan.get(layer_key(conv, x, residual, relu))


def _changed() -> None:
    global _generation
    _generation += 1


def state() -> tuple:
    """What planned_backend's answers rest on besides the layer: the plans
    loaded or installed in this process (a counter of their changes) and
    the plan directory's setting. A record of the layers' choices
    (cpu_replay) is good while this stays the same."""
    return _generation, os.environ.get("RESNET_FAST_CACHE_DIR")


def recording_active() -> bool:
    """Whether a recording() block is collecting the layers' lookups."""
    return _recording is not None


_dirs_seen: Dict[Optional[str], bool] = {}  # $RESNET_FAST_CACHE_DIR (None: unset) -> whether the directory exists


def _plan_dir_exists() -> bool:
    """Whether the plan directory exists, looked up once per directory (every
    fused layer asks, on every call); clear_loaded_plans() looks again."""
    override = os.environ.get("RESNET_FAST_CACHE_DIR")
    exists = _dirs_seen.get(override)
    if exists is None:
        exists = _dirs_seen[override] = os.path.isdir(cache_dir())
    return exists


def clear_loaded_plans() -> None:
    """Forget the plans read into this process (the files stay), and look
    for the plan directory again."""
    with _lock:
        _plans.clear()
        _dirs_seen.clear()
        _changed()


def install(key: str, layers: Dict[str, str]) -> None:
    """Merge layers into this process's plan for key (and save nothing)."""
    with _lock:
        _plans[key] = {**_plans.get(key, {}), **layers}
        _changed()


@contextlib.contextmanager
def recording() -> Iterator[List[Tuple]]:
    """Within this block, every layer that looks up its plan appends
    (conv, norm, x, residual, relu) to the list yielded."""
    global _recording
    calls: List[Tuple] = []
    with _lock:
        _recording = calls
    try:
        yield calls
    finally:
        with _lock:
            _recording = None
