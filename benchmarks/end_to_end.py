"""Whole-model eval forward: resnet_fast against torchvision eager (NCHW and
channels_last) and torch.compile of torchvision's model, same process, same
inputs."""
import copy
from typing import Dict, List

import torch
import torchvision

import resnet_fast

from .timing import compare

BASELINE = "torchvision eager, channels_last"


def _prepare_bn(model: torch.nn.Module) -> None:
    """Non-trivial BN statistics, so that the check of outputs means something."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)


def _compiled(model: torch.nn.Module, device: torch.device):
    if device.type == "cpu":
        # Inductor's CPU path folds BN and prepacks oneDNN weights only when
        # freezing is on: the strongest torch.compile baseline for inference.
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
    return torch.compile(model)


def run(arch: str, batch: int, size: int, dtype: torch.dtype, device: torch.device,
        with_compile: bool, repeats: int) -> List[Dict]:
    torch.manual_seed(0)
    tv = getattr(torchvision.models, arch)()
    _prepare_bn(tv)
    tv = tv.eval().to(device=device, dtype=dtype)
    tv_cl = copy.deepcopy(tv).to(memory_format=torch.channels_last)
    ours = resnet_fast.from_torchvision(tv).eval()
    inputs = [torch.randn(batch, 3, size, size, device=device, dtype=dtype) for _ in range(3)]
    inputs_cl = [x.contiguous(memory_format=torch.channels_last) for x in inputs]

    contenders = {
        "torchvision eager, NCHW": lambda i: tv(inputs[i]),
        BASELINE: lambda i: tv_cl(inputs_cl[i]),
        "resnet_fast": lambda i: ours(inputs_cl[i]),
    }
    if with_compile:
        compiled = _compiled(copy.deepcopy(tv_cl), device)
        contenders["torch.compile(torchvision)" + (" freezing" if device.type == "cpu" else "")] = (
            lambda i: compiled(inputs_cl[i])
        )

    with torch.inference_mode():
        expected = tv(inputs[0]).float()
        errors = {name: _rel_err(fn(0).float(), expected) for name, fn in contenders.items()}
    timings = compare(contenders, list(range(len(inputs))), repeats=repeats, device=device)
    base = timings[BASELINE]["median_s"]
    return [
        {
            "benchmark": "eval_forward",
            "model": arch,
            "batch": batch,
            "image_size": size,
            "dtype": str(dtype).replace("torch.", ""),
            "contender": name,
            "median_ms": t["median_s"] * 1e3,
            "min_ms": t["min_s"] * 1e3,
            "max_ms": t["max_s"] * 1e3,
            "images_per_s": batch / t["median_s"],
            "speedup_vs_eager_channels_last": base / t["median_s"],
            "rel_err_vs_torchvision": errors[name],
        }
        for name, t in timings.items()
    ]


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm()).item()
