"""Activation memory kept from one CPU inference forward to the next.

oneDNN's convolutions allocate their outputs, and glibc hands large freed
blocks back to the system, so a repeated forward gets its activations as new
pages and faults on each of them (some 12,500 faults, a tenth of the time,
for a ResNet-50 in bfloat16 at batch 16). Inside reused_activation_memory()
the process's CPU tensors come from an allocator that keeps large freed
blocks for the next forward (csrc/cpu/activation_memory.cpp): a block that
no allocation took during a whole forward is freed when it ends, and
empty_cpu_cache() frees the rest, as torch.cuda.empty_cache() does for CUDA.

A training step's own large results that it makes afresh at every step
(the BatchNorm backward's gradients, the matrix-product convolution's
weight gradient) come from the same cache outside any forward
(empty_for_step): autograd frees them a few layers later, and as new pages
they faulted at every step (4 of the 4.3 ms of a 256-channel 28x28
BatchNorm backward at batch 8 on a 2-core AMD Zen 4).
"""
import contextlib
from typing import Iterator, Sequence

from torch import Tensor

from .backends import native_loaded


@contextlib.contextmanager
def reused_activation_memory() -> Iterator[None]:
    """Within this block (nestable, and from several threads at once), CPU
    tensors reuse the large blocks the previous such block freed."""
    if not native_loaded():
        yield
        return
    from . import _C

    _C.enter_activation_memory()
    try:
        yield
    finally:
        _C.exit_activation_memory()


def empty_cpu_cache() -> int:
    """Free the activation memory kept for the next CPU forward (the
    resnet_fast models keep it between eval forwards without gradients);
    returns the bytes freed."""
    if not native_loaded():
        return 0
    from . import _C

    return _C.release_activation_memory()


def cached_cpu_memory() -> int:
    """The bytes of activation memory kept for the next CPU forward."""
    if not native_loaded():
        return 0
    from . import _C

    return _C.cached_activation_memory()


def empty_for_step(like: Tensor, sizes: Sequence[int]) -> Tensor:
    """An uninitialised contiguous tensor of like's dtype and device; on the
    CPU, from the kept activation memory, whether a forward runs or not: for
    a result a training step allocates afresh at every step, whose large
    fresh block would fault on every page each time."""
    if like.device.type != "cpu" or not native_loaded():
        return like.new_empty(sizes)
    from . import _C

    return _C.empty_from_activation_memory(like, tuple(sizes))
