"""One training step (forward, backward, SGD update) of a whole model:
resnet_fast on each kernel backend against torchvision eager with
channels_last and, on request, torch.compile of torchvision's model (its
forward and backward compiled; the SGD update eager for every contender),
on the same inputs, each starting from the same weights."""
import copy
from typing import Dict, List

import torch
import torch.nn.functional as F
import torchvision

import resnet_fast

from .end_to_end import compile_fixed_shape, kernel_backends
from .timing import compare

BASELINE = "torchvision eager, channels_last"


def _step(model, optimizer, x, y):
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    return loss


COMPILED = "torch.compile(torchvision)"


def run(arch: str, batch: int, size: int, dtype: torch.dtype, device: torch.device, repeats: int,
        flops_per_image: float, ceiling: Dict, with_compile: bool = False) -> List[Dict]:
    torch.manual_seed(0)
    tv = getattr(torchvision.models, arch)().to(device=device, dtype=dtype, memory_format=torch.channels_last)
    models = {BASELINE: tv}
    for backend in kernel_backends(device):
        models[f"resnet_fast ({backend})"] = resnet_fast.from_torchvision(copy.deepcopy(tv), backend=backend)
    if with_compile:
        # Compiled on its first step below (the loss check), outside the timing.
        models[COMPILED] = compile_fixed_shape(copy.deepcopy(tv), device)
    optimizers = {name: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for name, m in models.items()}
    inputs = [(torch.randn(batch, 3, size, size, device=device, dtype=dtype).contiguous(
        memory_format=torch.channels_last), torch.randint(0, 1000, (batch,), device=device)) for _ in range(2)]
    # The first step from identical weights: the losses must agree.
    losses = {name: _step(m, optimizers[name], *inputs[0]).item() for name, m in models.items()}
    contenders = {name: (lambda i, name=name: _step(models[name], optimizers[name], *inputs[i]))
                  for name in models}
    timings = compare(contenders, [0, 1], device=device, repeats=repeats, grad=True)
    base = timings[BASELINE]["median_s"]
    rows = []
    for name, t in timings.items():
        tflops = 3 * flops_per_image * batch / t["median_s"] / 1e12  # backward ~ 2x forward
        rows.append({
            "benchmark": "train_step", "model": arch, "batch": batch, "image_size": size,
            "dtype": str(dtype).replace("torch.", ""), "contender": name,
            "median_ms": t["median_s"] * 1e3, "images_per_s": batch / t["median_s"],
            "speedup_vs_eager_channels_last": base / t["median_s"],
            "first_loss_diff_vs_torchvision": abs(losses[name] - losses[BASELINE]) / abs(losses[BASELINE]),
            "tflops": tflops, "fraction_of_matmul_peak": tflops / ceiling["matmul_tflops"],
            **({"peak_mem_mb": t["peak_mem_mb"]} if "peak_mem_mb" in t else {}),
        })
    return rows
