"""Build resnet_fast and its compiled extension, resnet_fast._C.

The extension always has the CPU kernels. The CUDA kernels are compiled too
whenever torch is a CUDA build and nvcc is found, whether or not a GPU is
present. Environment:
  FORCE_CUDA=1            fail instead of skipping CUDA when nvcc is missing
  RESNET_FAST_CPU_ONLY=1  skip the CUDA sources (a quick CPU-only build)
  TORCH_CUDA_ARCH_LIST    GPU architectures (default: the visible GPUs', else
                          8.0;9.0a); 9.0 is built as 9.0a, the target of the
                          Hopper kernels (wgmma, TMA), which runs on every 9.0 GPU
  CUTLASS_PATH            a CUTLASS checkout whose include/ and tools/util/include/
                          to use (default: the headers of the installed
                          nvidia-cutlass wheel); without either, conv_bias_act on
                          CUDA runs on cuDNN only
  MAX_JOBS                parallel compile jobs (ninja)
"""
import glob
import importlib.util
import os
import shutil
import sys

import setuptools
from setuptools import find_packages, setup


def _locate_cuda_home():
    """Set CUDA_HOME to a toolkit that has headers, before torch guesses.

    torch derives CUDA_HOME from the nvcc on PATH, which is wrong when that
    nvcc is a wrapper script outside the toolkit (e.g. /usr/local/bin/nvcc).
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = [os.path.dirname(os.path.dirname(nvcc))] if nvcc else []
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            os.environ["CUDA_HOME"] = home
            return


_locate_cuda_home()

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0a"


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _want_cuda():
    if _flag("RESNET_FAST_CPU_ONLY"):
        return False
    has_toolkit = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if _flag("FORCE_CUDA") and not has_toolkit:
        sys.exit(
            "FORCE_CUDA=1 but no CUDA build can be made: torch.version.cuda="
            f"{torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME}"
        )
    return has_toolkit


def _nvidia_wheel_include_dirs():
    """Header folders of the nvidia-* wheels (cuBLAS, cuSPARSE, ...).

    torch's CUDA headers include cublas_v2.h and cusparse.h, which a pip
    install of torch ships inside site-packages/nvidia rather than the toolkit.
    """
    try:
        import nvidia  # namespace package installed with CUDA builds of torch
    except ImportError:
        return []
    dirs = set()
    for base in nvidia.__path__:
        for header in ("cublas_v2.h", "cusparse.h", "cublasLt.h", "cusolverDn.h"):
            for found in glob.glob(os.path.join(base, "**", "include", header), recursive=True):
                dirs.add(os.path.dirname(found))
    return sorted(dirs)


def _cutlass_include_dir():
    """CUTLASS's header folder: $CUTLASS_PATH/include, else the nvidia-cutlass
    wheel's copy (found without importing its Python package); None if neither."""
    candidates = []
    if os.environ.get("CUTLASS_PATH"):
        candidates.append(os.path.join(os.environ["CUTLASS_PATH"], "include"))
    spec = importlib.util.find_spec("cutlass_library")
    if spec is not None and spec.submodule_search_locations:
        for base in spec.submodule_search_locations:
            candidates.append(os.path.join(base, "source", "include"))
    for include in candidates:
        if os.path.exists(os.path.join(include, "cutlass", "conv", "device", "implicit_gemm_convolution.h")):
            return include
    return None


def _cutlass_util_include_dir(include):
    """CUTLASS's tools/util/include next to its include/ (the sm90 conv
    collective includes cutlass/util/packed_stride.hpp from it), or None."""
    util = os.path.join(os.path.dirname(include), "tools", "util", "include")
    return util if os.path.exists(os.path.join(util, "cutlass", "util", "packed_stride.hpp")) else None


def _cuda_arch_list():
    """The GPU architectures to build for, with 9.0 as 9.0a, set as
    TORCH_CUDA_ARCH_LIST for torch's build to read."""
    listed = os.environ.get("TORCH_CUDA_ARCH_LIST", "").replace(" ", ";")
    if listed.strip(";"):
        archs = [a for a in listed.split(";") if a]
    elif torch.cuda.is_available():
        archs = sorted({"{}.{}".format(*torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())})
    else:
        archs = DEFAULT_ARCH_LIST.split(";")
    archs = ["9.0a" if a == "9.0" else a for a in archs]
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(archs)
    return archs


def _sources(*patterns):
    return sorted(
        os.path.relpath(path, ROOT)
        for pattern in patterns
        for path in glob.glob(os.path.join(ROOT, pattern))
    )


def _openmp_flags():
    """at::parallel_for is inline: without OpenMP in *this* build the CPU
    kernels would run on one thread, whatever torch's thread count."""
    if sys.platform.startswith("linux") and torch.__config__.parallel_info().find("OpenMP") >= 0:
        return ["-fopenmp"]
    return []


def _extension():
    cxx_flags = ["-O3"] + _openmp_flags()
    link_flags = _openmp_flags()
    sources = _sources("csrc/*.cpp", "csrc/cpu/*.cpp")
    if not _want_cuda():
        return cpp_extension.CppExtension(
            "resnet_fast._C", sources, include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags,
        )
    archs = _cuda_arch_list()
    include_dirs = [os.path.join(ROOT, "csrc")] + _nvidia_wheel_include_dirs()
    define_macros = [("RESNET_FAST_WITH_CUDA", None)]
    cuda_sources = _sources("csrc/cuda/*.cpp", "csrc/cuda/*.cu")
    cutlass_include = _cutlass_include_dir()
    util_include = _cutlass_util_include_dir(cutlass_include) if cutlass_include is not None else None
    if cutlass_include is not None:
        include_dirs.append(cutlass_include)
        define_macros.append(("RESNET_FAST_WITH_CUTLASS", None))
    else:
        print("resnet_fast: CUTLASS headers not found (pip install nvidia-cutlass or set CUTLASS_PATH); "
              "conv_bias_act on CUDA will run on cuDNN only", file=sys.stderr)
        cuda_sources = [s for s in cuda_sources if not os.path.basename(s).startswith("conv_cutlass_")]
    # The Hopper kernels: built for sm_90a, where the list has it.
    if util_include is not None and any(a.startswith("9.0a") for a in archs):
        include_dirs.append(util_include)
        define_macros.append(("RESNET_FAST_WITH_SM90", None))
    else:
        cuda_sources = [s for s in cuda_sources if not os.path.basename(s).startswith("conv_cutlass_sm90")]
    return cpp_extension.CUDAExtension(
        "resnet_fast._C",
        sources + cuda_sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_link_args=link_flags,
        extra_compile_args={
            "cxx": cxx_flags,
            "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-Xptxas=-warn-spills"],
        },
    )


def _license_metadata():
    """BSD-3-Clause as an SPDX expression where setuptools knows them (77 and
    newer, which deprecate the free-text field), as free text before that."""
    if int(setuptools.__version__.split(".")[0]) >= 77:
        return {"license_expression": "BSD-3-Clause"}
    return {"license": "BSD-3-Clause"}


setup(
    **_license_metadata(),
    packages=find_packages(include=["resnet_fast", "resnet_fast.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)
