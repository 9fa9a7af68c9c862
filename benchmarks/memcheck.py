"""A small model through every native CUDA kernel family, for
compute-sanitizer's memcheck (benchmarks/gpu_check.sh runs it under the
sanitizer with PYTORCH_NO_CUDA_MEMORY_CACHING=1, so that every buffer has
its exact size and an out-of-bounds access is not hidden inside a larger
cached block):

    compute-sanitizer --tool memcheck --error-exitcode 1 python3 -m benchmarks.memcheck

resnet18 at 64x64, batch 2: its stem takes the few-channel implicit GEMM,
layer1 the 128x64 tiles, layers 2-4 the 128x128 tiles; bfloat16 eval and a
training step (BatchNorm forward and backward, bias/ReLU backward), and a
TF32 float32 eval.
"""
import sys

import torch

import resnet_fast


def main() -> int:
    if not torch.cuda.is_available():
        print("memcheck: needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    torch.backends.cudnn.allow_tf32 = True  # float32 on the TF32 implicit GEMM
    for dtype, train in ((torch.bfloat16, True), (torch.float32, False)):
        model = resnet_fast.resnet18(num_classes=10, backend="native").to("cuda", dtype)
        x = torch.randn(2, 3, 64, 64, device="cuda", dtype=dtype)
        with torch.no_grad():
            model.eval()(x)
        if train:
            model.train()(x).float().sum().backward()
        torch.cuda.synchronize()
        print(f"memcheck: {dtype} eval{' and train step' if train else ''} ran", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
