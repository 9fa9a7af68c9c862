"""Timing helpers shared by the benchmarks: medians over repeated runs after
warm-up, contenders interleaved round-robin on the same rotating inputs."""
import ctypes
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

import resnet_fast


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _resident_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


def cpu_peak_rise_mb(fn: Callable[[object], object], x: object) -> Optional[float]:
    """How far resident memory rises above its level before the call while
    fn(x) runs, in MiB (Linux: the kernel's high-water mark, reset through
    /proc/self/clear_refs; memory the allocators hold free is handed back
    first, glibc's and the activation memory resnet_fast keeps between CPU
    forwards, so that it cannot hide a rise). None where that is unavailable."""
    try:
        resnet_fast.empty_cpu_cache()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _resident_kb("VmRSS")
        fn(x)
        return (_resident_kb("VmHWM") - before) / 1024
    except (OSError, AttributeError):  # not Linux, or a libc without malloc_trim
        return None


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
    drift in machine load affects all of them alike. On the CPU each timed
    call comes right after an untimed one of the same contender on the same
    input: glibc's allocator hands memory back to the system after a
    contender that frees much of it (eager PyTorch), and whichever contender
    ran next paid for taking it back (resnet50 in bfloat16 at batch 16: some
    8,600 page faults a call, for resnet_fast or torch.compile alike,
    whichever followed eager), so each is timed as its own calls leave the
    allocator, as when a model serves call after call. `grad` keeps autograd
    on (training steps). The peak memory of each contender is recorded too:
    on a GPU the allocator's peak in its first run, on the CPU how far
    resident memory rises during its last warm-up run (cpu_peak_rise_mb).
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
                if device.type == "cpu" and i == warmup - 1:
                    rise = cpu_peak_rise_mb(fn, x)
                    if rise is not None:
                        peak_mb[name] = rise
                    continue
                if device.type == "cpu" and i >= warmup:
                    fn(x)  # untimed: see the docstring
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
