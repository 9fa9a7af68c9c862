"""conv_bias_act on CUDA tensors runs one of two convolutions: the implicit
GEMM on tensor cores (CUTLASS, csrc/cuda/conv_cutlass*) or cuDNN followed by
our epilogue. Which one, is decided on the host from dtypes, sizes and
addresses, so those rules are tested here on CPU tensors; the kernels
themselves are tested against the reference on a GPU (skipped without one)."""
import re

import pytest
import torch

from resnet_fast import backends, ops

from conftest import HAS_CUDA, REL_TOL, TF32_REL_TOL, assert_rel, channels_last, poison_allocator
from test_ops import conv_out_shape, make_conv

needs_cuda_build = pytest.mark.skipif(
    not backends._NATIVE_HAS_CUDA, reason="the extension was built without its CUDA kernels")
needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")

# Shapes the implicit GEMM takes (channels multiples of 8, or at most 4
# input channels): (n, c, h, w, k, kernel, stride, padding, dilation,
# groups). Odd spatial sizes, batch 1, output channels and pixel counts that
# are not multiples of the tiles, and a reduction that is not a multiple of
# its 32-deep slices.
IGEMM_CASES = {
    "3x3s1_batch1_odd": (1, 8, 9, 11, 16, 3, 1, 1, 1, 1),
    "3x3s2_odd": (2, 16, 13, 7, 24, 3, 2, 1, 1, 1),
    "1x1": (3, 32, 5, 5, 40, 1, 1, 0, 1, 1),
    "1x1s2_downsample": (2, 24, 9, 10, 48, 1, 2, 0, 1, 1),
    "stem7x7s2_C8": (2, 8, 23, 19, 64, 7, 2, 3, 1, 1),
    "dilated": (2, 16, 12, 10, 16, 3, 1, 2, 2, 1),
    "K264_M429": (3, 64, 11, 13, 264, 3, 1, 1, 1, 1),
    "C520_1x1": (1, 520, 7, 7, 136, 1, 1, 0, 1, 1),
    "K128_3x3s2": (2, 72, 9, 8, 128, 3, 2, 1, 1, 1),
    "stem7x7s2_C3": (2, 3, 23, 19, 64, 7, 2, 3, 1, 1),
    "C4_K136": (1, 4, 9, 11, 136, 3, 1, 1, 1, 1),
    "C1_dilated_batch1": (1, 1, 12, 10, 24, 3, 1, 2, 2, 1),
    "C2_5x5s2": (3, 2, 15, 14, 8, 5, 2, 2, 1, 1),
}
# The kernel each takes: 128x128 tiles for more than 64 output channels,
# 128x64 for fewer, and the few-channel kernel for at most 4 input channels.
IGEMM_KERNELS = {
    "3x3s1_batch1_odd": "cutlass sm80 (128x64 tiles)",
    "3x3s2_odd": "cutlass sm80 (128x64 tiles)",
    "1x1": "cutlass sm80 (128x64 tiles)",
    "1x1s2_downsample": "cutlass sm80 (128x64 tiles)",
    "stem7x7s2_C8": "cutlass sm80 (128x64 tiles)",
    "dilated": "cutlass sm80 (128x64 tiles)",
    "K264_M429": "cutlass sm80 (128x128 tiles)",
    "C520_1x1": "cutlass sm80 (128x128 tiles)",
    "K128_3x3s2": "cutlass sm80 (128x128 tiles)",
    "stem7x7s2_C3": "cutlass sm80 (128x64 tiles, 3 input channels zero-padded to 4)",
    "C4_K136": "cutlass sm80 (128x64 tiles, 4 input channels)",
    "C1_dilated_batch1": "cutlass sm80 (128x64 tiles, 1 input channel zero-padded to 4)",
    "C2_5x5s2": "cutlass sm80 (128x64 tiles, 2 input channels zero-padded to 4)",
}
# float32 runs on TF32 tensor cores, so only where PyTorch allows TF32.
IGEMM_DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# Shapes it does not take, whether TF32 is allowed, and the words of the reason.
CUDNN_CASES = {
    "C12": ((2, 12, 13, 9, 16, 3, 1, 1, 1, 1), torch.float16, True, "at most 4 or a multiple of 8"),
    "C6_float32": ((1, 6, 9, 11, 16, 3, 1, 1, 1, 1), torch.float32, True, "at most 4 or a multiple of 4"),
    "K12": ((1, 8, 9, 11, 12, 3, 1, 1, 1, 1), torch.bfloat16, True, "output channels must be a multiple of 8"),
    "K6_float32": ((1, 8, 9, 11, 6, 3, 1, 1, 1, 1), torch.float32, True, "output channels must be a multiple of 4"),
    "stem_K60": ((2, 3, 23, 19, 60, 7, 2, 3, 1, 1), torch.float16, True, "output channels must be a multiple of 8"),
    "grouped": ((2, 16, 7, 9, 16, 3, 1, 1, 1, 4), torch.float16, True, "grouped"),
    "float32_tf32_off": ((1, 8, 9, 11, 16, 3, 1, 1, 1, 1), torch.float32, False, "TF32 off"),
}


