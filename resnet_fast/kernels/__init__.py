"""Kernel backends written in Python DSLs (as opposed to the compiled
extension resnet_fast._C).

    resnet_fast.kernels.triton   Triton kernels: CUDA GPUs, or the CPU under
                                 Triton's interpreter (TRITON_INTERPRET=1).

Nothing is imported here, so `import resnet_fast.kernels` never needs triton.
"""
