"""Classification metrics from logits and targets: top-k accuracy,
per-class precision / recall / F1, and the confusion matrix (as JSON and as
a PNG picture)."""
from typing import Dict, List, Sequence

import torch
from torch import Tensor


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


def save_confusion_png(matrix: Sequence[Sequence[int]], class_names: List[str], path: str,
                       cell: int = 40) -> None:
    """The confusion matrix as a heat map: rows are true classes, columns
    predictions, each cell shaded by its share of the row, with its count."""
    from PIL import Image, ImageDraw

    n = len(class_names)
    label_w = min(160, 8 * max(len(c) for c in class_names) + 10)
    margin_top = 30
    img = Image.new("RGB", (label_w + n * cell + 10, margin_top + label_w + n * cell), "white")
    draw = ImageDraw.Draw(img)
    draw.text((label_w, 5), "predicted ->  (rows: true class)", fill="black")
    for i, row in enumerate(matrix):
        row_total = max(1, sum(row))
        for j, count in enumerate(row):
            share = count / row_total
            shade = int(255 * (1 - share))
            x0, y0 = label_w + j * cell, margin_top + label_w + i * cell
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=(shade, shade, 255), outline="gray")
            if count:
                draw.text((x0 + 4, y0 + cell // 2 - 5), str(count), fill="white" if share > 0.5 else "black")
    for k, name in enumerate(class_names):
        draw.text((4, margin_top + label_w + k * cell + cell // 2 - 5), name[:20], fill="black")
        column = Image.new("RGB", (label_w, cell), "white")
        ImageDraw.Draw(column).text((4, cell // 2 - 5), name[:20], fill="black")
        img.paste(column.rotate(90, expand=True), (label_w + k * cell, margin_top))
    img.save(path)
