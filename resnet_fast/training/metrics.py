"""Classification metrics from logits and targets: top-k accuracy,
per-class precision / recall / F1, and the confusion matrix (as JSON, and
as PNG and SVG pictures drawn with matplotlib when it is installed)."""
import os
import warnings
from typing import Callable, Dict, List, Sequence

import torch
from torch import Tensor

INSTALL_HINT = "pip install matplotlib, or pip install 'resnet_fast[train]'"
MAX_ANNOTATED_CLASSES = 30  # beyond this, no values in the cells
MAX_TICK_LABELS = 30  # beyond this, every k-th class name only
MAX_LABEL_CHARS = 24


def topk_correct(logits: Tensor, targets: Tensor, ks: Sequence[int] = (1, 5)) -> Dict[int, int]:
    """How many samples have their target among the top k logits, per k
    (k is capped at the number of classes)."""
    maxk = min(max(ks), logits.shape[1])
    top = logits.topk(maxk, dim=1).indices
    hits = top.eq(targets.view(-1, 1))
    return {k: int(hits[:, :min(k, maxk)].any(dim=1).sum()) for k in ks}


def confusion_matrix(predictions: Tensor, targets: Tensor, num_classes: int) -> Tensor:
    """counts[true, predicted]."""
    flat = targets.long() * num_classes + predictions.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def classification_report(logits: Tensor, targets: Tensor, class_names: List[str]) -> Dict:
    """Top-1/top-5 accuracy, per-class precision, recall, F1 and support,
    their macro averages, and the confusion matrix."""
    n = len(class_names)
    if logits.shape[1] != n:
        raise ValueError(f"the model has {logits.shape[1]} outputs but there are {n} class names")
    total = len(targets)
    if total == 0:
        raise ValueError("no samples to evaluate")
    correct = topk_correct(logits, targets, (1, 5))
    cm = confusion_matrix(logits.argmax(1), targets, n).double()
    true_pos = cm.diag()
    predicted = cm.sum(0)
    actual = cm.sum(1)
    # A class never predicted (or absent) has precision (recall) 0, as sklearn's zero_division=0.
    precision = torch.where(predicted > 0, true_pos / predicted.clamp_min(1), torch.zeros_like(true_pos))
    recall = torch.where(actual > 0, true_pos / actual.clamp_min(1), torch.zeros_like(true_pos))
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp_min(1e-300), torch.zeros_like(denom))
    per_class = {
        name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
               "support": int(actual[i])}
        for i, name in enumerate(class_names)
    }
    return {
        "samples": total,
        "top1": correct[1] / total,
        "top5": correct[5] / total,
        "macro_precision": float(precision.mean()),
        "macro_recall": float(recall.mean()),
        "macro_f1": float(f1.mean()),
        "per_class": per_class,
        "class_names": list(class_names),
        "confusion_matrix": cm.long().tolist(),
    }


def format_report(report: Dict) -> str:
    width = max(9, *(len(name) for name in report["class_names"]))
    lines = [
        f"samples {report['samples']}  top-1 {100 * report['top1']:.2f}%  top-5 {100 * report['top5']:.2f}%  "
        f"macro F1 {report['macro_f1']:.4f}",
        f"{'class':<{width}}  precision  recall     f1  support",
    ]
    for name, m in report["per_class"].items():
        lines.append(f"{name:<{width}}  {m['precision']:9.4f}  {m['recall']:6.4f}  {m['f1']:.4f}  {m['support']:7d}")
    return "\n".join(lines)


def _cell_text_colour(cmap, norm, value: float) -> str:
    """Black on light cells, white on dark ones (by the cell's luminance)."""
    r, g, b, _ = cmap(norm(value))
    return "black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.5 else "white"


def _short(name: str) -> str:
    return name if len(name) <= MAX_LABEL_CHARS else name[:MAX_LABEL_CHARS - 1] + "…"


def _label_font_size(n: int) -> int:
    return 9 if n <= 10 else 7


def _cell_font_size(n: int) -> int:
    return 9 if n <= 10 else 8 if n <= 20 else 6


def _label_inches(class_names: List[str]) -> float:
    """About how far the longest (shortened) class name reaches."""
    longest = max(len(_short(name)) for name in class_names)
    return 0.08 * longest * _label_font_size(len(class_names)) / 9


