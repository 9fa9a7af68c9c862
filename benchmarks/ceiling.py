"""The machine's ceilings, measured in the same run as the benchmarks: the
matrix-product rate (bf16 on a GPU, fp32 on the CPU) and the copy bandwidth.
Each result is then also reported as a fraction of them."""
from typing import Dict

import torch

from .timing import compare


def measure(device: torch.device, repeats: int = 7) -> Dict[str, float]:
    gpu = device.type == "cuda"
    n = 8192 if gpu else 2048
    dtype = torch.bfloat16 if gpu else torch.float32
    a = [torch.randn(n, n, device=device, dtype=dtype) for _ in range(2)]
    b = torch.randn(n, n, device=device, dtype=dtype)
    copy_elems = (1 << 28) if gpu else (1 << 24)  # 1 GiB / 64 MiB of fp32
    src = [torch.randn(copy_elems, device=device) for _ in range(2)]
    dst = torch.empty_like(src[0])
    contenders = {"matmul": lambda i: torch.mm(a[i], b), "copy": lambda i: dst.copy_(src[i])}
    if not gpu:
        # On the CPU torch.mm (MKL) and oneDNN's convolutions reach different
        # rates (MKL is slower on some vendors' CPUs): the same product as a
        # channels_last 1x1 convolution, and the faster of the two counts.
        pixels = [t.t().reshape(1, n, n // 64, 64).contiguous(memory_format=torch.channels_last) for t in a]
        kernel = b.t().reshape(n, n, 1, 1).contiguous(memory_format=torch.channels_last)
        contenders["matmul as 1x1 conv"] = lambda i: torch.nn.functional.conv2d(pixels[i], kernel)
    times = compare(contenders, [0, 1], device=device, repeats=repeats)
    best_matmul_s = min(t["min_s"] for name, t in times.items() if name.startswith("matmul"))
    # A ceiling is the best the machine did: the fastest run, not the median.
    return {
        "matmul_dtype": str(dtype).replace("torch.", ""),
        "matmul_tflops": 2 * n ** 3 / best_matmul_s / 1e12,
        # A copy reads and writes every byte.
        "copy_gb_per_s": 2 * copy_elems * 4 / times["copy"]["min_s"] / 1e9,
    }
