"""The machine's ceilings, measured in the same run as the benchmarks: the
matrix-product rate (bf16 on a GPU, fp32 on the CPU) and the copy bandwidth.
Each result is then also reported as a fraction of them."""
from typing import Dict

import torch

from .timing import compare


def measure(device: torch.device, repeats: int = 7) -> Dict[str, float]:
    gpu = device.type == "cuda"
    n = 8192 if gpu else 1024
    dtype = torch.bfloat16 if gpu else torch.float32
    a = [torch.randn(n, n, device=device, dtype=dtype) for _ in range(2)]
    b = torch.randn(n, n, device=device, dtype=dtype)
    copy_elems = (1 << 28) if gpu else (1 << 24)  # 1 GiB / 64 MiB of fp32
    src = [torch.randn(copy_elems, device=device) for _ in range(2)]
    dst = torch.empty_like(src[0])
    times = compare(
        {"matmul": lambda i: torch.mm(a[i], b), "copy": lambda i: dst.copy_(src[i])},
        [0, 1], device=device, repeats=repeats,
    )
    return {
        "matmul_dtype": str(dtype).replace("torch.", ""),
        "matmul_tflops": 2 * n ** 3 / times["matmul"]["median_s"] / 1e12,
        # A copy reads and writes every byte.
        "copy_gb_per_s": 2 * copy_elems * 4 / times["copy"]["median_s"] / 1e9,
    }