def _label_axes(ax, class_names: List[str]) -> None:
    """Class names on both axes, every k-th one for many classes; the column
    names slanted when long."""
    n = len(class_names)
    step = -(-n // MAX_TICK_LABELS)
    ticks = list(range(0, n, step))
    names = [_short(class_names[i]) for i in ticks]
    slanted = max(len(name) for name in names) > 3
    size = _label_font_size(n)
    ax.set_xticks(ticks, names, fontsize=size, rotation=45 if slanted else 0,
                  ha="right" if slanted else "center", rotation_mode="anchor")
    ax.set_yticks(ticks, names, fontsize=size)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")


def _finite_cells(values):
    import numpy as np

    for (i, j), value in np.ndenumerate(values):
        if np.isfinite(value):
            yield (i, j), value


def _count_text(value: float) -> str:
    return str(int(value))


def _share_text(value: float) -> str:
    return "0" if value == 0 else f"{value:.2f}"


def _heat_map(fig, ax, values, title: str, colour_label: str, cell_text: Callable[[float], str], vmax: float,
              annotate: bool) -> None:
    """One panel: the matrix as an image, its colour bar, and (for few
    classes) each cell's value."""
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    cmap = colormaps["Blues"].with_extremes(bad="0.85")  # grey: a class with no samples
    norm = Normalize(0, vmax)
    image = ax.imshow(values, cmap=cmap, norm=norm, interpolation="nearest")
    fig.colorbar(image, ax=ax, label=colour_label, shrink=0.8)
    ax.set_title(title, fontsize=11)
    if annotate:
        size = _cell_font_size(len(values))
        for (i, j), value in _finite_cells(values):
            ax.text(j, i, cell_text(value), ha="center", va="center", fontsize=size,
                    color=_cell_text_colour(cmap, norm, value))


def row_normalised(counts):
    """Each row divided by its true-class count (recall on the diagonal);
    rows of classes with no samples are NaN."""
    import numpy as np

    totals = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, counts / totals, np.nan)


def confusion_figure(matrix: Sequence[Sequence[int]], class_names: List[str]):
    """The confusion matrix as a matplotlib Figure (Agg canvas, no pyplot):
    the counts, and each row as a share of its true class, side by side,
    each with its colour bar. Rows are true classes, columns predictions."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = np.asarray(matrix, dtype=np.int64)
    n = len(class_names)
    if counts.shape != (n, n):
        raise ValueError(f"a {counts.shape} matrix for {n} class names")
    side = min(10.0, max(3.5, 0.42 * n + 1.5))  # inches per matrix
    labels = _label_inches(class_names)
    # Each panel: names on the left, the matrix, its colour bar; the slanted names below.
    fig = Figure(figsize=(2 * (labels + side + 1.3), side + 0.75 * labels + 1.2), layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    annotate = n <= MAX_ANNOTATED_CLASSES
    _heat_map(fig, left, counts, "counts", "samples", _count_text, max(1, int(counts.max())), annotate)
    _heat_map(fig, right, row_normalised(counts), "share of the true class (recall on the diagonal)",
              "share of the row", _share_text, 1.0, annotate)
    for ax in (left, right):
        _label_axes(ax, class_names)
    fig.suptitle(f"confusion matrix, {int(counts.sum())} samples, {n} classes")
    return fig


def save_confusion_png(matrix: Sequence[Sequence[int]], class_names: List[str], path: str) -> List[str]:
    """The confusion matrix as pictures: <stem>.png and <stem>.svg, the stem
    being `path` without its extension (see confusion_figure). Returns the
    files written; without matplotlib, none (with a warning saying how to
    get them)."""
    try:
        from matplotlib import rc_context
    except ImportError as error:
        warnings.warn(f"confusion matrix pictures not drawn: matplotlib is not available ({error}); {INSTALL_HINT}",
                      stacklevel=2)
        return []
    fig = confusion_figure(matrix, class_names)
    stem = os.path.splitext(path)[0]
    paths = [stem + ".png", stem + ".svg"]
    fig.savefig(paths[0], dpi=100)
    # Text stays text (searchable, smaller); no date and fixed ids: same matrix, same file.
    with rc_context({"svg.fonttype": "none", "svg.hashsalt": "resnet_fast"}):
        fig.savefig(paths[1], metadata={"Date": None})
    return paths
