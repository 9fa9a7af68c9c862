"""Datasets for training, fine-tuning and evaluation.

Two sources, one interface (`Split`: a map-style dataset of (image, target)
plus its class names and how to preprocess an image for inference):
  - an image-folder tree, `root/train/<class>/*.jpg` and `root/val/<class>/...`
    as torchvision's ImageFolder reads it;
  - the embedded handwritten digits (scikit-learn's 1,797 8x8 scans, shipped
    inside scikit-learn, so nothing is downloaded), upsampled, `digits` or a
    subset of the classes such as `digits:0-4`.

Augmentation is seeded per (seed, epoch, sample index), so a sample gets the
same random crop however the data is split across workers or ranks, and a
resumed run sees exactly what an uninterrupted one would.
"""
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DIGITS_MEAN = (0.5, 0.5, 0.5)
DIGITS_STD = (0.5, 0.5, 0.5)


@dataclass
class Preprocess:
    """How an image becomes a model input: what a checkpoint records so that
    `predict` prepares images exactly as training did."""

    kind: str  # "folder" or "digits"
    image_size: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    # Evaluation resizes the shorter side to this before the center crop
    # (default image_size / 0.875; pretrained weights name their own).
    resize_size: Optional[int] = None

    def as_dict(self) -> Dict:
        return {"kind": self.kind, "image_size": self.image_size, "mean": list(self.mean), "std": list(self.std),
                "resize_size": self.resize_size}

    @classmethod
    def from_dict(cls, d: Dict) -> "Preprocess":
        resize = d.get("resize_size")
        return cls(d["kind"], int(d["image_size"]), tuple(d["mean"]), tuple(d["std"]),
                   None if resize is None else int(resize))

    @classmethod
    def of_weights(cls, weights: Any, image_size: Optional[int] = None) -> "Preprocess":
        """The preprocessing of torchvision weights (their transforms():
        resize, center crop, mean, std), at image_size if given (the resize
        scaled with it)."""
        transform = weights.transforms()
        crop, resize = _first(transform.crop_size), _first(transform.resize_size)
        size = image_size or crop
        return cls("folder", size, tuple(transform.mean), tuple(transform.std), int(round(resize * size / crop)))

    def eval_resize(self) -> int:
        return self.resize_size or int(round(self.image_size / 0.875))


def _first(size: Any) -> int:
    return int(size[0]) if isinstance(size, (list, tuple)) else int(size)


@dataclass
class Split:
    dataset: Dataset  # (image, target); image is a CHW tensor, or None when unreadable
    class_names: List[str]
    preprocess: Preprocess
    paths: Optional[List[str]] = field(default=None)  # per-sample file, for image folders


class UnreadableImage:
    """Stands in for an image that could not be decoded; the batch collation
    drops it and reports its path."""

    def __init__(self, path: str, reason: str):
        self.path, self.reason = path, reason


# ---------------------------------------------------------------- digits

def _parse_digit_classes(spec: str) -> List[int]:
    """'digits' -> 0..9; 'digits:0-4' -> 0..4; 'digits:1,3,5' -> [1, 3, 5]."""
    _, _, wanted = spec.partition(":")
    if not wanted:
        return list(range(10))
    classes: List[int] = []
    try:
        for part in wanted.split(","):
            lo, dash, hi = part.partition("-")
            classes.extend(range(int(lo), int(hi) + 1) if dash else [int(lo)])
    except ValueError:
        raise ValueError(f"--data {spec!r}: expected digits, digits:A-B or digits:A,B,... with digits 0-9") from None
    if not classes or any(c < 0 or c > 9 for c in classes) or len(set(classes)) != len(classes):
        raise ValueError(f"--data {spec!r}: classes must be distinct digits 0-9, got {classes}")
    return sorted(classes)


