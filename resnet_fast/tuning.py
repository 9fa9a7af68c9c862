"""resnet_fast.tune(): measure each fused eval layer of a model on every
candidate backend (on CUDA, each convolution family of the native backend
too), keep the fastest one whose output is right, and remember the choice
(resnet_fast.plans stores and looks the plans up).

    plan = resnet_fast.tune(model.eval(), example_input)   # measures, saves, installs
    model(x)                                                # backend=None layers use the plan

A candidate is right for a layer when its output is within rtol of the
reference backend's and a NaN in the input still reaches every output that
reads it (a fused ReLU that turns NaN into 0 is not chosen).
"""
import statistics
import time
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops, plans
from .backends import (BACKENDS, CUDA_CONV_FAMILIES, _NATIVE_HAS_CUDA, _unavailable_reason, is_choice, split_choice,
                       triton_interpreted)
from .folding import FoldCache
from .layers import conv_norm_act

# What ops.cuda_conv_algorithm names, per family, when that family runs the layer.
_FAMILY_NAME_PREFIX = {"cutlass_sm90": "cutlass sm90", "cutlass_sm80": "cutlass sm80", "cudnn": "cudnn:",
                       "cudnn_fused": "cudnn fused"}


def default_candidates(device: torch.device) -> List[str]:
    """What tune() measures when given no candidates: every backend that runs
    on device, with the native one as each of its convolution families on
    CUDA (its automatic choice is one of them)."""
    names: List[str] = []
    for backend in BACKENDS:
        if backend == "triton" and triton_interpreted():
            continue  # the interpreter is for tests, never the fastest
        if backend == "native" and device.type == "cuda" and _NATIVE_HAS_CUDA:
            names += [f"native:{family}" for family in CUDA_CONV_FAMILIES]
        else:
            names.append(backend)
    return [name for name in names if _unavailable_reason(split_choice(name)[0], device) is None]


def _candidates(device: torch.device, requested: Optional[Sequence[str]]) -> List[str]:
    if requested is None:
        return default_candidates(device)
    names = list(requested)
    unknown = [name for name in names if not is_choice(name)]
    if unknown:
        raise ValueError(f"unknown candidate backend(s) {unknown}; expected some of {BACKENDS}, or 'native:<family>' "
                         f"with a family of {CUDA_CONV_FAMILIES} on CUDA")
    families = [name for name in names if split_choice(name)[1] is not None]
    if families and device.type != "cuda":
        raise ValueError(f"candidates {families} name CUDA convolution families, and the input is on {device.type}")
    return [name for name in names if _unavailable_reason(split_choice(name)[0], device) is None]


def family_runs(family: str, conv: nn.Conv2d, weight: Tensor, x: Tensor, residual: Optional[Tensor],
                 relu: bool) -> bool:
    """Whether the native backend, preferring `family`, runs this layer on
    that family (a preference the family cannot meet falls back to another
    convolution, which is measured under its own name)."""
    with ops.cuda_conv_family(family):
        chosen = ops.cuda_conv_algorithm(x, weight, residual, conv.stride, conv.padding, conv.dilation,
                                         conv.groups, relu=relu)
    return chosen.startswith(_FAMILY_NAME_PREFIX[family])


