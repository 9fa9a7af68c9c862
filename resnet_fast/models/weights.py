"""Reading weights files safely (no arbitrary unpickling, checksums verified)
and loading them with errors that say exactly what does not fit."""
import os
import zipfile
from typing import Any, Dict, Mapping, Sequence, Union

import torch
from torch import Tensor, nn

from .pretrained import resolve_weights

WeightsSource = Union[str, "os.PathLike[str]", Mapping[str, Tensor], Any]

# Keys under which training scripts commonly nest the model's state_dict.
_NESTED_KEYS = ("state_dict", "model", "model_state_dict", "module")


def _check_zip_checksums(path: str) -> None:
    """torch.save writes a zip archive with a CRC-32 per entry, which
    torch.load does not verify: a flipped bit in the tensor data would load
    as a wrong weight. Verify them (one extra read of the file)."""
    if not zipfile.is_zipfile(path):
        return  # the legacy format, or not torch's: torch.load decides
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise ValueError(f"{path} is a damaged zip archive (truncated or corrupted): {exc}") from exc
    if bad is not None:
        raise ValueError(f"{path} is corrupted: the checksum of its entry {bad!r} does not match its data")


def _read_file(path: str) -> Any:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise ValueError(f"{path} is not a readable safetensors file: {exc}") from exc
    _check_zip_checksums(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(
            f"{path} could not be read as a weights file with torch.load(weights_only=True): {exc}"
        ) from exc


def read_state_dict(weights: WeightsSource) -> Dict[str, Tensor]:
    """A state_dict from a path (.pth/.pt/.safetensors), a mapping, a URL, a
    torchvision weights enum or its qualified name ("ResNet50_Weights.DEFAULT"),
    or a hub name ("timm/resnet50.a1_in1k"); see pretrained.resolve_weights.

    Checkpoints that nest the model under "state_dict"/"model" are unwrapped,
    and DistributedDataParallel's "module." prefix is removed.
    """
    source = resolve_weights(weights).source
    if isinstance(source, Mapping):
        data: Any = source
        origin = "the given mapping"
    else:
        data = _read_file(source)
        origin = source
    for key in _NESTED_KEYS:
        if isinstance(data, Mapping) and key in data and isinstance(data[key], Mapping):
            data = data[key]
            break
    if not isinstance(data, Mapping) or not data or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in data.items()
    ):
        raise ValueError(
            f"{origin} does not hold a state_dict (a mapping of parameter names to tensors); "
            f"found {type(data).__name__}"
        )
    if all(k.startswith("module.") for k in data):
        data = {k[len("module."):]: v for k, v in data.items()}
    return dict(data)


def load_weights(model: nn.Module, weights: WeightsSource, exclude: Sequence[str] = ()) -> nn.Module:
    """Load weights into model strictly, listing every missing, unexpected or
    mis-shaped key when they do not fit. Keys starting with a prefix in
    `exclude` (e.g. "fc." to keep a new head) are left out on both sides, and
    a features_only ResNet ignores the keys of the modules it dropped (fc,
    and layers after its deepest output).

    A BatchNorm's num_batches_tracked may be absent from the file (files
    saved from FrozenBatchNorm2d layers, e.g. detection backbones, have none):
    BatchNorm fills it in itself.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    exclude = tuple(exclude)
    is_removed_key = getattr(model, "is_removed_key", None) or (lambda key: False)
    state = {k: v for k, v in read_state_dict(weights).items() if not k.startswith(exclude) and not is_removed_key(k)}
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith(exclude)}
    missing = sorted(k for k in set(expected) - set(state) if not k.endswith(".num_batches_tracked"))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k].shape
    )
    if missing or unexpected or mismatched:
        parts = []
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
            if items:
                shown = ", ".join(items[:20]) + (f", ... ({len(items) - 20} more)" if len(items) > 20 else "")
                parts.append(f"{title} ({len(items)}): {shown}")
        raise ValueError(f"weights do not fit {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(state, strict=not exclude)
    return model
