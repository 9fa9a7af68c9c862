"""The training and inference loops."""
import contextlib
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .distributed import all_sum


def autocast(device: torch.device, amp: str):
    """Mixed precision as --amp asks: 'bf16', 'fp16' or 'off'."""
    if amp == "off":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return torch.autocast(device.type, dtype=dtype)


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)


def train_one_epoch(model: nn.Module, loader, optimizer, scheduler, scaler, loss_fn, device: torch.device,
                    amp: str, desc: str, show_progress: bool) -> Dict:
    """One pass over `loader`; returns the epoch's loss, accuracy, images/s
    (summed over ranks) and the files that could not be read."""
    model.train()
    loss_sum = correct = seen = 0.0
    unreadable: List[str] = []
    start = time.perf_counter()
    bar = _progress(loader, len(loader), desc, show_progress)
    for images, targets, skipped in bar:
        unreadable.extend(u.path for u in skipped)
        if images is None:
            continue
        images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        targets = targets.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(images)
            loss = loss_fn(logits, targets)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: the loss is {loss.item()}; lower the learning rate or use --amp off")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step()
        n = len(targets)
        loss_sum += loss.item() * n
        correct += (logits.argmax(1) == targets).sum().item()
        seen += n
        if bar is not loader:
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", img_s=f"{seen / elapsed:.0f}")
    elapsed = time.perf_counter() - start
    loss_sum, correct, seen = all_sum([loss_sum, correct, seen], device)
    return {
        "train_loss": loss_sum / max(seen, 1),
        "train_acc1": correct / max(seen, 1),
        "images_per_s": seen / elapsed,
        "unreadable": unreadable,
    }


@torch.no_grad()
def predict_logits(model: nn.Module, loader, device: torch.device, amp: str,
                   show_progress: bool = False) -> Tuple[Tensor, Tensor, List[str]]:
    """(logits, targets, unreadable files) over every batch of `loader`."""
    model.eval()
    all_logits, all_targets, unreadable = [], [], []
    for images, targets, skipped in _progress(loader, len(loader), "eval", show_progress):
        unreadable.extend(u.path for u in skipped)
        if images is None:
            continue
        images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            logits = model(images)
        all_logits.append(logits.float().cpu())
        all_targets.append(targets)
    if not all_logits:
        raise ValueError("no readable images to evaluate")
    return torch.cat(all_logits), torch.cat(all_targets), unreadable
