"""Per-layer: every distinct conv (+BN, +ReLU, +residual) of a ResNet, run
the ways that matter:

  eager                     conv, BatchNorm, (add), ReLU as torchvision runs them
  folded                    aten conv with BN folded into weight and bias, then one (add +) ReLU
  ours (native|triton)      resnet_fast.ops.conv_bias_act on each kernel backend of the device
                            (the Triton one with the weight in its GEMM layout, as a model's
                            folded-weight cache holds it)
  ours (native, cutlass sm90|cutlass sm80|cudnn)
                            on CUDA, the native op with its convolution forced to one family
                            of the implicit GEMM (where it runs the layer) or to cuDNN + our
                            epilogue (RESNET_FAST_CUDA_CONV; "ours (native)" picks by itself)
  conv+epilogue             aten conv, then resnet_fast.ops.bias_act (our separate epilogue)
  cudnn fused               on CUDA, cuDNN's own fused conv + bias (+ residual) + ReLU
                            (torch.cudnn_convolution_relu / _add_relu), where cuDNN runs it
  ours (native, prepacked)  the native op with the weight prepacked for oneDNN (CPU only)
  ours (native, winograd)   ops.conv3x3_winograd_bias_act, Winograd's F(4x4, 3x3), on every
                            3x3 stride-1 layer (CPU float32; the models take it where
                            ops.cpu_conv_algorithm says so)
  ours (tuned)              the layer as a model tuned by resnet_fast.tune() runs it: the
                            fastest right candidate (on CUDA: each convolution family of the
                            native op, Triton, the reference), chosen in a short tuning run of
                            its own before the timing; the choice is in the row

On the CPU these are the candidate implementations of conv_bias_act; the
kernel uses whichever this measures fastest.
"""
import os
from typing import Callable, Dict, Iterator, List

import torch
import torch.nn.functional as F
import torchvision

from resnet_fast import ops, tuning
from resnet_fast.folding import FoldCache
from resnet_fast.layers import conv_norm_act

from .end_to_end import kernel_backends
from .timing import compare


def conv_shapes(arch: str, batch: int, size: int) -> List[Dict]:
    """Distinct (conv, residual, relu) layers of torchvision's `arch` with
    their input shapes at `batch`, found by running it once on one image."""
    model = getattr(torchvision.models, arch)().eval()
    seen, layers = set(), []

    def hook(name):
        def record(module, args, _out):
            residual = name.endswith(".conv3") or (name.endswith(".conv2") and "Basic" in type_of[name])
            relu = not name.endswith("downsample.0")
            key = ((batch,) + tuple(args[0].shape[1:]), module.out_channels, module.kernel_size[0], module.stride[0],
                   module.padding[0], module.dilation[0], module.groups, residual, relu)
            if key not in seen:
                seen.add(key)
                layers.append(dict(zip(
                    ("input", "out_channels", "kernel", "stride", "padding", "dilation", "groups", "residual", "relu"),
                    key)) | {"name": name})
        return record

    type_of = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            block = name.rsplit(".", 1)[0]
            type_of[name] = type(model.get_submodule(block)).__name__ if "." in name else "stem"
            module.register_forward_hook(hook(name))
    with torch.no_grad():
        model(torch.randn(1, 3, size, size))
    return layers


def _with_cuda_conv(algorithm: str, fn: Callable) -> Callable:
    """fn with RESNET_FAST_CUDA_CONV set to algorithm while it runs."""
    def run(x):
        saved = os.environ.get("RESNET_FAST_CUDA_CONV")
        os.environ["RESNET_FAST_CUDA_CONV"] = algorithm
        try:
            return fn(x)
        finally:
            if saved is None:
                del os.environ["RESNET_FAST_CUDA_CONV"]
            else:
                os.environ["RESNET_FAST_CUDA_CONV"] = saved
    return run


def _cuda_conv_choice(x, weight, residual, args) -> str:
    """The convolution the native CUDA op picks by itself ("cutlass sm80 (...)"
    or "cudnn: why"), whatever RESNET_FAST_CUDA_CONV says now."""
    query = lambda x: ops.cuda_conv_algorithm(x, weight, residual, **args)  # noqa: E731
    return _with_cuda_conv("auto", query)(x)


def _cudnn_fused(x, weight, bias, residual, relu, args):
    """cuDNN's own fused conv + bias (+ residual) + ReLU for this layer, or
    None where there is none: not CUDA, no ReLU, or cuDNN refuses the layer
    (its runtime fusion does not cover every dtype and shape)."""
    if x.device.type != "cuda" or not relu:
        return None
    pair = lambda v: [v, v] if isinstance(v, int) else list(v)  # noqa: E731
    geometry = (pair(args["stride"]), pair(args["padding"]), pair(args["dilation"]), args["groups"])
    fused_bias = bias.to(x.dtype)
    if residual is None:
        def fused(x):
            return torch.cudnn_convolution_relu(x, weight, fused_bias, *geometry)
    else:
        def fused(x):
            return torch.cudnn_convolution_add_relu(x, weight, residual, 1.0, fused_bias, *geometry)
    try:
        with torch.no_grad():
            fused(x)
        torch.cuda.synchronize(x.device)
    except RuntimeError:
        return None
    return fused