def _nan_poisoned(x: Tensor, conv: nn.Conv2d) -> Tuple[Tensor, Tensor]:
    """x with one NaN, placed where the middle output pixel reads it, and
    the outputs that must be NaN because they read it (its receptive field
    in every output channel of its group)."""
    n, c, h, w = x.shape
    at = (n // 2, c // 2) + tuple(
        _read_index(size, conv.kernel_size[d], conv.stride[d], conv.padding[d], conv.dilation[d])
        for d, size in enumerate((h, w)))
    poisoned = x.clone()
    poisoned[at] = float("nan")
    reads = torch.zeros(x.shape, device=x.device, dtype=torch.float32)
    reads[at] = 1
    ones = torch.ones((conv.out_channels, c // conv.groups) + tuple(conv.kernel_size), device=x.device)
    must_be_nan = F.conv2d(reads, ones, None, conv.stride, conv.padding, conv.dilation, conv.groups) > 0
    return poisoned, must_be_nan


def _read_index(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """An input index (along one dimension) that the middle output reads
    through one of its kernel taps (a strided conv skips some inputs), or the
    middle input where its whole window is padding."""
    outputs = (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    first = (outputs // 2) * stride - padding
    for tap in range(kernel):
        if 0 <= first + tap * dilation < size:
            return first + tap * dilation
    return size // 2


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
    each candidate, and pick per layer the fastest whose output is within
    `rtol` (relative norm error; default 1e-4 in fp32, 2e-2 otherwise) of the
    reference backend and which keeps a NaN of the input. Candidates are
    backend names and, on CUDA, "native:<family>" (one convolution family of
    the native backend, see ops.cuda_conv_family); by default
    default_candidates(device). A family is measured only on layers it runs.
    The plan is installed for this process and, with save=True, merged into
    the on-disk cache. Returns {layer key: choice}.
    """
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
    with plans.recording() as recorded, torch.inference_mode():
        model(example_input)
    layers: Dict[str, str] = {}
    if not recorded:
        raise ValueError(f"{type(model).__name__} ran no fused eval layer: tune() plans resnet_fast models")
    seen: Dict[str, Tuple] = {}
    for conv, norm, x, residual, relu in recorded:
        seen.setdefault(plans.layer_key(conv, x, residual, relu), (conv, norm, x, residual, relu))
    failures: Dict[Tuple[str, str], str] = {}
    with torch.inference_mode():
        for key, (conv, norm, x, residual, relu) in seen.items():
            cache = FoldCache()  # fold (and prepack) once, as the model's own layers do
            best = _fastest_right_candidate(names, conv, norm, x, residual, relu, cache, tol, device, repeats,
                                            failures)
            if best is not None:
                layers[key] = best
    _warn_failures(failures)
    key = plans.plan_key(device, dtype)
    plans.install(key, layers)
    if save:
        plans.save(key, layers)
    return layers


def tune_layer(conv: nn.Conv2d, norm: nn.Module, x: Tensor, residual: Optional[Tensor] = None, relu: bool = True,
               candidates: Optional[Sequence[str]] = None, repeats: int = 5,
               rtol: Optional[float] = None) -> Optional[str]:
    """The choice tune() would make for one eval layer, act(norm(conv(x)) +
    residual), or None when no candidate is right; nothing is installed or
    saved. For benchmarks of single layers."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    names = _candidates(x.device, candidates)
    tol = rtol if rtol is not None else (1e-4 if x.dtype == torch.float32 else 2e-2)
    failures: Dict[Tuple[str, str], str] = {}
    with torch.inference_mode():
        choice = _fastest_right_candidate(names, conv, norm, x, residual, relu, FoldCache(), tol, x.device, repeats,
                                          failures)
    _warn_failures(failures)
    return choice


def _warn_failures(failures: Dict[Tuple[str, str], str]) -> None:
    for (name, error), layer in failures.items():
        warnings.warn(f"resnet_fast.tune: candidate {name!r} failed ({error}), first on layer {layer}; it was not "
                      f"chosen where it failed", RuntimeWarning, stacklevel=3)


def _fastest_right_candidate(names: Sequence[str], conv: nn.Conv2d, norm: nn.Module, x: Tensor,
                             residual: Optional[Tensor], relu: bool, cache: FoldCache, tol: float,
                             device: torch.device, repeats: int, failures: Dict[Tuple[str, str], str]) -> Optional[str]:
    """The fastest of `names` that is right on this layer (see the module's
    docstring), or None when none is."""
    def run(name: str, inputs: Tensor = x) -> Tensor:
        return conv_norm_act(conv, norm, inputs, residual, relu, name, cache)

    expected = run("reference").float()
    poisoned, must_be_nan = _nan_poisoned(x, conv)
    best: Optional[Tuple[float, str]] = None
    for name in names:
        family = split_choice(name)[1]
        if family is not None:
            weight = cache.folded(conv, norm)[0].to(x.dtype)
            if not family_runs(family, conv, weight, x, residual, relu):
                continue
        try:
            out = run(name).float()
            keeps_nan = bool(torch.isnan(run(name, poisoned))[must_be_nan].all())
        except RuntimeError as exc:
            first_line = (str(exc).splitlines() or [type(exc).__name__])[0]
            failures.setdefault((name, first_line), plans.layer_key(conv, x, residual, relu))
            continue
        err = ((out - expected).norm() / expected.norm().clamp_min(1e-30)).item()
        if not err <= tol or not keeps_nan:  # `not <=` also rejects a NaN error
            continue
        t = _median_time(lambda: run(name), device, repeats)
        if best is None or t < best[0]:
            best = (t, name)
    return None if best is None else best[1]