def _conv(case, dtype, cases=IGEMM_CASES, device="cpu", layout="channels_last"):
    x, weight, bias, args = make_conv(case, dtype, layout, cases=cases)
    return x.to(device), weight.to(device), bias.to(device), args


def _algorithm(x, weight, residual, args):
    return ops.cuda_conv_algorithm(x, weight, residual, **args)


def _cutlass_built():
    x, weight, _, args = _conv("1x1", torch.float16)
    return "without the CUTLASS headers" not in _algorithm(x, weight, None, args)


@pytest.fixture
def auto_choice(monkeypatch, tf32):
    """RESNET_FAST_CUDA_CONV unset and TF32 allowed, so the implicit GEMM
    takes every convolution it can; skips when it was not built."""
    monkeypatch.delenv("RESNET_FAST_CUDA_CONV", raising=False)
    tf32(True)
    if not _cutlass_built():
        pytest.skip("the extension was built without the CUTLASS headers (nvidia-cutlass not installed)")


# ---------------------------------------------------------------- the choice (any machine)


@needs_cuda_build
@pytest.mark.parametrize("case", list(IGEMM_CASES))
@pytest.mark.parametrize("dtype", IGEMM_DTYPES, ids=str)
def test_implicit_gemm_takes_aligned_convolutions(case, dtype, auto_choice):
    x, weight, _, args = _conv(case, dtype)
    residual = channels_last(torch.randn(conv_out_shape(x, weight, args), dtype=dtype))
    kernel = IGEMM_KERNELS[case]
    assert _algorithm(x, weight, residual, args) == kernel
    assert _algorithm(x, weight, None, args) == kernel
    # Any input layout: the op makes channels_last copies first.
    assert _algorithm(x.contiguous(), weight.contiguous(), residual.contiguous(), args) == kernel


@needs_cuda_build
@pytest.mark.parametrize("case", list(CUDNN_CASES))
def test_other_convolutions_go_to_cudnn_with_the_reason(case, monkeypatch, tf32):
    monkeypatch.delenv("RESNET_FAST_CUDA_CONV", raising=False)
    geometry, dtype, allow_tf32, reason = CUDNN_CASES[case]
    tf32(allow_tf32)
    x, weight, _, args = _conv(case, dtype, cases={case: geometry})
    got = _algorithm(x, weight, None, args)
    assert got.startswith("cudnn: ")
    if _cutlass_built():
        assert reason in got


