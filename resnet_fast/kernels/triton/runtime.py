"""Where and how the Triton kernels run: interpreter or GPU, dot precision,
and whether a launch can happen at all (it cannot on FakeTensors under the
interpreter)."""
import contextlib
import os
from typing import Tuple

import torch
import triton
from torch.library import wrap_triton

# Decided once, as triton.jit decides it: under TRITON_INTERPRET=1 every
# @triton.jit kernel becomes an InterpretedFunction that runs on CPU tensors.
INTERPRET: bool = bool(triton.knobs.runtime.interpret)


def autotune_enabled() -> bool:
    """Whether the conv kernel autotunes over its configs (on a GPU; on by
    default). RESNET_FAST_TRITON_AUTOTUNE=0 picks one fixed config instead,
    which the GPU tests use to avoid compiling every config per shape."""
    return os.environ.get("RESNET_FAST_TRITON_AUTOTUNE", "1") != "0"


def weight_tma_enabled() -> bool:
    """Whether the conv kernel may load its weight by TMA where it can (on
    by default). RESNET_FAST_TRITON_TMA=0 keeps it on ordinary loads, to
    measure one against the other."""
    return os.environ.get("RESNET_FAST_TRITON_TMA", "1") != "0"


def ensure_scratch_allocator() -> None:
    """Kernels that build TMA descriptors on the device need a little global
    scratch memory per launch, which Triton asks an allocator for. Where
    nobody has set one (in this thread: it is a context variable), set one
    that takes it from PyTorch's caching allocator, as torch.compile does."""
    try:
        from triton.runtime._allocation import NullAllocator, _allocator
        if not isinstance(_allocator.get(), NullAllocator):
            return
    except ImportError:  # another layout of triton's internals: set ours
        pass
    triton.set_allocator(_torch_scratch)


def _torch_scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    """tl.dot's input_precision for fp32 operands: TF32 only where PyTorch's
    own switches allow it (cuDNN's flag governs convolutions, the matmul flag
    GEMMs; either one opts in), and never under the interpreter."""
    if dtype != torch.float32 or INTERPRET or device.type != "cuda":
        return "ieee"
    if torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


def capability(device: torch.device) -> Tuple[int, int]:
    """The CUDA compute capability of device; (0, 0) for any other device
    (the interpreter's CPU tensors)."""
    if device.type != "cuda":
        return (0, 0)
    return torch.cuda.get_device_capability(device)


def launchable(t: torch.Tensor) -> bool:
    """Whether a kernel can be launched on tensors like t.

    On a GPU always: wrap_triton turns a launch on FakeTensors into a traced
    no-op. Under the interpreter the kernel would read the data, so a call
    that only computes output metadata (the fake kernel) must skip it.
    """
    if not INTERPRET:
        return True
    return t.device.type != "meta" and not isinstance(t, torch._subclasses.fake_tensor.FakeTensor)


def traceable(kernel):
    """The kernel, for launching as traceable(kernel)[grid](...).

    On a GPU through wrap_triton, so that torch.compile and triton_op's
    decomposition see the launch. Under the interpreter as it is: there the
    ops are opaque custom ops that nothing traces into, and the wrap_triton
    of older torch releases (2.11's, for one) refuses interpreted kernels.
    """
    return kernel if INTERPRET else wrap_triton(kernel)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def device_guard(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it t's for the
    launches (a no-op in the usual single-device case, and while tracing
    without CUDA initialised, when there is nothing to launch)."""
    if t.device.type == "cuda" and torch.cuda.is_initialized() and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()
