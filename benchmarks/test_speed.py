"""The benchmarks as pytest-benchmark tests:

    pytest benchmarks/ --benchmark-only                 # time them (GPU when there is one)
    pytest benchmarks/ --benchmark-disable              # run each once: are they still correct?

Per conv layer of resnet18 (every contender of benchmarks.conv_layers) and
whole-model eval forward (benchmarks.end_to_end's contenders). The device is
CUDA when available, else the CPU; RESNET_FAST_BENCH_BATCH and
RESNET_FAST_BENCH_SIZE override the batch and image size. Every contender's
output is checked against eager PyTorch before it is timed; the timed call
synchronises the device, so a GPU time is the kernel's, not its launch's.
"""
import copy
import os

import pytest
import torch
import torchvision

import resnet_fast
from resnet_fast.testing import randomize_batchnorm_

from .conv_layers import _layer_contenders, conv_shapes
from .end_to_end import BASELINE, kernel_backends

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
BATCH = int(os.environ.get("RESNET_FAST_BENCH_BATCH", 32 if DEVICE.type == "cuda" else 4))
SIZE = int(os.environ.get("RESNET_FAST_BENCH_SIZE", 224 if DEVICE.type == "cuda" else 112))
TOL = dict(rtol=2e-2, atol=2e-2) if DTYPE != torch.float32 else dict(rtol=1e-3, atol=1e-3)

LAYERS = conv_shapes("resnet18", BATCH, SIZE)


def _synchronised(fn, *args):
    def call():
        out = fn(*args)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize(DEVICE)
        return out
    return call


def _layer_id(layer):
    return f"{layer['name']}-{layer['input'][1]}x{layer['input'][2]}-k{layer['kernel']}s{layer['stride']}"


CONTENDER_NAMES = ["eager", "folded", "conv+epilogue", "ours (native, prepacked)", "ours (native, winograd)",
                   "ours (tuned)"] + [
    f"ours ({b})" for b in kernel_backends(DEVICE)]


@pytest.mark.parametrize("contender", CONTENDER_NAMES)
@pytest.mark.parametrize("layer", LAYERS, ids=_layer_id)
def test_conv_layer(benchmark, layer, contender):
    torch.manual_seed(0)
    contenders, x, flops, _, _ = _layer_contenders(layer, DEVICE, DTYPE)
    if contender not in contenders:
        pytest.skip(f"{contender} does not run on {DEVICE}")
    with torch.inference_mode():
        torch.testing.assert_close(contenders[contender](x), contenders["eager"](x), **TOL)
        benchmark.extra_info.update(device=str(DEVICE), dtype=str(DTYPE), batch=BATCH, size=SIZE, flops=flops)
        benchmark.group = f"conv {_layer_id(layer)}"
        benchmark(_synchronised(contenders[contender], x))


def _models(arch):
    torch.manual_seed(0)
    tv = getattr(torchvision.models, arch)()
    randomize_batchnorm_(tv)
    tv = tv.eval().to(device=DEVICE, dtype=DTYPE, memory_format=torch.channels_last)
    models = {BASELINE: tv, "torchvision eager, NCHW": copy.deepcopy(tv).to(memory_format=torch.contiguous_format)}
    for backend in kernel_backends(DEVICE):
        models[f"resnet_fast ({backend})"] = resnet_fast.from_torchvision(tv, backend=backend).eval()
    return models


E2E_CONTENDERS = [BASELINE, "torchvision eager, NCHW"] + [f"resnet_fast ({b})" for b in kernel_backends(DEVICE)]


@pytest.mark.parametrize("contender", E2E_CONTENDERS)
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_eval_forward(benchmark, arch, contender):
    models = _models(arch)
    x = torch.randn(BATCH, 3, SIZE, SIZE, device=DEVICE, dtype=DTYPE).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        expected = models[BASELINE](x).float()
        out = models[contender](x).float()
        assert ((out - expected).norm() / expected.norm()).item() < (1e-4 if DTYPE == torch.float32 else 2e-2)
        benchmark.extra_info.update(device=str(DEVICE), dtype=str(DTYPE), batch=BATCH, size=SIZE)
        benchmark.group = f"eval {arch}"
        benchmark(_synchronised(models[contender], x))
