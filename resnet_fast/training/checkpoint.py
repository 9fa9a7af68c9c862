"""Training checkpoints: everything a resumed run needs to continue exactly
where the interrupted one stopped, written so that a crash never leaves a
half-written file behind."""
import os
import random
import tempfile
from typing import Any, Dict

import torch
from torch import nn

CHECKPOINT_FORMAT = 1


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel (or the model itself)."""
    return getattr(model, "module", model)


def rng_state() -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj: Any, path: str) -> None:
    """torch.save to a temporary file in the same directory, then rename:
    readers see the old file or the new one, never a partial one."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=directory)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a checkpoint is an ordinary file
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(path: str, *, model, optimizer, scheduler, scaler, epoch: int, class_names, config: Dict,
                    preprocess: Dict, best_acc1: float) -> None:
    atomic_save({
        "format": CHECKPOINT_FORMAT,
        "arch": config["arch"],
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch,  # epochs completed
        "rng": rng_state(),
        "class_names": list(class_names),
        "preprocess": preprocess,
        "config": config,
        "best_acc1": best_acc1,
    }, path)


def load_checkpoint(path: str) -> Dict[str, Any]:
    """A checkpoint written by save_checkpoint, read with weights_only=True
    (no arbitrary code runs while loading)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path} is not a readable checkpoint: {exc}") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a resnet_fast training checkpoint (a plain weights file? use --weights)")
    return ckpt


def is_training_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT and "model" in obj