def _layer_contenders(layer: Dict, device: torch.device, dtype: torch.dtype):
    n, c, h, w = layer["input"]
    k, r, s, p, d, g = (layer[key] for key in ("out_channels", "kernel", "stride", "padding", "dilation", "groups"))
    conv = torch.nn.Conv2d(c, k, r, s, p, d, g, bias=False)
    bn = torch.nn.BatchNorm2d(k).eval()
    with torch.no_grad():
        bn.running_mean.normal_(0, 0.1), bn.running_var.uniform_(0.5, 2), bn.weight.uniform_(0.5, 1.5)
    conv, bn = (m.to(device=device, dtype=dtype, memory_format=torch.channels_last) for m in (conv, bn))
    x = torch.randn(n, c, h, w, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out_shape = conv(x).shape
    residual = (torch.randn(out_shape, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
                if layer["residual"] else None)
    relu = layer["relu"]
    weight, bias = ops.fold_bn(conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
    weight = weight.detach().contiguous(memory_format=torch.channels_last)
    bias = bias.detach()
    args = dict(stride=s, padding=p, dilation=d, groups=g)

    def eager(x):
        y = bn(conv(x))
        if residual is not None:
            y = y + residual
        return torch.relu(y) if relu else y

    def folded(x):
        y = F.conv2d(x, weight, bias, **args)
        if residual is not None:
            return torch.relu_(y.add_(residual)) if relu else y.add_(residual)
        return torch.relu_(y) if relu else y

    contenders = {"eager": eager, "folded": folded}
    gemm_weight = ops.gemm_layout_weight(weight)
    for backend in kernel_backends(device):
        contenders[f"ours ({backend})"] = lambda x, backend=backend: ops.conv_bias_act(
            x, gemm_weight if backend == "triton" else weight, bias, residual, relu=relu, backend=backend, **args)
    cuda_conv = None
    if device.type == "cuda" and "native" in kernel_backends(device):
        native = contenders["ours (native)"]
        cuda_conv = _cuda_conv_choice(x, weight, residual, args)
        for family in ("cutlass_sm90", "cutlass_sm80"):
            if tuning.family_runs(family, conv, weight, x, residual, relu):
                contenders[f"ours (native, {family.replace('_', ' ')})"] = _with_cuda_conv(family, native)
        contenders["ours (native, cudnn)"] = _with_cuda_conv("cudnn", native)
    contenders["conv+epilogue"] = lambda x: ops.bias_act(F.conv2d(x, weight, None, **args), bias, residual, relu,
                                                         "native")
    fused = _cudnn_fused(x, weight, bias, residual, relu, args)
    if fused is not None:
        contenders["cudnn fused"] = fused
    # What a model tuned by resnet_fast.tune() runs for this layer, timed as
    # the model runs it (its own folded-weight cache).
    tuned = tuning.tune_layer(conv, bn, x, residual, relu, repeats=3)
    if tuned is not None:
        cache = FoldCache()
        contenders["ours (tuned)"] = lambda x: conv_norm_act(conv, bn, x, residual, relu, tuned, cache)
    packed = ops.prepack_conv_weight(weight, s, p, d, g, x.shape) if device.type == "cpu" else None
    if packed is not None:
        contenders["ours (native, prepacked)"] = lambda x: ops.conv_bias_act(x, packed, bias, residual, relu=relu,
                                                                            **args)
    transformed = (ops.winograd_weight(weight) if device.type == "cpu" and (r, s, p, d, g) == (3, 1, 1, 1, 1)
                   else None)
    if transformed is not None:
        contenders["ours (native, winograd)"] = lambda x: ops.conv3x3_winograd_bias_act(
            x, weight, transformed, bias, residual, relu)
    flops = 2 * out_shape.numel() * c // g * r * r
    return contenders, x, flops, cuda_conv, tuned


def run(arch: str, batch: int, size: int, dtype: torch.dtype, device: torch.device,
        repeats: int) -> Iterator[List[Dict]]:
    """The rows of each layer in turn, as soon as it is measured."""
    torch.manual_seed(0)
    for layer in conv_shapes(arch, batch, size):
        rows = []
        contenders, x, flops, cuda_conv, tuned = _layer_contenders(layer, device, dtype)
        timings = compare(contenders, [x], repeats=repeats, device=device)
        base = timings["eager"]["median_s"]
        for name, t in timings.items():
            rows.append({
                "benchmark": "conv_layer",
                "model": arch,
                "layer": layer["name"],
                "shape": f"{layer['input'][1]}x{layer['input'][2]}x{layer['input'][3]} -> {layer['out_channels']}, "
                         f"{layer['kernel']}x{layer['kernel']}/{layer['stride']}"
                         + (f" g{layer['groups']}" if layer["groups"] > 1 else "")
                         + (" +res" if layer["residual"] else "") + ("" if layer["relu"] else " no-relu"),
                "batch": batch,
                "dtype": str(dtype).replace("torch.", ""),
                "contender": name,
                "median_ms": t["median_s"] * 1e3,
                "tflops": flops / t["median_s"] / 1e12,
                "speedup_vs_eager": base / t["median_s"],
                # What "ours (native)" ran on CUDA: which implicit-GEMM kernel, or cuDNN and why.
                **({"cuda_conv": cuda_conv} if cuda_conv is not None and name == "ours (native)" else {}),
                # What tune() chose for "ours (tuned)": a backend, or "native:<CUDA convolution family>".
                **({"choice": tuned} if name == "ours (tuned)" else {}),
            })
        yield rows
