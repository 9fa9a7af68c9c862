"""CUDA-graph replay for small-batch inference, where launching the ~50
kernels of a ResNet one by one costs more than running them."""
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map


class CUDAGraphed:
    """A captured forward of `model` for inputs shaped like the example:
    each call copies the input into the captured input buffer, replays the
    graph, and returns a copy of the output (or the captured output buffer
    itself with clone_output=False, overwritten by the next call).

    The graph holds the weights as they were at capture (BatchNorm folded):
    capture again after changing them.
    """

    def __init__(self, model: nn.Module, example: Tensor, warmup: int = 3, clone_output: bool = True):
        if not isinstance(example, Tensor):
            raise TypeError(f"example must be a Tensor, got {type(example).__name__}")
        if example.device.type != "cuda":
            raise RuntimeError(
                f"cuda_graphed needs a CUDA model and a CUDA example input; the example is on {example.device}"
            )
        parameter = next(iter(model.parameters()), None)
        if parameter is not None and parameter.device.type != "cuda":
            raise RuntimeError(f"cuda_graphed needs a CUDA model; the model is on {parameter.device} (call .cuda())")
        if model.training:
            raise ValueError("cuda_graphed captures inference: call model.eval() first")
        self.model = model
        self.clone_output = clone_output
        self._input = example.detach().clone()
        with torch.no_grad():
            # Warm up on a side stream (as CUDA-graph capture requires): fills
            # the fold caches and lets cuDNN pick its algorithms.
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(warmup):
                    model(self._input)
            torch.cuda.current_stream().wait_stream(stream)
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph):
                self._output = model(self._input)

    def __call__(self, x: Tensor) -> Any:
        if not isinstance(x, Tensor):
            raise TypeError(f"expected a Tensor input, got {type(x).__name__}")
        if x.shape != self._input.shape or x.dtype != self._input.dtype or x.device != self._input.device:
            raise ValueError(
                f"this graph was captured for inputs of shape {tuple(self._input.shape)}, {self._input.dtype} on "
                f"{self._input.device}; got {tuple(x.shape)}, {x.dtype} on {x.device} (capture another with cuda_graphed)"
            )
        self._input.copy_(x)
        self._graph.replay()
        if not self.clone_output:
            return self._output
        # A tensor, or a list / dict of them (features_only, feature extractors).
        return tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, self._output)


def cuda_graphed(model: nn.Module, example: Tensor, warmup: int = 3, clone_output: bool = True) -> CUDAGraphed:
    """`model`'s eval forward captured as a CUDA graph for inputs shaped like
    `example`; call the result like the model. Raises on CPU models/inputs."""
    return CUDAGraphed(model, example, warmup, clone_output)
