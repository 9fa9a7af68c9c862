"""Every row of docs/rejected_inputs.md: the input is rejected with that
error type and a message containing that excerpt. The table in the docs is
generated from CASES (`python tests/test_rejected_inputs.py` rewrites it),
and a test checks that the two agree.
"""
import os
import tempfile
from typing import Callable, NamedTuple

import pytest
import torch
import torchvision
from torch import nn

import resnet_fast
from resnet_fast import ops

DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "rejected_inputs.md")
BEGIN, END = "<!-- rejected-inputs:begin -->", "<!-- rejected-inputs:end -->"


class Case(NamedTuple):
    function: str
    given: str
    error: type
    excerpt: str
    call: Callable[[], object]


def x4(*shape, **kwargs):
    return torch.randn(*(shape or (2, 8, 9, 11)), **kwargs)


def conv(**overrides):
    """conv_bias_act on a valid 3x3 call (8 -> 12 channels), with overrides."""
    call = dict(x=x4(), weight=torch.randn(12, 8, 3, 3), bias=torch.randn(12), padding=1)
    call.update(overrides)
    return lambda: ops.conv_bias_act(**call)


def conv_into_residual(**overrides):
    """conv_bias_act_ on a valid 3x3 call (8 -> 12 channels) writing into an
    NHWC residual, with overrides."""
    call = dict(residual=x4(2, 12, 9, 11).contiguous(memory_format=torch.channels_last), x=x4(),
                weight=torch.randn(12, 8, 3, 3), bias=torch.randn(12), padding=1)
    call.update(overrides)

    def run():
        with torch.no_grad():
            return ops.conv_bias_act_(**call)
    return run


def winograd(**overrides):
    """conv3x3_winograd_bias_act on a valid call (8 -> 12 channels), with overrides."""
    weight = torch.randn(12, 8, 3, 3)
    call = dict(x=x4(), weight=weight, weight_winograd=torch.randn(36, 8, 12), bias=torch.randn(12))
    call.update(overrides)

    def run():
        with torch.no_grad():
            return ops.conv3x3_winograd_bias_act(**call)
    return run


def bn(**overrides):
    call = dict(x=x4(), weight=torch.rand(8) + 0.5, bias=torch.randn(8))
    call.update(overrides)
    return lambda: ops.bn_act_train(**call)


def bias_act(**overrides):
    call = dict(y=x4(), bias=torch.randn(8))
    call.update(overrides)
    return lambda: ops.bias_act(**call)


def fold(**overrides):
    call = dict(weight=torch.randn(12, 8, 3, 3), gamma=torch.rand(12), beta=torch.randn(12),
                mean=torch.randn(12), var=torch.rand(12) + 0.5)
    call.update(overrides)
    return lambda: ops.fold_bn(**call)


def model_input(x):
    return lambda: resnet_fast.resnet18(num_classes=4).eval()(x)


def set_backend(value):
    def call():
        resnet_fast.resnet18(num_classes=4).backend = value
    return call


def weights_file(name: str, write: Callable[[str], None]):
    """read_state_dict on a file that write(path) makes in a fresh folder."""
    def call():
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, name)
            write(path)
            return resnet_fast.read_state_dict(path)
    return call


def _truncated_pth(path):
    torch.save(torchvision.models.resnet18(num_classes=4).state_dict(), path)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _flipped_pth(path):
    torch.save(torchvision.models.resnet18(num_classes=4).state_dict(), path)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))


def _flipped_safetensors(path):
    from safetensors.torch import save_file

    save_file({"fc.weight": torch.randn(4, 8)}, path)
    data = bytearray(open(path, "rb").read())
    data[8:12] = b"\xff\xff\xff\xff"  # garbage inside the JSON header
    open(path, "wb").write(bytes(data))


class _Anything:  # a class outside the weights_only allowlist
    pass


