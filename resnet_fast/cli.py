"""The `resnet-fast` command (also `python -m resnet_fast`): train,
finetune, eval and predict.

    resnet-fast train                                   # the embedded digits, on this machine's device
    resnet-fast train --data path/to/images --arch resnet50 --amp bf16
    resnet-fast finetune --weights IMAGENET1K_V2 --arch resnet50 --data path/to/images --freeze backbone
    resnet-fast eval --weights runs/train/last.pt
    resnet-fast predict --weights runs/train/last.pt image1.png image2.jpg
    resnet-fast predict --weights DEFAULT --arch resnet50 photo.jpg   # ImageNet's categories
    torchrun --nproc-per-node 2 -m resnet_fast train --sync-bn
"""
import argparse
import sys
from typing import List, Optional

from .backends import BACKENDS
from .models.download import WeightsDownloadError

DATA_HELP = ("an image-folder root with train/ and val/ (one folder per class), or 'digits' (default): "
             "the embedded handwritten digits; 'digits:0-4' or 'digits:5,6,7' for some of the classes")


WEIGHTS_HELP = ("a torchvision weights name (DEFAULT, IMAGENET1K_V1, IMAGENET1K_V2, ResNet50_Weights.IMAGENET1K_V2; "
                "downloaded into torch.hub's cache), a URL, timm/<model>, or a state_dict file (.pth/.safetensors)")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None, help=DATA_HELP)
    p.add_argument("--arch", default="resnet18", help="any resnet_fast builder (default resnet18)")
    p.add_argument("--backend", default=None, choices=BACKENDS, help="fused-op backend (default: best available)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1, ...")
    p.add_argument("--image-size", type=int, default=None, help="input size (default 32 for digits, 224 for folders)")
    p.add_argument("--batch-size", type=int, default=64, help="per process (default 64)")
    p.add_argument("--workers", type=int, default=0, help="data-loading processes (default 0)")
    p.add_argument("--amp", default="off", choices=("off", "bf16", "fp16"), help="mixed precision (default off)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=sys.stderr.isatty(),
                   help="progress bars (default: when stderr is a terminal)")


def _training(p: argparse.ArgumentParser, default_epochs: int, default_lr: float) -> None:
    _common(p)
    p.add_argument("--epochs", type=int, default=default_epochs)
    p.add_argument("--opt", default="sgd", choices=("sgd", "adamw"))
    p.add_argument("--lr", type=float, default=default_lr, help="head learning rate (and the backbone's, by default)")
    p.add_argument("--backbone-lr", type=float, default=None, help="backbone learning rate (default: --lr)")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--train-limit", type=int, default=None, help="at most this many training images per class")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sync-bn", action="store_true", help="BatchNorm statistics over all processes (torchrun)")
    p.add_argument("--output", default=None, help="run directory: checkpoints, log.jsonl (default runs/<command>)")
    p.add_argument("--resume", default=None, help="continue from a checkpoint (e.g. runs/train/last.pt)")
    p.add_argument("--tensorboard", action="store_true", help="also log to <output>/tensorboard")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="resnet-fast", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train from scratch")
    _training(p, default_epochs=10, default_lr=0.1)

    p = sub.add_parser("finetune", help="start from pretrained weights with a new head")
    _training(p, default_epochs=5, default_lr=0.05)
    p.add_argument("--weights", required=True, help="pretrained weights for --arch: " + WEIGHTS_HELP)
    p.add_argument("--freeze", default="none",
                   help="none (default), bn, backbone, or upto:stem|layer1|layer2|layer3|layer4")

    p = sub.add_parser("eval", help="accuracy, per-class precision/recall/F1 and a confusion matrix")
    _common(p)
    p.add_argument("--weights", required=True, help="a training checkpoint, or weights for --arch: " + WEIGHTS_HELP)
    p.add_argument("--split", default="val", help="which split of --data (default val)")
    p.add_argument("--output", default="runs/eval", help="where eval.json and the confusion matrix go")

    p = sub.add_parser("predict", help="classify image files")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--weights", required=True, help="a training checkpoint, or weights for --arch: " + WEIGHTS_HELP)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--backend", default=None, choices=BACKENDS)
    p.add_argument("--device", default="auto")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--json", default=None, help="also write the predictions to this JSON file")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from .training import run

    if getattr(args, "output", "") is None:
        args.output = f"runs/{args.command}"
    command = {"train": run.train, "finetune": run.train, "eval": run.evaluate, "predict": run.predict}[args.command]
    try:
        command(args)
    except (ValueError, FileNotFoundError, ImportError, FloatingPointError, WeightsDownloadError) as exc:
        print(f"resnet-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"resnet-fast {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0
