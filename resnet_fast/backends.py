"""Which implementations of the ops this install can run, and the choice among them.

Backends:
  "reference"  pure PyTorch (resnet_fast.reference); always available.
  "native"     the compiled extension resnet_fast._C: C++ kernels for CPU
               tensors, CUDA kernels for CUDA tensors (when built with CUDA).
  "triton"     Triton kernels (resnet_fast.kernels.triton): CUDA tensors, or CPU
               tensors under Triton's interpreter (TRITON_INTERPRET=1, for tests).

A layer's choice, as a per-layer plan stores it, is a backend name or, for
CUDA tensors, "native:<family>": the native backend with one convolution
family preferred (CUDA_CONV_FAMILIES).
"""
import os
import warnings
from typing import Dict, NamedTuple, Optional, Tuple

import torch

BACKENDS = ("reference", "native", "triton")

# The convolutions the native backend's conv_bias_act can be asked to prefer
# on CUDA tensors (resnet_fast.ops.cuda_conv_family): our implicit GEMM's
# Hopper and SM80 families, cuDNN + our epilogue, cuDNN's own fused op. A
# per-layer plan names one as "native:<family>".
CUDA_CONV_FAMILIES = ("cutlass_sm90", "cutlass_sm80", "cudnn", "cudnn_fused")


class BackendStatus(NamedTuple):
    available: bool
    detail: str


def _load_extension() -> Optional[str]:
    """Import resnet_fast._C (which registers the ops); the error, or None."""
    try:
        import resnet_fast._C  # noqa: F401
    except ImportError as exc:
        return f"the compiled extension resnet_fast._C did not load ({exc}); reinstall with `pip install --no-build-isolation .`"
    return None


# Decided once, at import: the model's forward reads these plain values, which
# torch.compile can trace without graph breaks.
_EXTENSION_ERROR = _load_extension()
_NATIVE_HAS_CUDA = _EXTENSION_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key(
    "resnet_fast::conv_bias_act", "CUDA"
)


def _load_triton():
    """(available, detail) of the Triton kernels; registers their ops when available.

    A failure to define or register them (a triton or torch release that
    disagrees with them) makes the backend unavailable, with the error as the
    reason: it must not take `import resnet_fast` or the other backends down.
    """
    from .kernels.triton import triton_available

    available, detail = triton_available()
    if available:
        try:
            from .kernels.triton import ops  # noqa: F401  (registers torch.ops.resnet_fast_triton)
        except Exception as exc:
            return False, (f"the Triton kernels did not load ({type(exc).__name__}: {exc}); "
                           f"{detail}, torch {torch.__version__}")
    return available, detail


_TRITON_AVAILABLE, _TRITON_DETAIL = _load_triton()
_TRITON_INTERPRETED = _TRITON_AVAILABLE and os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def native_loaded() -> bool:
    return _EXTENSION_ERROR is None


def triton_interpreted() -> bool:
    """Whether the Triton kernels run in Triton's interpreter (CPU tensors)."""
    return _TRITON_INTERPRETED


def available_backends() -> Dict[str, BackendStatus]:
    """Each backend: whether this install can run it, and what on (or why not)."""
    status = {"reference": BackendStatus(True, "pure PyTorch; CPU and CUDA")}
    if _EXTENSION_ERROR is not None:
        status["native"] = BackendStatus(False, _EXTENSION_ERROR)
    elif _NATIVE_HAS_CUDA:
        status["native"] = BackendStatus(True, "C++ kernels for CPU tensors, CUDA kernels for CUDA tensors")
    else:
        status["native"] = BackendStatus(
            True, "C++ kernels for CPU tensors; built without CUDA, so not for CUDA tensors"
        )
    status["triton"] = BackendStatus(_TRITON_AVAILABLE, _TRITON_DETAIL)
    return status


def _unavailable_reason(backend: str, device: torch.device) -> Optional[str]:
    """Why backend cannot run on device, or None when it can."""
    if backend == "reference":
        return None
    if backend == "native":
        if _EXTENSION_ERROR is not None:
            return _EXTENSION_ERROR
        if device.type == "cuda" and not _NATIVE_HAS_CUDA:
            return "resnet_fast._C was built without CUDA kernels (torch without CUDA or no nvcc at build time)"
        if device.type not in ("cpu", "cuda"):
            return f"the native kernels run on CPU and CUDA tensors, not {device.type}"
        return None
    if backend == "triton":
        if not _TRITON_AVAILABLE:
            return _TRITON_DETAIL
        if device.type == "cpu" and not _TRITON_INTERPRETED:
            return "the Triton kernels run on CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)"
        if device.type == "cuda" and _TRITON_INTERPRETED:
            return "TRITON_INTERPRET=1 is set, so the Triton kernels take CPU tensors only"
        if device.type not in ("cpu", "cuda"):
            return f"the Triton kernels run on CUDA tensors, not {device.type}"
        return None
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS} or None")


_WARNED = set()


def _warn_fallback(device_type: str, reason: str) -> None:
    if (device_type, reason) in _WARNED:
        return
    _WARNED.add((device_type, reason))
    warnings.warn(
        f"resnet_fast: the native backend cannot run on {device_type} ({reason}); "
        "using the reference (pure PyTorch) backend",
        RuntimeWarning,
        stacklevel=3,
    )


def resolve_backend(backend: Optional[str], device: torch.device) -> str:
    """The backend to run on `device`: the one asked for, or the best available.

    An explicitly requested backend that cannot run raises; backend=None falls
    back to the reference and warns once, saying why.
    """
    if backend is not None:
        reason = _unavailable_reason(backend, device)
        if reason is not None:
            raise RuntimeError(f"resnet_fast: backend {backend!r} is not available on {device.type}: {reason}")
        return backend
    reason = _unavailable_reason("native", device)
    if reason is None:
        return "native"
    _warn_fallback(device.type, reason)
    return "reference"


def split_choice(choice: str) -> Tuple[str, Optional[str]]:
    """(backend, CUDA convolution family or None) of a layer's choice:
    "native:cutlass_sm80" -> ("native", "cutlass_sm80"), "triton" -> ("triton", None)."""
    backend, sep, family = choice.partition(":") if isinstance(choice, str) else (choice, "", "")
    if backend not in BACKENDS or (sep and not (backend == "native" and family in CUDA_CONV_FAMILIES)):
        raise ValueError(f"unknown backend choice {choice!r}; expected one of {BACKENDS}, or 'native:<family>' "
                         f"with a family of {CUDA_CONV_FAMILIES}")
    return backend, family or None


def is_choice(value) -> bool:
    """Whether value is a layer's choice split_choice understands."""
    try:
        split_choice(value)
    except ValueError:
        return False
    return True
