"""What a builder's `weights=` names, resolved to a local file or a state_dict
plus what is known about it, as torchvision resolves its own:

- torchvision's weights enums (ResNet50_Weights.IMAGENET1K_V2), and their
  names as strings ("DEFAULT", "IMAGENET1K_V2", "ResNet50_Weights.IMAGENET1K_V2");
- http(s) URLs;
- timm's hub names ("timm/resnet50.a1_in1k", or "hf-hub:<repo>"), through
  huggingface_hub;
- local paths (.pth, .pt, .safetensors) and state_dict mappings.

Files are downloaded into torch.hub's cache (download.cached_download), or
huggingface_hub's for hub names.
"""
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Union

from .download import WeightsDownloadError, cached_download

# "DEFAULT", "IMAGENET1K_V2", "ResNet50_Weights.IMAGENET1K_V2"
_ENUM_NAME = re.compile(r"^(?:(?P<enum>\w+_Weights)\.)?(?P<name>[A-Z][A-Z0-9_]*)$")
_URL = re.compile(r"^https?://", re.IGNORECASE)
_HUB_PREFIXES = ("timm/", "hf-hub:")


@dataclass
class ResolvedWeights:
    source: Union[str, Mapping[str, Any]]  # a local file, or a state_dict
    meta: Dict[str, Any] = field(default_factory=dict)  # torchvision's meta: categories, ...
    torchvision_weights: Any = None  # the enum entry, when there is one (its transforms())

    @property
    def categories(self) -> Optional[list]:
        return self.meta.get("categories")


def is_torchvision_weights(weights: Any) -> bool:
    return hasattr(weights, "url") and hasattr(weights, "meta") and hasattr(weights, "transforms")


def resolve_weights(weights: Any, arch: Optional[str] = None, progress: bool = True) -> ResolvedWeights:
    """Resolve `weights` for the builder `arch` (None where no builder is
    known: then a bare name like "DEFAULT" cannot be resolved)."""
    if isinstance(weights, Mapping):
        return ResolvedWeights(weights)
    if is_torchvision_weights(weights):
        _check_enum_fits(weights, arch)
        return _from_enum(weights, progress)
    if isinstance(weights, os.PathLike):
        return ResolvedWeights(os.fspath(weights))
    if not isinstance(weights, str):
        raise TypeError(
            "weights must be a torchvision weights enum or its name, a URL, a file path or a state_dict, "
            f"got {type(weights).__name__}"
        )
    if _URL.match(weights):
        enum = _enum_with_url(weights, arch)
        if enum is not None:
            return _from_enum(enum, progress)
        return ResolvedWeights(cached_download(weights, progress))
    if weights.startswith(_HUB_PREFIXES):
        return ResolvedWeights(_hub_file(weights))
    named = _ENUM_NAME.match(weights)
    if named is not None and not os.path.exists(weights):
        return _from_enum(_enum_named(named.group("enum"), named.group("name"), arch), progress)
    return ResolvedWeights(weights)


def _from_enum(weights: Any, progress: bool) -> ResolvedWeights:
    return ResolvedWeights(cached_download(weights.url, progress), dict(weights.meta), weights)


def _torchvision_models():
    try:
        import torchvision.models
    except ImportError as exc:
        raise ImportError("weights given by name need torchvision's table of weights: pip install torchvision") from exc
    return torchvision.models


def _weights_class(arch: str) -> Any:
    models = _torchvision_models()
    try:
        return models.get_model_weights(arch)
    except (ValueError, KeyError) as exc:
        raise ValueError(f"torchvision has no weights table for {arch!r}") from exc


def _check_enum_fits(weights: Any, arch: Optional[str]) -> None:
    if arch is None:
        return
    expected = _weights_class(arch)
    if type(weights) is not expected:
        raise ValueError(
            f"{type(weights).__name__}.{weights.name} are not weights for {arch}: use {expected.__name__} "
            f"({', '.join(_names(expected))})"
        )


def _names(enum_class: Any) -> list:
    return ["DEFAULT"] + [member.name for member in enum_class]


def _enum_named(enum_name: Optional[str], name: str, arch: Optional[str]) -> Any:
    if arch is None and enum_name is None:
        raise ValueError(
            f"weights={name!r} names weights without saying for which network: build with it "
            f"(resnet_fast.resnet50(weights={name!r})) or qualify it ('ResNet50_Weights.{name}')"
        )
    enum_class = _weights_class(arch) if arch is not None else getattr(_torchvision_models(), enum_name, None)
    if enum_class is None:
        raise ValueError(f"torchvision has no weights table {enum_name!r}")
    if enum_name is not None and enum_name != enum_class.__name__:
        raise ValueError(f"{enum_name}.{name} are not weights for {arch}: use {enum_class.__name__}")
    if name == "DEFAULT":
        return enum_class.DEFAULT
    if name not in enum_class.__members__:
        raise ValueError(
            f"{enum_class.__name__} has no weights named {name!r}; choose one of {', '.join(_names(enum_class))}, "
            "or pass a file path or URL"
        )
    return enum_class[name]


def _enum_with_url(url: str, arch: Optional[str]) -> Any:
    """torchvision's entry for `url`, so a URL of torchvision's carries its
    categories and preprocessing; None for other URLs."""
    if arch is None:
        return None
    try:
        enum_class = _weights_class(arch)
    except (ImportError, ValueError):
        return None
    return next((member for member in enum_class if member.url == url), None)


def _hub_file(name: str) -> str:
    """The weights file of a Hugging Face hub repository ("timm/<model>" or
    "hf-hub:<org>/<model>"), in huggingface_hub's cache."""
    repo = name[len("hf-hub:"):] if name.startswith("hf-hub:") else name
    try:
        import huggingface_hub
        from huggingface_hub.utils import EntryNotFoundError
    except ImportError as exc:
        raise ImportError(f"weights={name!r} needs huggingface_hub: pip install timm (or huggingface_hub)") from exc
    try:
        try:
            return huggingface_hub.hf_hub_download(repo, "model.safetensors")
        except EntryNotFoundError:  # older repositories hold only the pickle
            return huggingface_hub.hf_hub_download(repo, "pytorch_model.bin")
    except Exception as exc:  # huggingface_hub's own errors: offline, missing repository, HTTP
        raise WeightsDownloadError(
            f"could not get the weights of {repo} from the Hugging Face hub: {exc}. On a machine without network, "
            "download model.safetensors elsewhere and pass its path as weights"
        ) from exc