# Main-loop steps per block, (16-bit, TF32): the few-channel kernel packs
# the 4 channels of 8 filter taps into each 32-deep slice of 16-bit values
# (4 taps into a 16-deep TF32 slice); the others step through one tap's
# channels at a time.
REDUCTION_STEPS = {
    "stem7x7s2_C3": (7, 13),  # ceil(49 / 8), ceil(49 / 4) rather than 49 one-tap steps
    "C2_5x5s2": (4, 7),  # ceil(25 / 8), ceil(25 / 4)
    "C4_K136": (2, 3),  # ceil(9 / 8), ceil(9 / 4)
    "K264_M429": (18, 36),  # 9 taps x 64 / 32, 9 x 64 / 16
    "C520_1x1": (17, 33),  # ceil(520 / 32), ceil(520 / 16)
}


@needs_cuda_build
@pytest.mark.parametrize("case", list(REDUCTION_STEPS))
@pytest.mark.parametrize("dtype", IGEMM_DTYPES, ids=str)
def test_implicit_gemm_reduction_steps(case, dtype, auto_choice):
    """The launch parameters, computed on the host as for a real launch."""
    x, weight, _, args = _conv(case, dtype)
    pairs = [[args[name]] * 2 for name in ("stride", "padding", "dilation")]
    steps = torch.ops.resnet_fast_cuda.cutlass_reduction_steps(x, weight, *pairs)
    assert steps == REDUCTION_STEPS[case][dtype == torch.float32]


@needs_cuda_build
def test_reduction_steps_need_a_convolution_the_implicit_gemm_takes(monkeypatch):
    monkeypatch.delenv("RESNET_FAST_CUDA_CONV", raising=False)
    geometry, dtype, _, _ = CUDNN_CASES["K12"]
    x, weight, _, args = _conv("K12", dtype, cases={"K12": geometry})
    with pytest.raises(RuntimeError, match="the implicit GEMM does not run this convolution: cudnn: "):
        torch.ops.resnet_fast_cuda.cutlass_reduction_steps(x, weight, [1, 1], [1, 1], [1, 1])


@needs_cuda_build
def test_misaligned_tensors_go_to_cudnn(auto_choice):
    x, weight, _, args = _conv("3x3s1_batch1_odd", torch.float16)
    # A channels_last tensor starting 2 bytes past a 16-byte boundary.
    shifted = torch.empty(x.numel() + 1, dtype=x.dtype)[1:].view(1, 9, 11, 8).permute(0, 3, 1, 2)
    shifted.copy_(x)
    assert shifted.is_contiguous(memory_format=torch.channels_last)
    assert "16-byte" in _algorithm(shifted, weight, None, args)
    # Inputs of fewer than 4 channels are copied (zero-padded) first, so
    # where they start does not matter.
    x, weight, _, args = _conv("stem7x7s2_C3", torch.float16)
    shifted = torch.empty(x.numel() + 1, dtype=x.dtype)[1:].view(2, 23, 19, 3).permute(0, 3, 1, 2)
    shifted.copy_(x)
    assert _algorithm(shifted, weight, None, args) == IGEMM_KERNELS["stem7x7s2_C3"]


@needs_cuda_build
def test_environment_variable_selects_the_convolution(monkeypatch):
    x, weight, _, args = _conv("1x1", torch.float16)
    monkeypatch.setenv("RESNET_FAST_CUDA_CONV", "cudnn")
    assert _algorithm(x, weight, None, args) == "cudnn: RESNET_FAST_CUDA_CONV=cudnn"
    monkeypatch.setenv("RESNET_FAST_CUDA_CONV", "fastest")
    with pytest.raises(RuntimeError, match="RESNET_FAST_CUDA_CONV must be auto, cutlass, cutlass_sm90, cutlass_sm80, "
                                           "cudnn or cudnn_fused, got 'fastest'"):
        _algorithm(x, weight, None, args)
    # Forcing the implicit GEMM on a convolution it cannot run names why.
    geometry, dtype, _, reason = CUDNN_CASES["grouped"]
    x, weight, _, args = _conv("grouped", dtype, cases={"grouped": geometry})
    monkeypatch.setenv("RESNET_FAST_CUDA_CONV", "cutlass")
    with pytest.raises(RuntimeError, match="RESNET_FAST_CUDA_CONV=cutlass, but the implicit-GEMM convolution "
                                           "cannot run this one"):
        _algorithm(x, weight, None, args)