def _digits_split_indices(targets: Tensor, train_fraction: float = 0.8) -> Tuple[Tensor, Tensor]:
    """A fixed stratified split: the same images are in `val` on every machine."""
    g = torch.Generator().manual_seed(0)
    train, val = [], []
    for c in range(10):
        idx = (targets == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        cut = int(round(train_fraction * len(idx)))
        train.append(idx[:cut])
        val.append(idx[cut:])
    return torch.cat(train), torch.cat(val)


class _TensorImages(Dataset):
    def __init__(self, images: Tensor, targets: Tensor):
        self.images, self.targets = images, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.images[i], int(self.targets[i])


def digits_split(spec: str, split: str, image_size: int, per_class_limit: Optional[int] = None) -> Split:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError(
            "the embedded digits dataset needs scikit-learn: pip install scikit-learn"
        ) from exc
    classes = _parse_digit_classes(spec)
    digits = load_digits()
    images = torch.from_numpy(digits.images).float().div_(16.0).unsqueeze(1)  # (N, 1, 8, 8) in [0, 1]
    targets = torch.from_numpy(digits.target).long()
    train_idx, val_idx = _digits_split_indices(targets)
    idx = train_idx if split == "train" else val_idx
    idx = torch.cat([i for i in (idx[targets[idx] == c] for c in classes)])
    if per_class_limit is not None:
        idx = torch.cat([idx[targets[idx] == c][:per_class_limit] for c in classes])
    images = torch.nn.functional.interpolate(images[idx], size=(image_size, image_size), mode="bilinear",
                                             align_corners=False).clamp_(0, 1).expand(-1, 3, -1, -1).contiguous()
    relabel = {c: i for i, c in enumerate(classes)}
    targets = torch.tensor([relabel[int(t)] for t in targets[idx]])
    return Split(_TensorImages(images, targets), [str(c) for c in classes],
                 Preprocess("digits", image_size, DIGITS_MEAN, DIGITS_STD))


# ---------------------------------------------------------- image folders

def _load_image(path: str):
    from PIL import Image

    with open(path, "rb") as f:
        img = Image.open(f)
        return img.convert("RGB")


class _ImageFiles(Dataset):
    def __init__(self, samples: Sequence[Tuple[str, int]]):
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from torchvision.transforms.v2.functional import pil_to_tensor

        path, target = self.samples[i]
        try:
            return pil_to_tensor(_load_image(path)), target
        except Exception as exc:  # PIL raises many types for a bad file
            return UnreadableImage(path, f"{type(exc).__name__}: {exc}"), target


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def scan_image_folder(directory: str) -> Tuple[List[str], List[Tuple[str, int]]]:
    """(class names, [(path, class index)]) of one split directory, with an
    error that names the problem when it is missing, empty, or has a class
    folder without images."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"data directory not found: {directory}")
    classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(f"{directory} has no class folders: expected {directory}/<class name>/<images>")
    samples: List[Tuple[str, int]] = []
    empty = []
    for index, name in enumerate(classes):
        found = [
            os.path.join(dirpath, f)
            for dirpath, _, files in sorted(os.walk(os.path.join(directory, name), followlinks=True))
            for f in sorted(files) if _is_image(f)
        ]
        if not found:
            empty.append(name)
        samples.extend((path, index) for path in found)
    if empty:
        raise ValueError(
            f"class folder(s) with no images in {directory}: {', '.join(empty)} "
            f"(image files end in {', '.join(IMAGE_EXTENSIONS)})"
        )
    return classes, samples


def folder_split(root: str, split: str, image_size: int, class_names: Optional[List[str]] = None,
                 per_class_limit: Optional[int] = None) -> Split:
    """One split (train/val) of an image-folder tree. `class_names`, when
    given (those of the training split), must contain this split's classes."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data directory not found: {root}")
    classes, samples = scan_image_folder(os.path.join(root, split))
    if class_names is not None and classes != class_names:
        unknown = sorted(set(classes) - set(class_names))
        if unknown:
            raise ValueError(f"{root}/{split} has classes the model does not know: {', '.join(unknown)}")
        index = {name: i for i, name in enumerate(class_names)}
        samples = [(path, index[classes[t]]) for path, t in samples]
        classes = class_names
    if per_class_limit is not None:
        kept: Dict[int, int] = {}
        limited = []
        for path, t in samples:
            if kept.get(t, 0) < per_class_limit:
                kept[t] = kept.get(t, 0) + 1
                limited.append((path, t))
        samples = limited
    return Split(_ImageFiles(samples), classes, Preprocess("folder", image_size, IMAGENET_MEAN, IMAGENET_STD),
                 [p for p, _ in samples])


def load_split(data: Optional[str], split: str, image_size: Optional[int] = None,
               class_names: Optional[List[str]] = None, per_class_limit: Optional[int] = None) -> Split:
    """The `split` ("train" or "val") of `data`: None or 'digits[:classes]'
    for the embedded digits, otherwise an image-folder root."""
    if per_class_limit is not None and per_class_limit < 1:
        raise ValueError(f"the per-class image limit must be at least 1, got {per_class_limit}")
    if data is None or data == "digits" or data.startswith("digits:"):
        out = digits_split(data or "digits", split, image_size or 32, per_class_limit)
        if class_names is not None and out.class_names != class_names:
            raise ValueError(f"the model's classes {class_names} differ from the data's {out.class_names}")
        return out
    return folder_split(data, split, image_size or 224, class_names, per_class_limit)


# ---------------------------------------------------------- augmentation

def train_transform(pre: Preprocess) -> Callable[[Tensor], Tensor]:
    from torchvision.transforms import v2

    if pre.kind == "digits":  # no flips: a mirrored digit is another symbol
        augment = [v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1))]
    else:
        augment = [v2.RandomResizedCrop(pre.image_size, antialias=True), v2.RandomHorizontalFlip()]
    return v2.Compose([*augment, v2.ToDtype(torch.float32, scale=True), v2.Normalize(pre.mean, pre.std)])