F32, META = torch.float32, "meta"
CASES = [
    # ops.conv_bias_act
    Case("ops.conv_bias_act", "x not a tensor", TypeError, "x must be a Tensor", conv(x=[[1.0]])),
    Case("ops.conv_bias_act", "x 3-D", ValueError, "x must be 4-D (N, C, H, W), got 3-D", conv(x=torch.randn(8, 9, 11))),
    Case("ops.conv_bias_act", "x int64", TypeError, "x must be float32, float16 or bfloat16, got torch.int64",
         conv(x=torch.ones(2, 8, 9, 11, dtype=torch.int64))),
    Case("ops.conv_bias_act", "x float64", TypeError, "x must be float32, float16 or bfloat16, got torch.float64",
         conv(x=x4(dtype=torch.float64))),
    Case("ops.conv_bias_act", "x sparse", ValueError, "x must be a dense (strided) tensor",
         conv(x=x4().to_sparse())),
    Case("ops.conv_bias_act", "empty image", ValueError, "x is empty (shape (2, 8, 0, 11))", conv(x=x4(2, 8, 0, 11))),
    Case("ops.conv_bias_act", "channel count differs from weight", ValueError,
         "input has 5 channels but weight expects 8", conv(x=x4(2, 5, 9, 11))),
    Case("ops.conv_bias_act", "weight 3-D", ValueError, "weight must be a 4-D tensor", conv(weight=torch.randn(12, 8, 3))),
    Case("ops.conv_bias_act", "weight dtype differs from x", TypeError, "weight has dtype torch.bfloat16",
         conv(weight=torch.randn(12, 8, 3, 3, dtype=torch.bfloat16))),
    Case("ops.conv_bias_act", "weight on another device", ValueError, "weight is on meta but the input is on cpu",
         conv(weight=torch.randn(12, 8, 3, 3, device=META))),
    Case("ops.conv_bias_act", "groups not dividing the channels", ValueError, "groups=3 must divide the input channels",
         conv(groups=3)),
    Case("ops.conv_bias_act", "groups=0", ValueError, "groups=0 must divide", conv(groups=0)),
    Case("ops.conv_bias_act", "bias of the wrong length", ValueError, "bias has shape (11,), expected (12,)",
         conv(bias=torch.randn(11))),
    Case("ops.conv_bias_act", "bias integer", TypeError, "bias must be a floating-point tensor",
         conv(bias=torch.ones(12, dtype=torch.int32))),
    Case("ops.conv_bias_act", "bias None", TypeError, "bias must be a Tensor, got NoneType", conv(bias=None)),
    Case("ops.conv_bias_act", "residual of another shape", ValueError,
         "residual has shape (2, 12, 9, 10), expected (2, 12, 9, 11)", conv(residual=x4(2, 12, 9, 10))),
    Case("ops.conv_bias_act", "residual dtype differs from x", TypeError, "residual has dtype torch.float16",
         conv(residual=x4(2, 12, 9, 11, dtype=torch.float16))),
    Case("ops.conv_bias_act", "stride 0", ValueError, "stride and dilation must be >= 1", conv(stride=0)),
    Case("ops.conv_bias_act", "negative padding", ValueError, "padding >= 0", conv(padding=-1)),
    Case("ops.conv_bias_act", "stride of 3 values", ValueError, "stride must be an int or a pair of ints",
         conv(stride=(1, 2, 3))),
    Case("ops.conv_bias_act", "input smaller than the kernel", ValueError, "is smaller than the (dilated) kernel",
         conv(x=x4(2, 8, 1, 1), padding=0)),
    Case("ops.conv_bias_act", "relu not a bool", TypeError, "relu must be a bool, got str", conv(relu="yes")),
    Case("ops.conv_bias_act", "unknown backend", ValueError, "unknown backend 'cudnn'", conv(backend="cudnn")),
    Case("ops.conv_bias_act", "backend that cannot run on the device", RuntimeError,
         "backend 'native' is not available on meta",
         conv(x=x4(device=META), weight=torch.randn(12, 8, 3, 3, device=META), bias=torch.randn(12, device=META),
              backend="native")),
    Case("ops.conv_bias_act", "prepacked weight with bfloat16 input", RuntimeError,
         "weight has dtype Float but the input has BFloat16",
         lambda: ops.conv_bias_act(x4(dtype=torch.bfloat16), torch.randn(12, 8, 3, 3).to_mkldnn(),
                                   torch.randn(12), padding=1)),
    # ops.conv_bias_act_ (its other arguments are checked as conv_bias_act's)
    Case("ops.conv_bias_act_", "residual None", TypeError, "residual must be a Tensor (conv_bias_act_ writes into it)",
         conv_into_residual(residual=None)),
    Case("ops.conv_bias_act_", "residual not channels_last", ValueError,
         "writes into residual, which must be channels_last contiguous", conv_into_residual(residual=x4(2, 12, 9, 11))),
    Case("ops.conv_bias_act_", "residual of another shape", ValueError,
         "residual has shape (2, 12, 9, 10), expected (2, 12, 9, 11)",
         conv_into_residual(residual=x4(2, 12, 9, 10).contiguous(memory_format=torch.channels_last))),
    Case("ops.conv_bias_act_", "residual sharing memory with x", ValueError, "which shares memory with x",
         (lambda shared: conv_into_residual(residual=shared, x=shared, weight=torch.randn(8, 8, 3, 3),
                                            bias=torch.randn(8)))(x4().contiguous(memory_format=torch.channels_last))),
    Case("ops.conv_bias_act_", "residual sharing memory with x, prepacked weight", ValueError,
         "which shares memory with x",
         (lambda shared: conv_into_residual(residual=shared, x=shared, weight=torch.randn(8, 8, 3, 3).to_mkldnn(),
                                            bias=torch.randn(8)))(x4().contiguous(memory_format=torch.channels_last))),
    Case("ops.conv_bias_act_", "a tensor that needs a gradient", RuntimeError, "is for inference and has no gradient",
         lambda: ops.conv_bias_act_(x4(2, 12, 9, 11).contiguous(memory_format=torch.channels_last), x4(),
                                    torch.randn(12, 8, 3, 3, requires_grad=True), torch.randn(12), padding=1)),
    # ops.bias_act
    Case("ops.bias_act", "y 3-D", ValueError, "y must be 4-D", bias_act(y=torch.randn(8, 9, 11))),
    Case("ops.bias_act", "bias of the wrong length", ValueError, "bias has shape (7,), expected (8,)",
         bias_act(bias=torch.randn(7))),
    Case("ops.bias_act", "residual of another shape", ValueError, "residual has shape",
         bias_act(residual=x4(2, 8, 9, 10))),
    Case("ops.bias_act", "backend='triton'", NotImplementedError, "bias_act has no Triton kernel",
         bias_act(backend="triton")),
    # ops.bn_act_train
    Case("ops.bn_act_train", "one value per channel", ValueError, "needs more than 1 value per channel",
         bn(x=x4(1, 8, 1, 1))),
    Case("ops.bn_act_train", "weight of the wrong length", ValueError, "weight has shape (5,), expected (8,)",
         bn(weight=torch.rand(5))),
    Case("ops.bn_act_train", "running_mean without running_var", ValueError, "both running_mean and running_var",
         bn(running_mean=torch.zeros(8))),
    Case("ops.bn_act_train", "running_var of the wrong length", ValueError, "running_var has shape (7,)",
         bn(running_mean=torch.zeros(8), running_var=torch.ones(7))),
    Case("ops.bn_act_train", "residual of another shape", ValueError, "residual has shape",
         bn(residual=x4(2, 8, 9, 10))),
    Case("ops.bn_act_train", "eps=0", ValueError, "eps must be a positive finite number, got 0", bn(eps=0.0)),
    Case("ops.bn_act_train", "eps=-1e-5", ValueError, "eps must be a positive finite number", bn(eps=-1e-5)),
    Case("ops.bn_act_train", "momentum=1.5", ValueError, "momentum must be in [0, 1], got 1.5", bn(momentum=1.5)),
    Case("ops.bn_act_train", "momentum=None", TypeError, "momentum must be a float in [0, 1], got NoneType",
         bn(momentum=None)),
    # ops.fold_bn
    Case("ops.fold_bn", "weight 2-D", ValueError, "weight must be 4-D", fold(weight=torch.randn(12, 8))),
    Case("ops.fold_bn", "weight integer", TypeError, "weight must be a floating-point tensor",
         fold(weight=torch.ones(12, 8, 3, 3, dtype=torch.int64))),
    Case("ops.fold_bn", "var of the wrong length", ValueError, "var has shape (11,), expected (12,)",
         fold(var=torch.rand(11))),
    Case("ops.fold_bn", "mean None", TypeError, "mean must be a Tensor", fold(mean=None)),
    Case("ops.fold_bn", "eps=0", ValueError, "eps must be a positive finite number", fold(eps=0.0)),
    # ops.prepack_conv_weight
    Case("ops.prepack_conv_weight", "groups not dividing the output channels", ValueError,
         "groups=5 must be a positive int dividing the output channels (12)",
         lambda: ops.prepack_conv_weight(torch.randn(12, 8, 3, 3), 1, 1, 1, 5)),
    Case("ops.prepack_conv_weight", "weight 2-D", ValueError, "weight must be a 4-D tensor",
         lambda: ops.prepack_conv_weight(torch.randn(12, 8), 1, 1, 1, 1)),
    # ops.conv3x3_winograd_bias_act
    Case("ops.conv3x3_winograd_bias_act", "weight 1x1", ValueError, "takes a 3x3 weight (K, C, 3, 3), got (12, 8, 1, 1)",
         winograd(weight=torch.randn(12, 8, 1, 1))),
    Case("ops.conv3x3_winograd_bias_act", "x float64", TypeError, "x must be float32, float16 or bfloat16",
         winograd(x=x4(dtype=torch.float64))),
    Case("ops.conv3x3_winograd_bias_act", "bfloat16 operands", ValueError, "runs on CPU float32 tensors",
         winograd(x=x4(dtype=torch.bfloat16), weight=torch.randn(12, 8, 3, 3, dtype=torch.bfloat16),
                  bias=torch.randn(12, dtype=torch.bfloat16))),
    Case("ops.conv3x3_winograd_bias_act", "weight_winograd of the wrong shape", ValueError,
         "weight_winograd must have shape (36, 8, 12)", winograd(weight_winograd=torch.randn(36, 12, 8))),
    Case("ops.conv3x3_winograd_bias_act", "weight_winograd None", TypeError, "weight_winograd must be a Tensor",
         winograd(weight_winograd=None)),
    Case("ops.conv3x3_winograd_bias_act", "residual of the wrong shape", ValueError,
         "residual has shape (2, 12, 9, 10), expected (2, 12, 9, 11)", winograd(residual=x4(2, 12, 9, 10))),
    Case("ops.conv3x3_winograd_bias_act", "x that requires grad (under grad mode)", RuntimeError,
         "is for inference and has no gradient",
         lambda: ops.conv3x3_winograd_bias_act(x4(requires_grad=True), torch.randn(12, 8, 3, 3),
                                               torch.randn(36, 8, 12), torch.randn(12))),
    # ops.max_pool2d_nhwc
    Case("ops.max_pool2d_nhwc", "x 3-D", ValueError, "x must be 4-D (N, C, H, W)",
         lambda: ops.max_pool2d_nhwc(torch.randn(8, 9, 11), 3, 2, 1)),
    Case("ops.max_pool2d_nhwc", "x int64", TypeError, "x must be float32, float16 or bfloat16",
         lambda: ops.max_pool2d_nhwc(torch.ones(2, 8, 9, 11, dtype=torch.int64), 3, 2, 1)),
    Case("ops.max_pool2d_nhwc", "x on the meta device", ValueError, "runs on CPU tensors",
         lambda: ops.max_pool2d_nhwc(x4(device="meta"), 3, 2, 1)),
    Case("ops.max_pool2d_nhwc", "padding over half the kernel", ValueError,
         "padding (2, 2) must be at most half the kernel size (3, 3)", lambda: ops.max_pool2d_nhwc(x4(), 3, 2, 2)),
    Case("ops.max_pool2d_nhwc", "stride 0", ValueError, "stride must be at least 1, got (0, 0)",
         lambda: ops.max_pool2d_nhwc(x4(), 3, 0, 1)),
    Case("ops.max_pool2d_nhwc", "kernel_size of three ints", ValueError,
         "kernel_size must be an int or a pair of ints, got (3, 3, 3)", lambda: ops.max_pool2d_nhwc(x4(), (3, 3, 3))),
    Case("ops.max_pool2d_nhwc", "window larger than the input", ValueError,
         "input of spatial size (2, 2) is smaller than the (dilated) window (5, 5)",
         lambda: ops.max_pool2d_nhwc(x4(1, 3, 2, 2), 5)),
    Case("ops.max_pool2d_nhwc", "x that requires grad (under grad mode)", RuntimeError,
         "is for inference and has no gradient", lambda: ops.max_pool2d_nhwc(x4(requires_grad=True), 3, 2, 1)),
    Case("ops.max_pool2d_nhwc", "ceil_mode 1", TypeError, "ceil_mode must be a bool",
         lambda: ops.max_pool2d_nhwc(x4(), 3, 2, 1, ceil_mode=1)),
    Case("ops.max_pool2d_nhwc", "out of the wrong shape", ValueError,
         "out must have the result's shape (2, 8, 5, 6), got (2, 8, 5, 5)",
         lambda: ops.max_pool2d_nhwc(x4(), 3, 2, 1, out=x4(2, 8, 5, 5))),
    Case("ops.max_pool2d_nhwc", "out NCHW", ValueError, "out must be channels_last contiguous",
         lambda: ops.max_pool2d_nhwc(x4(), 3, 2, 1, out=torch.empty(2, 8, 5, 6))),
    Case("ops.max_pool2d_nhwc", "out float64", ValueError, "out must be torch.float32 on cpu like x, got torch.float64",
         lambda: ops.max_pool2d_nhwc(x4(), 3, 2, 1, out=x4(2, 8, 5, 6, dtype=torch.float64))),
    Case("ops.max_pool2d_nhwc", "out a list", TypeError, "out must be a Tensor, got list",
         lambda: ops.max_pool2d_nhwc(x4(), 3, 2, 1, out=[0.0])),
    # ops.global_avg_pool_nhwc
    Case("ops.global_avg_pool_nhwc", "x 3-D", ValueError, "x must be 4-D (N, C, H, W)",
         lambda: ops.global_avg_pool_nhwc(torch.randn(8, 9, 11))),
    Case("ops.global_avg_pool_nhwc", "x int64", TypeError, "x must be float32, float16 or bfloat16",
         lambda: ops.global_avg_pool_nhwc(torch.ones(2, 8, 9, 11, dtype=torch.int64))),
    Case("ops.global_avg_pool_nhwc", "x on the meta device", ValueError, "runs on CPU tensors",
         lambda: ops.global_avg_pool_nhwc(x4(device="meta"))),
    Case("ops.global_avg_pool_nhwc", "no pixels", ValueError, "x is empty (shape (2, 8, 0, 11))",
         lambda: ops.global_avg_pool_nhwc(x4(2, 8, 0, 11))),
    Case("ops.global_avg_pool_nhwc", "x that requires grad (under grad mode)", RuntimeError,
         "is for inference and has no gradient", lambda: ops.global_avg_pool_nhwc(x4(requires_grad=True))),
    # ops.conv3x3_winograd_bias_act_
    Case("ops.conv3x3_winograd_bias_act_", "residual NCHW", ValueError, "must be channels_last contiguous",
         lambda: ops.conv3x3_winograd_bias_act_(x4(2, 12, 9, 11), x4(), torch.randn(12, 8, 3, 3),
                                                torch.randn(36, 8, 12), torch.randn(12))),
    Case("ops.conv3x3_winograd_bias_act_", "residual that is x", ValueError, "shares memory with x",
         lambda: ops.conv3x3_winograd_bias_act_(*[x4(2, 8, 9, 11).contiguous(memory_format=torch.channels_last)] * 2,
                                                torch.randn(8, 8, 3, 3), torch.randn(36, 8, 8), torch.randn(8))),
    Case("ops.conv3x3_winograd_bias_act_", "residual None", TypeError, "residual must be a Tensor",
         lambda: ops.conv3x3_winograd_bias_act_(None, x4(), torch.randn(12, 8, 3, 3), torch.randn(36, 8, 12),
                                                torch.randn(12))),
    # ops.winograd_weight
    Case("ops.winograd_weight", "weight 2-D", ValueError, "weight must be a 4-D tensor",
         lambda: ops.winograd_weight(torch.randn(12, 8))),
    # ops.cpu_conv_algorithm
    Case("ops.cpu_conv_algorithm", "x not a tensor", TypeError, "x and weight must be Tensors",
         lambda: ops.cpu_conv_algorithm([1.0], torch.randn(12, 8, 3, 3))),
    Case("ops.cpu_conv_algorithm", "stride of three ints", ValueError, "stride must be an int or a pair of ints",
         lambda: ops.cpu_conv_algorithm(x4(), torch.randn(12, 8, 3, 3), stride=(1, 1, 1))),
    # ops.cpu_compute_dtype
    Case("ops.cpu_compute_dtype", "dtype given as a string", TypeError, "dtype must be a torch.dtype",
         lambda: ops.cpu_compute_dtype("bfloat16")),
    # ops.gemm_layout_weight
    Case("ops.gemm_layout_weight", "weight 3-D", ValueError, "weight must be a 4-D tensor",
         lambda: ops.gemm_layout_weight(torch.randn(12, 8, 3))),
    # ops.cuda_conv_family (refused on entering the block)
    Case("ops.cuda_conv_family", "an unknown family", ValueError,
         "unknown CUDA convolution family 'fastest'; expected cutlass_sm90, cutlass_sm80, cudnn, cudnn_fused or None",
         lambda: ops.cuda_conv_family("fastest").__enter__()),
    Case("ops.cuda_conv_family", "a family that is not a str", TypeError, "must be a str or None",
         lambda: ops.cuda_conv_family(90).__enter__()),
    # builders and ResNet(...)
    Case("resnet18(...) etc.", "num_classes=0", ValueError, "num_classes must be a positive int, got 0",
         lambda: resnet_fast.resnet18(num_classes=0)),
    Case("resnet18(...) etc.", "backend='cudnn'", ValueError, "unknown backend 'cudnn'",
         lambda: resnet_fast.resnet18(backend="cudnn")),
    Case("resnet18(...) etc.", "weights=3", TypeError,
         "weights must be a torchvision weights enum or its name, a URL, a file path or a state_dict",
         lambda: resnet_fast.resnet18(weights=3)),
    Case("resnet18(...) etc.", "weights name not in the network's table", ValueError,
         "ResNet18_Weights has no weights named 'IMAGENET1K_V9'", lambda: resnet_fast.resnet18(weights="IMAGENET1K_V9")),
    Case("resnet18(...) etc.", "weights of another network", ValueError,
         "ResNet18_Weights.DEFAULT are not weights for resnet50: use ResNet50_Weights",
         lambda: resnet_fast.resnet50(weights="ResNet18_Weights.DEFAULT")),
    Case("read_state_dict", "a weights name without a network", ValueError,
         "names weights without saying for which network", lambda: resnet_fast.read_state_dict("DEFAULT")),
    Case("resnext50_32x4d(...)", "groups=4 (the architecture fixes 32)", ValueError,
         "groups=4 conflicts with this architecture's groups=32", lambda: resnet_fast.resnext50_32x4d(groups=4)),
    Case("resnet18(...) etc.", "groups=2 with BasicBlock", ValueError, "BasicBlock only supports groups=1",
         lambda: resnet_fast.resnet18(groups=2)),
    Case("resnet18(...) etc.", "replace_stride_with_dilation with BasicBlock", NotImplementedError,
         "Dilation > 1 not supported in BasicBlock",
         lambda: resnet_fast.resnet18(replace_stride_with_dilation=[False, False, True])),
    Case("ResNet(...)", "layers of 3 counts", ValueError, "layers must be 4 positive block counts",
         lambda: resnet_fast.ResNet(resnet_fast.Bottleneck, [3, 4, 6])),
    Case("ResNet(...)", "a block count of 0", ValueError, "layers must be 4 positive block counts",
         lambda: resnet_fast.ResNet(resnet_fast.Bottleneck, [3, 0, 6, 3])),
    Case("ResNet(...)", "block not a block class", TypeError, "block must be BasicBlock, Bottleneck",
         lambda: resnet_fast.ResNet(nn.Conv2d, [2, 2, 2, 2])),
    Case("ResNet(...)", "width_per_group=0", ValueError, "width_per_group must be a positive int",
         lambda: resnet_fast.ResNet(resnet_fast.Bottleneck, [1, 1, 1, 1], width_per_group=0)),
    Case("ResNet(...)", "replace_stride_with_dilation of 2 values", ValueError,
         "replace_stride_with_dilation should be None or a 3-element tuple",
         lambda: resnet_fast.ResNet(resnet_fast.Bottleneck, [1, 1, 1, 1], replace_stride_with_dilation=[True, True])),
    Case("ResNet(...)", "norm_layer not callable", TypeError, "norm_layer must be callable",
         lambda: resnet_fast.ResNet(resnet_fast.Bottleneck, [1, 1, 1, 1], norm_layer=5)),
    Case("model.backend = ...", "unknown backend", ValueError, "unknown backend 'cudnn'", set_backend("cudnn")),
    Case("from_torchvision", "a model that is not a ResNet", TypeError, "is not a torchvision ResNet",
         lambda: resnet_fast.from_torchvision(nn.Sequential(nn.Conv2d(3, 4, 3)))),
    # model(x) / model.check_input(x)
    Case("model(x)", "x not a tensor", TypeError, "expected a Tensor input, got list", model_input([[1.0]])),
    Case("model(x)", "x 3-D", ValueError, "expected a 4-D input (N, C, H, W), got 3-D",
         model_input(torch.randn(3, 32, 32))),
    Case("model(x)", "x uint8", TypeError, "expected a floating-point input, got torch.uint8",
         model_input(torch.randint(0, 255, (1, 3, 32, 32), dtype=torch.uint8))),
    Case("model(x)", "empty image", ValueError, "x is empty (shape (1, 3, 0, 32))", model_input(torch.randn(1, 3, 0, 32))),
    Case("model(x)", "4 channels for a 3-channel stem", ValueError, "expected input with 3 channels, got 4",
         model_input(torch.randn(1, 4, 32, 32))),
    Case("model(x)", "x on another device", ValueError, "input is on meta but the model is on cpu",
         model_input(torch.randn(1, 3, 32, 32, device=META))),
    Case("model(x)", "x float16, model float32 (no autocast)", TypeError, "does not match the model's torch.float32",
         model_input(torch.randn(1, 3, 32, 32, dtype=torch.float16))),
    Case("model(x)", "x sparse", ValueError, "expected a dense (strided) input",
         model_input(torch.randn(1, 3, 32, 32).to_sparse())),
    # weights
    Case("load_weights", "model not a module", TypeError, "model must be an nn.Module, got dict",
         lambda: resnet_fast.load_weights({}, {})),
    Case("read_state_dict", "a missing file", FileNotFoundError, "weights file not found: /nonexistent/w.pth",
         lambda: resnet_fast.read_state_dict("/nonexistent/w.pth")),
    Case("read_state_dict", "an empty mapping", ValueError, "does not hold a state_dict",
         lambda: resnet_fast.read_state_dict({})),
    Case("read_state_dict", "a mapping with non-tensor values", ValueError, "does not hold a state_dict",
         lambda: resnet_fast.read_state_dict({"fc.weight": [1.0]})),
    Case("read_state_dict", "a .pth pickling an arbitrary object", ValueError,
         "w.pth could not be read as a weights file with torch.load(weights_only=True)",
         weights_file("w.pth", lambda p: torch.save({"fc.weight": torch.ones(1), "hook": _Anything()}, p))),
    Case("read_state_dict", "a truncated .pth", ValueError, "w.pth could not be read as a weights file",
         weights_file("w.pth", _truncated_pth)),
    Case("read_state_dict", "a .pth with a flipped byte in its tensor data", ValueError,
         "w.pth is corrupted: the checksum of its entry", weights_file("w.pth", _flipped_pth)),
    Case("read_state_dict", "a .pth that is not a state_dict", ValueError, "w.pth does not hold a state_dict",
         weights_file("w.pth", lambda p: torch.save([1, 2, 3], p))),
    Case("read_state_dict", "a corrupted .safetensors header", ValueError,
         "w.safetensors is not a readable safetensors file", weights_file("w.safetensors", _flipped_safetensors)),
    Case("read_state_dict", "a truncated .safetensors", ValueError, "w.safetensors is not a readable safetensors file",
         weights_file("w.safetensors", lambda p: open(p, "wb").write(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\""))),
    # the rest of the package API
    Case("clear_fold_caches", "not a module", TypeError, "module must be an nn.Module, got str",
         lambda: resnet_fast.clear_fold_caches("model")),
    Case("available_backends", "any argument", TypeError, "takes 0 positional arguments",
         lambda: resnet_fast.available_backends("cpu")),
]


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def table() -> str:
    lines = ["| function | input | error | message excerpt |", "|---|---|---|---|"]
    for c in CASES:
        lines.append(f"| `{c.function}` | {_cell(c.given)} | `{c.error.__name__}` | `{_cell(c.excerpt)}` |")
    return "\n".join(lines)


@pytest.mark.parametrize("case", CASES, ids=[f"{c.function}: {c.given}" for c in CASES])
def test_rejected(case):
    with pytest.raises(case.error) as info:
        case.call()
    assert case.excerpt in str(info.value), f"message {str(info.value)!r} lacks {case.excerpt!r}"


def test_docs_table_lists_exactly_these_cases():
    text = open(DOC).read()
    documented = text[text.index(BEGIN) + len(BEGIN):text.index(END)].strip()
    assert documented == table(), "docs/rejected_inputs.md is stale: run `python tests/test_rejected_inputs.py`"


if __name__ == "__main__":  # rewrite the table in the docs from CASES
    text = open(DOC).read()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    open(DOC, "w").write(text[:start] + "\n" + table() + "\n" + text[end:])