FUSED_NAME = "cudnn fused (conv + bias + ReLU in one cuDNN call)"
FUSED_RESIDUAL_NAME = "cudnn fused (conv + bias + residual + ReLU in one cuDNN call)"


@needs_cuda_build
def test_a_preferred_family_runs_where_it_can_and_falls_back_elsewhere(auto_choice):
    """ops.cuda_conv_family is a preference (per-layer plans use it): where
    its family cannot run a convolution, the automatic choice does."""
    x, weight, _, args = _conv("1x1", torch.float16)
    residual = channels_last(torch.randn(conv_out_shape(x, weight, args), dtype=torch.float16))
    automatic = IGEMM_KERNELS["1x1"]
    with ops.cuda_conv_family("cudnn"):
        assert _algorithm(x, weight, None, args) == "cudnn: this thread prefers it (cuda_conv_family)"
        with ops.cuda_conv_family("cutlass_sm80"):  # nested: the innermost holds, the outer one comes back
            assert _algorithm(x, weight, None, args) == automatic
        assert _algorithm(x, weight, None, args).startswith("cudnn: this thread")
    with ops.cuda_conv_family("cudnn_fused"):
        assert _algorithm(x, weight, None, args) == FUSED_NAME
        assert _algorithm(x, weight, residual, args) == FUSED_RESIDUAL_NAME
        # No ReLU: cuDNN's fused op has none to leave out, so the automatic choice.
        assert ops.cuda_conv_algorithm(x, weight, None, **args, relu=False) == automatic
    with ops.cuda_conv_family("cutlass_sm90"):  # CPU tensors have no Hopper: the SM80 family, no error
        assert _algorithm(x, weight, None, args) == automatic
    grouped, dtype, _, reason = CUDNN_CASES["grouped"]
    gx, gweight, _, gargs = _conv("grouped", dtype, cases={"grouped": grouped})
    with ops.cuda_conv_family("cutlass_sm80"):  # the implicit GEMM cannot: cuDNN, and why
        assert _algorithm(gx, gweight, None, gargs).startswith("cudnn: grouped")
    with ops.cuda_conv_family(None):
        assert _algorithm(x, weight, None, args) == automatic
    assert _algorithm(x, weight, None, args) == automatic  # nothing left preferred


@needs_cuda_build
def test_the_environment_variable_overrides_a_preferred_family(monkeypatch, auto_choice):
    x, weight, _, args = _conv("1x1", torch.float16)
    monkeypatch.setenv("RESNET_FAST_CUDA_CONV", "cudnn")
    with ops.cuda_conv_family("cutlass_sm80"):
        assert _algorithm(x, weight, None, args) == "cudnn: RESNET_FAST_CUDA_CONV=cudnn"
    monkeypatch.setenv("RESNET_FAST_CUDA_CONV", "cudnn_fused")
    with ops.cuda_conv_family("cudnn"):
        assert _algorithm(x, weight, None, args) == FUSED_NAME
    # Demanded, cuDNN's fused op must run: a layer without ReLU is an error.
    with pytest.raises(RuntimeError, match="RESNET_FAST_CUDA_CONV=cudnn_fused, but cuDNN's fused convolution "
                                           "always applies a ReLU and this layer has none"):
        ops.cuda_conv_algorithm(x, weight, None, **args, relu=False)


@needs_cuda_build
def test_a_preferred_family_belongs_to_its_thread(auto_choice):
    import threading

    x, weight, _, args = _conv("1x1", torch.float16)
    seen = []
    with ops.cuda_conv_family("cudnn"):
        other = threading.Thread(target=lambda: seen.append(_algorithm(x, weight, None, args)))
        other.start()
        other.join()
        assert _algorithm(x, weight, None, args).startswith("cudnn:")
    assert seen == [IGEMM_KERNELS["1x1"]]