def eval_transform(pre: Preprocess) -> Callable[[Tensor], Tensor]:
    from torchvision.transforms import v2

    resize = []
    if pre.kind != "digits":
        resize = [v2.Resize(pre.eval_resize(), antialias=True), v2.CenterCrop(pre.image_size)]
    return v2.Compose([*resize, v2.ToDtype(torch.float32, scale=True), v2.Normalize(pre.mean, pre.std)])


def image_file_to_input(path: str, pre: Preprocess) -> Tensor:
    """One image file as a (1, 3, H, W) model input, preprocessed as in training."""
    from torchvision.transforms.v2.functional import pil_to_tensor

    img = _load_image(path)
    if pre.kind == "digits":
        img = img.convert("L").resize((pre.image_size, pre.image_size)).convert("RGB")
    return eval_transform(pre)(pil_to_tensor(img)).unsqueeze(0)


class Transformed(Dataset):
    """`base` with a transform applied, seeded per (seed, epoch, index)."""

    def __init__(self, base: Dataset, transform: Callable[[Tensor], Tensor], seed: Optional[int] = None):
        self.base, self.transform, self.seed = base, transform, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        image, target = self.base[i]
        if isinstance(image, UnreadableImage):
            return image, target
        if self.seed is None:
            return self.transform(image), target
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(((self.seed * 1_000_003 + self.epoch) * 10_000_019 + i) % 2**63)
            return self.transform(image), target


def collate_skipping_unreadable(batch):
    """(images, targets, unreadable) where unreadable lists the files of the
    batch that could not be decoded (left out of images and targets)."""
    unreadable = [img for img, _ in batch if isinstance(img, UnreadableImage)]
    kept = [(img, t) for img, t in batch if not isinstance(img, UnreadableImage)]
    if not kept:
        return None, None, unreadable
    return torch.stack([img for img, _ in kept]), torch.tensor([t for _, t in kept]), unreadable
