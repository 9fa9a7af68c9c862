"""Feature-map bookkeeping for ResNet backbones: which stages to return
(`out_indices`) and what each one is (`FeatureInfo`), with timm's conventions.

A ResNet has five feature stages:
  0: C1, the stem's activation (after conv1/bn1/relu, stride 2), module "relu"
  1: C2, layer1 (stride 4) ... 4: C5, layer4 (stride 32, less when dilated)
"""
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

from torch import nn

NUM_STAGES = 5
STAGE_MODULES = ("relu", "layer1", "layer2", "layer3", "layer4")


def normalize_indices(indices: Sequence[int], num_stages: int = NUM_STAGES, name: str = "out_indices") -> Tuple[int, ...]:
    """Stage indices as sorted non-negative ints; negative ones count from the
    last stage. Raises when one is out of range, repeated, or not an int."""
    if isinstance(indices, int) or not isinstance(indices, Sequence) or isinstance(indices, str):
        raise TypeError(f"{name} must be a sequence of ints, got {indices!r}")
    if len(indices) == 0:
        raise ValueError(f"{name} must not be empty")
    result = []
    for index in indices:
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"{name} must hold ints, got {index!r} in {tuple(indices)!r}")
        if not -num_stages <= index < num_stages:
            raise ValueError(
                f"{name} entry {index} is out of range: this model has {num_stages} feature stages, "
                f"so indices must lie in [{-num_stages}, {num_stages - 1}] (0 = stem, {num_stages - 1} = last layer)"
            )
        result.append(index % num_stages)
    if len(set(result)) != len(result):
        raise ValueError(f"{name} names a stage twice: {tuple(indices)!r}")
    return tuple(sorted(result))


def last_n_indices(n: int, num_stages: int = NUM_STAGES) -> Tuple[int, ...]:
    """The last n stages, as timm's forward_intermediates(indices=n) takes them."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= num_stages:
        raise ValueError(f"indices as an int must be between 1 and {num_stages} (the last n stages), got {n!r}")
    return tuple(range(num_stages - n, num_stages))


class FeatureInfo:
    """Channels, reduction (stride w.r.t. the input) and module name of each
    returned feature map, as timm's FeatureInfo offers them.

    Iterating or indexing gives dicts with "num_chs", "reduction", "module".
    """

    def __init__(self, stages: List[Dict[str, Union[int, str]]], out_indices: Sequence[int]):
        self._stages = stages
        self.out_indices = tuple(out_indices)

    def _select(self, key: str, idx: Optional[Union[int, Sequence[int]]]):
        if idx is None:
            return [self._stages[i][key] for i in self.out_indices]
        if isinstance(idx, int):
            return self._stages[self.out_indices[idx]][key]
        return [self._stages[self.out_indices[i]][key] for i in idx]

    def channels(self, idx: Optional[Union[int, Sequence[int]]] = None):
        return self._select("num_chs", idx)

    def reduction(self, idx: Optional[Union[int, Sequence[int]]] = None):
        return self._select("reduction", idx)

    def module_name(self, idx: Optional[Union[int, Sequence[int]]] = None):
        return self._select("module", idx)

    def get_dicts(self, keys: Optional[Sequence[str]] = None) -> List[Dict[str, Union[int, str]]]:
        dicts = [dict(self._stages[i]) for i in self.out_indices]
        if keys is None:
            return dicts
        return [{k: d[k] for k in keys} for d in dicts]

    def __getitem__(self, item: int) -> Dict[str, Union[int, str]]:
        return dict(self._stages[self.out_indices[item]])

    def __len__(self) -> int:
        return len(self.out_indices)

    def __iter__(self) -> Iterator[Dict[str, Union[int, str]]]:
        return iter(self.get_dicts())

    def __repr__(self) -> str:
        return f"FeatureInfo({self.get_dicts()})"


def _block_out_channels(block: nn.Module) -> int:
    last_conv = getattr(block, "conv3", None) or block.conv2
    return last_conv.out_channels


def stage_info(model: nn.Module) -> List[Dict[str, Union[int, str]]]:
    """num_chs / reduction / module of every stage the model has, read from
    its modules (so dilated layers and custom widths come out right)."""
    reduction = model.conv1.stride[0]
    stages: List[Dict[str, Union[int, str]]] = [
        {"num_chs": model.conv1.out_channels, "reduction": reduction, "module": STAGE_MODULES[0]}
    ]
    if hasattr(model, "maxpool"):
        stride = model.maxpool.stride
        reduction *= stride if isinstance(stride, int) else stride[0]
    for i in range(1, NUM_STAGES):
        layer = getattr(model, STAGE_MODULES[i], None)
        if layer is None:
            break
        first_stride = layer[0].stride
        reduction *= first_stride if isinstance(first_stride, int) else first_stride[0]
        stages.append({"num_chs": _block_out_channels(layer[-1]), "reduction": reduction, "module": STAGE_MODULES[i]})
    return stages