@pytest.mark.parametrize("family, error, message", [
    ("fastest", ValueError, "unknown CUDA convolution family 'fastest'; expected cutlass_sm90, cutlass_sm80, cudnn, "
                            "cudnn_fused or None"),
    ("cutlass", ValueError, "unknown CUDA convolution family 'cutlass'"),
    (3, TypeError, "must be a str or None"),
])
@needs_cuda_build
def test_unknown_families_are_refused(family, error, message):
    with pytest.raises(error, match=message):
        with ops.cuda_conv_family(family):
            pass
    x, weight, _, args = _conv("1x1", torch.float16)
    assert not _algorithm(x, weight, None, args).startswith("cudnn: this thread")  # the refusal set nothing


# ---------------------------------------------------------------- the Hopper family (any machine)

SM90_KERNEL = "cutlass sm90 (128x128x64 tiles, wgmma, TMA im2col)"
# Cases the Hopper kernel refuses: fewer than 8 input channels (its TMA
# loads 16 bytes of channels at a time); the SM80 family takes them.
SM90_REFUSED = {"stem7x7s2_C3", "C4_K136", "C1_dilated_batch1", "C2_5x5s2"}


@pytest.fixture
def sm90_built(auto_choice):
    x, weight, _, args = _conv("1x1", torch.float16)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RESNET_FAST_CUDA_CONV", "cutlass_sm90")
        try:
            ops.cuda_conv_algorithm(x, weight, None, **args, capability=90)
        except RuntimeError as error:
            if "built without its sm_90a kernels" in str(error):
                pytest.skip("the extension was built without its sm_90a kernels (TORCH_CUDA_ARCH_LIST without 9.0)")
            raise


@needs_cuda_build
@pytest.mark.parametrize("case", list(IGEMM_CASES))
@pytest.mark.parametrize("dtype", IGEMM_DTYPES, ids=str)
def test_hopper_runs_the_16_bit_convolutions_it_can(case, dtype, sm90_built):
    """On compute capability 9.x the Hopper kernel takes float16 and
    bfloat16 wherever CUTLASS's sm90 convolution can; TF32, the few-channel
    inputs and every other GPU stay with the SM80 family."""
    x, weight, _, args = _conv(case, dtype)
    residual = channels_last(torch.randn(conv_out_shape(x, weight, args), dtype=dtype))
    hopper = dtype != torch.float32 and case not in SM90_REFUSED
    for capability in (90, 80, 89, 100, 120):
        expected = SM90_KERNEL if hopper and capability == 90 else IGEMM_KERNELS[case]
        assert ops.cuda_conv_algorithm(x, weight, residual, **args, capability=capability) == expected
    assert _algorithm(x, weight, None, args) == IGEMM_KERNELS[case]  # CPU tensors: no Hopper


@needs_cuda_build
def test_environment_variable_forces_a_family(monkeypatch, sm90_built):
    x, weight, _, args = _conv("1x1", torch.float16)
    monkeypatch.setenv("RESNET_FAST_CUDA_CONV", "cutlass_sm80")
    assert ops.cuda_conv_algorithm(x, weight, None, **args, capability=90) == IGEMM_KERNELS["1x1"]
    monkeypatch.setenv("RESNET_FAST_CUDA_CONV", "cutlass_sm90")
    assert ops.cuda_conv_algorithm(x, weight, None, **args, capability=90) == SM90_KERNEL
    refused = "RESNET_FAST_CUDA_CONV=cutlass_sm90, but the Hopper kernel cannot run this convolution: "
    with pytest.raises(RuntimeError, match=refused + r"compute capability 8\.0 is not Hopper \(9\.x\)"):
        ops.cuda_conv_algorithm(x, weight, None, **args, capability=80)
    with pytest.raises(RuntimeError, match=refused + "it takes float16 and bfloat16, got Float"):
        ops.cuda_conv_algorithm(x.float(), weight.float(), None, **args, capability=90)
    stem_x, stem_weight, _, stem_args = _conv("stem7x7s2_C3", torch.bfloat16)
    with pytest.raises(RuntimeError, match=refused + "CUTLASS's sm90 convolution refuses it"):
        ops.cuda_conv_algorithm(stem_x, stem_weight, None, **stem_args, capability=90)
    # Padding past what its TMA im2col addresses (a corner more than 128
    # pixels out): the SM80 family takes it.
    wide = dict(args, padding=129)
    with pytest.raises(RuntimeError, match=refused + "CUTLASS's sm90 convolution refuses it"):
        ops.cuda_conv_algorithm(x, weight, None, **wide, capability=90)
    monkeypatch.delenv("RESNET_FAST_CUDA_CONV")
    assert ops.cuda_conv_algorithm(x, weight, None, **wide, capability=90) == IGEMM_KERNELS["1x1"]


