"""resnet_fast.tune(): measure each fused eval layer of a model on every
candidate backend, keep the fastest one whose output is right, and remember
the choice (resnet_fast.plans stores and looks the plans up).

    plan = resnet_fast.tune(model.eval(), example_input)   # measures, saves, installs
    model(x)                                                # backend=None layers use the plan
"""
import statistics
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from . import plans
from .backends import BACKENDS, _unavailable_reason, triton_interpreted
from .layers import FoldCache, conv_norm_act


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
    key = plans.plan_key(device, dtype)
    plans.install(key, layers)
    if save:
        plans.save(key, layers)
    return layers

