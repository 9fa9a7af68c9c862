"""Timing helpers shared by the benchmarks: medians over repeated runs after
warm-up, contenders interleaved round-robin on the same rotating inputs."""
import statistics
import time
from typing import Callable, Dict, List, Sequence

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compare(
    contenders: Dict[str, Callable[[object], object]],
    inputs: Sequence[object],
    device: torch.device,
    warmup: int = 2,
    repeats: int = 7,
    grad: bool = False,
) -> Dict[str, Dict[str, float]]:
    """Median and spread of seconds per call, for each contender.

    Every repetition runs each contender once, in turn, on the next item of
    `inputs` (rotated so that no contender is flattered by a warm cache), so
    drift in machine load affects all of them alike. `grad` keeps autograd
    on (training steps). On a GPU the peak memory of each contender's
    first run is recorded too.
    """
    times: Dict[str, List[float]] = {name: [] for name in contenders}
    peak_mb: Dict[str, float] = {}
    with torch.enable_grad() if grad else torch.inference_mode():
        for i in range(warmup + repeats):
            x = inputs[i % len(inputs)]
            for name, fn in contenders.items():
                _sync(device)
                if device.type == "cuda" and i == 0:
                    torch.cuda.reset_peak_memory_stats(device)
                start = time.perf_counter()
                fn(x)
                _sync(device)
                if device.type == "cuda" and i == 0:
                    peak_mb[name] = torch.cuda.max_memory_allocated(device) / 2**20
                if i >= warmup:
                    times[name].append(time.perf_counter() - start)
    return {
        name: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "runs": len(t),
               **({"peak_mem_mb": peak_mb[name]} if name in peak_mb else {})}
        for name, t in times.items()
    }