@needs_cuda_build
def test_choice_checks_its_arguments():
    x, weight, _, args = _conv("1x1", torch.float16)
    with pytest.raises(RuntimeError, match="input has 32 channels but weight expects 16"):
        _algorithm(x, weight[:, :16], None, args)


# ---------------------------------------------------------------- the kernels (GPU)


@pytest.mark.parametrize("case", list(IGEMM_CASES))
@pytest.mark.parametrize("dtype", IGEMM_DTYPES, ids=str)
@pytest.mark.parametrize("residual,relu", [(True, True), (False, True), (False, False), (True, False)])
@pytest.mark.parametrize("algorithm", ["cutlass_sm80", "cutlass_sm90", "cudnn"])
@pytest.mark.cuda
@needs_gpu
def test_cuda_convolutions_match_reference(case, dtype, residual, relu, algorithm, monkeypatch, tf32):
    monkeypatch.setenv("RESNET_FAST_CUDA_CONV", algorithm)
    x, weight, bias, args = _conv(case, dtype, device="cuda")
    res = channels_last(torch.randn(conv_out_shape(x, weight, args), dtype=dtype, device="cuda")) if residual else None
    tf32(False)  # an exact float32 reference
    expected = ops.conv_bias_act(x, weight, bias, res, relu=relu, backend="reference", **args)
    tf32(True)  # float32 runs on TF32 tensor cores (both algorithms)
    if algorithm == "cutlass_sm90":
        if torch.cuda.get_device_capability()[0] != 9:
            pytest.skip("the Hopper kernels need compute capability 9.x")
        if dtype == torch.float32 or case in SM90_REFUSED:
            with pytest.raises(RuntimeError, match="RESNET_FAST_CUDA_CONV=cutlass_sm90, but the Hopper kernel"):
                ops.conv_bias_act(x, weight, bias, res, relu=relu, backend="native", **args)
            return
    assert _algorithm(x, weight, res, args).startswith(algorithm.replace("_", " "))
    poison_allocator(expected.numel(), "cuda")
    out = ops.conv_bias_act(x, weight, bias, res, relu=relu, backend="native", **args)
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    # TF32 against exact float32 (TF32_REL_TOL); a wrong kernel is off by O(1).
    assert_rel(out, expected, factor=TF32_REL_TOL / REL_TOL[torch.float32] if dtype == torch.float32 else 1)
    if relu:
        assert (out >= 0).all()


@pytest.mark.parametrize("case", ["3x3s1_batch1_odd", "1x1s2_downsample", "stem7x7s2_C3", "K264_M429"])
@pytest.mark.parametrize("dtype", IGEMM_DTYPES, ids=str)
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.cuda
@needs_gpu
def test_cudnn_fused_family_matches_reference(case, dtype, residual, tf32):
    """cuDNN's own fused op, as a layer preferring it runs it (where cuDNN's
    runtime fusion refuses a dtype or shape, it says so: tune() skips it)."""
    x, weight, bias, args = _conv(case, dtype, device="cuda")
    res = channels_last(torch.randn(conv_out_shape(x, weight, args), dtype=dtype, device="cuda")) if residual else None
    tf32(False)
    expected = ops.conv_bias_act(x, weight, bias, res, backend="reference", **args)
    tf32(True)
    with ops.cuda_conv_family("cudnn_fused"):
        assert _algorithm(x, weight, res, args) == (FUSED_RESIDUAL_NAME if residual else FUSED_NAME)
        try:
            out = ops.conv_bias_act(x, weight, bias, res, backend="native", **args)
        except RuntimeError as error:
            if not re.search(r"CUDNN_STATUS|cuDNN error|unable to find an engine", str(error)):
                raise
            pytest.skip(f"cuDNN refuses this fused convolution here: {str(error).splitlines()[0]}")
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    assert_rel(out, expected, factor=TF32_REL_TOL / REL_TOL[torch.float32] if dtype == torch.float32 else 1)


@pytest.mark.parametrize("layout", ["contiguous", "sliced"])
@pytest.mark.cuda
@needs_gpu
def test_implicit_gemm_any_input_layout(layout, monkeypatch):
    monkeypatch.setenv("RESNET_FAST_CUDA_CONV", "cutlass")
    x, weight, bias, args = _conv("3x3s2_odd", torch.float16, device="cuda", layout=layout)
    res = torch.randn(conv_out_shape(x, weight, args), dtype=torch.float16, device="cuda")
    expected = ops.conv_bias_act(x.contiguous(), weight, bias, res, backend="reference", **args)
    assert_rel(ops.conv_bias_act(x, weight, bias, res, backend="native", **args), expected)


@pytest.mark.parametrize("algorithm,dtype", [("cutlass_sm80", torch.float16), ("cutlass_sm90", torch.bfloat16)])
@pytest.mark.cuda
@needs_gpu
def test_implicit_gemm_keeps_nan_through_relu(algorithm, dtype, monkeypatch):
    if algorithm == "cutlass_sm90" and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Hopper kernels need compute capability 9.x")
    monkeypatch.setenv("RESNET_FAST_CUDA_CONV", algorithm)
    x, weight, bias, args = _conv("1x1", dtype, device="cuda")
    bias[3] = float("nan")
    out = ops.conv_bias_act(x, weight, bias, None, relu=True, backend="native", **args)
    assert out[:, 3].isnan().all() and not out[:, 4:].isnan().any()


# ResNet-50's layer4 at batch 1 (a grid of one row of tiles) and 256.
HOPPER_LAYERS = {
    "layer4_3x3_batch1": (1, 512, 7, 7, 512, 3, 1, 1, 1, 1),
    "layer4_3x3_batch256": (256, 512, 7, 7, 512, 3, 1, 1, 1, 1),
    "layer4_1x1_expand_batch256": (256, 512, 7, 7, 2048, 1, 1, 0, 1, 1),
    "layer4_3x3s2_batch1": (1, 512, 14, 14, 512, 3, 2, 1, 1, 1),
}
needs_hopper = pytest.mark.skipif(not HAS_CUDA or torch.cuda.get_device_capability()[0] != 9,
                                  reason="needs a compute capability 9.x GPU")


@pytest.mark.parametrize("case", list(HOPPER_LAYERS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("algorithm", ["cutlass_sm90", "cutlass_sm80"])
@pytest.mark.cuda
@needs_hopper
def test_layer4_shapes_on_both_families(case, dtype, algorithm, monkeypatch):
    monkeypatch.setenv("RESNET_FAST_CUDA_CONV", algorithm)
    x, weight, bias, args = _conv(case, dtype, cases=HOPPER_LAYERS, device="cuda")
    res = channels_last(torch.randn(conv_out_shape(x, weight, args), dtype=dtype, device="cuda"))
    expected = ops.conv_bias_act(x, weight, bias, res, relu=True, backend="reference", **args)
    assert _algorithm(x, weight, res, args).startswith(algorithm.replace("_", " "))
    poison_allocator(expected.numel(), "cuda")
    assert_rel(ops.conv_bias_act(x, weight, bias, res, relu=True, backend="native", **args), expected)
