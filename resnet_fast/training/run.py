"""What the `train`, `finetune`, `eval` and `predict` commands do, given
their parsed arguments (resnet_fast.cli builds those)."""
import json
import os
import time
from typing import Dict, List, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from ..models import builders
from ..models.pretrained import ResolvedWeights, resolve_weights
from ..models.weights import load_weights, read_state_dict
from ..sync_batchnorm import convert_sync_batchnorm
from . import distributed
from .checkpoint import is_training_checkpoint, load_checkpoint, save_checkpoint, set_rng_state, unwrap
from .data import (IMAGENET_MEAN, IMAGENET_STD, Preprocess, Split, Transformed, collate_skipping_unreadable, eval_transform, image_file_to_input,
                   load_split, train_transform)
from .engine import predict_logits, train_one_epoch
from .finetune import apply_freeze, count_trainable, parse_freeze
from .metrics import classification_report, format_report, save_confusion_png, topk_correct
from .optim import make_optimizer, param_groups, warmup_cosine


def _log(ctx, message: str) -> None:
    if ctx.is_main:
        print(message, flush=True)


def _build(arch: str, num_classes: int, backend: Optional[str]) -> nn.Module:
    if arch not in builders.__all__:
        raise ValueError(f"unknown --arch {arch!r}; expected one of {', '.join(builders.__all__)}")
    return getattr(builders, arch)(num_classes=num_classes, backend=backend)


def _loader(split: Split, transform, batch_size: int, workers: int, shuffle: bool, seed: int, ctx,
            drop_last: bool) -> DataLoader:
    dataset = Transformed(split.dataset, transform, seed if shuffle else None)
    sampler = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=shuffle, seed=seed,
                                 drop_last=drop_last) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=workers,
                      collate_fn=collate_skipping_unreadable, drop_last=drop_last,
                      pin_memory=ctx.device.type == "cuda", persistent_workers=False)


def _head_outputs(state: Dict[str, torch.Tensor]) -> Optional[int]:
    weight = state.get("fc.weight")
    return None if weight is None else weight.shape[0]


def _config(args) -> Dict:
    return {k: v for k, v in vars(args).items() if k != "func" and isinstance(v, (str, int, float, bool, type(None)))}


def _report_unreadable(ctx, files: List[str], where: str) -> None:
    if files:
        shown = ", ".join(files[:5]) + (f", ... ({len(files) - 5} more)" if len(files) > 5 else "")
        _log(ctx, f"warning: skipped {len(files)} unreadable image(s) in {where}: {shown}")


def train(args) -> Dict:
    """Train from scratch (`train`) or from weights with a new head (`finetune`)."""
    ctx = distributed.setup(args.device)
    try:
        return _train(args, ctx)
    finally:
        distributed.teardown()


def _resolve(args) -> ResolvedWeights:
    """args.weights for args.arch: a file, a URL, a torchvision weights name
    ("DEFAULT", "IMAGENET1K_V2", ...) or a hub name."""
    return resolve_weights(args.weights, args.arch, progress=getattr(args, "progress", True))


def _prepare_model(args, ctx, num_classes: int, pretrained: Optional[ResolvedWeights]) -> nn.Module:
    torch.manual_seed(args.seed)
    model = _build(args.arch, num_classes, args.backend)
    if pretrained is not None:
        load_weights(model, pretrained.source, exclude=("fc.",))  # the head is new: the dataset's classes
        _log(ctx, f"loaded {args.weights} (all but the head)")
    freeze = getattr(args, "freeze", "none")
    apply_freeze(model, freeze)
    if args.sync_bn and ctx.distributed:
        model = convert_sync_batchnorm(model)
    model.to(ctx.device, memory_format=torch.channels_last)
    return model


def _train(args, ctx) -> Dict:
    if args.epochs < 1:
        raise ValueError(f"--epochs must be at least 1, got {args.epochs}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    parse_freeze(getattr(args, "freeze", "none"))
    resume = load_checkpoint(args.resume) if args.resume else None
    if resume is not None:  # the run's own architecture, and its data and size unless given again
        args.arch = resume["arch"]
        args.data = args.data if args.data is not None else resume["config"].get("data")
        args.image_size = args.image_size or resume["preprocess"]["image_size"]
    train_split = load_split(args.data, "train", args.image_size, per_class_limit=args.train_limit)
    if resume is not None and resume["class_names"] != train_split.class_names:
        raise ValueError(
            f"--resume {args.resume}: the checkpoint's classes {resume['class_names']} differ from the data's "
            f"{train_split.class_names}"
        )
    val_split = load_split(args.data, "val", args.image_size, class_names=train_split.class_names)
    pre = train_split.preprocess
    if resume is not None:  # the run's own preprocessing
        pre = Preprocess.from_dict(resume["preprocess"])
    pretrained = _resolve(args) if getattr(args, "weights", None) is not None and resume is None else None
    if pretrained is not None and pretrained.torchvision_weights is not None and pre.kind == "folder":
        pre = Preprocess.of_weights(pretrained.torchvision_weights, args.image_size)  # as the weights were trained
    train_loader = _loader(train_split, train_transform(pre), args.batch_size, args.workers, True, args.seed, ctx,
                           drop_last=True)
    val_loader = _loader(val_split, eval_transform(pre), args.batch_size, args.workers, False, args.seed, ctx,
                         drop_last=False)
    if len(train_loader) == 0:
        raise ValueError(
            f"{len(train_split.dataset)} training images are fewer than one batch of {args.batch_size} per process "
            f"({ctx.world_size} process(es)): lower --batch-size"
        )

    model = _prepare_model(args, ctx, len(train_split.class_names), pretrained)
    backbone_lr = args.lr if args.backbone_lr is None else args.backbone_lr
    optimizer = make_optimizer(args.opt, param_groups(model, args.lr, backbone_lr, args.weight_decay))
    steps = args.epochs * len(train_loader)
    scheduler = warmup_cosine(optimizer, steps, int(args.warmup_epochs * len(train_loader)))
    scaler = torch.amp.GradScaler(ctx.device.type) if args.amp == "fp16" else None
    start_epoch, best = 0, 0.0
    if resume is not None:
        unwrap(model).load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        if scaler is not None and resume["scaler"] is not None:
            scaler.load_state_dict(resume["scaler"])
        set_rng_state(resume["rng"])
        start_epoch, best = resume["epoch"], resume["best_acc1"]
        _log(ctx, f"resumed from {args.resume} after epoch {start_epoch}")
    if ctx.distributed:
        ddp_device = [ctx.device.index] if ctx.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ddp_device)

    loss_fn = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    out_dir = args.output
    if ctx.is_main:
        os.makedirs(out_dir, exist_ok=True)
    writer = _tensorboard(args, ctx)
    _log(ctx, f"{args.command} {args.arch}: {len(train_split.dataset)} train / {len(val_split.dataset)} val images, "
              f"{len(train_split.class_names)} classes, {count_trainable(unwrap(model)):,} trainable parameters, "
              f"device {ctx.device}, {ctx.world_size} process(es), amp {args.amp}")
    config = _config(args)
    record: Dict = {}
    started = time.perf_counter()
    for epoch in range(start_epoch, args.epochs):
        train_loader.sampler.set_epoch(epoch)
        train_loader.dataset.set_epoch(epoch)
        stats = train_one_epoch(model, train_loader, optimizer, scheduler, scaler, loss_fn, ctx.device, args.amp,
                                f"epoch {epoch + 1}/{args.epochs}", ctx.is_main and args.progress)
        _report_unreadable(ctx, stats.pop("unreadable"), f"{args.data}/train")
        logits, targets, unreadable = predict_logits(unwrap(model), val_loader, ctx.device, args.amp)
        _report_unreadable(ctx, unreadable, f"{args.data}/val")
        report = classification_report(logits, targets, val_split.class_names)
        improved = report["top1"] > best
        best = max(best, report["top1"])
        record = {"epoch": epoch + 1, **stats, "val_acc1": report["top1"], "val_acc5": report["top5"],
                  "val_macro_f1": report["macro_f1"], "lr": optimizer.param_groups[0]["lr"],
                  "elapsed_s": time.perf_counter() - started}
        _log(ctx, f"epoch {epoch + 1}/{args.epochs}: loss {stats['train_loss']:.4f}  "
                  f"val top-1 {100 * report['top1']:.2f}%  {stats['images_per_s']:.0f} img/s")
        if ctx.is_main:
            with open(os.path.join(out_dir, "log.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
            if writer is not None:
                for key in ("train_loss", "train_acc1", "val_acc1", "val_acc5", "images_per_s", "lr"):
                    writer.add_scalar(key, record[key], epoch + 1)
            for name in ("last.pt", "best.pt") if improved else ("last.pt",):
                save_checkpoint(os.path.join(out_dir, name), model=model, optimizer=optimizer, scheduler=scheduler,
                                scaler=scaler, epoch=epoch + 1, class_names=train_split.class_names, config=config,
                                preprocess=pre.as_dict(), best_acc1=best)
        distributed.barrier()
    if writer is not None:
        writer.close()
    _log(ctx, f"done: val top-1 {100 * record.get('val_acc1', float('nan')):.2f}% (best {100 * best:.2f}%), "
              f"checkpoint {os.path.join(out_dir, 'last.pt')}")
    return record


def _tensorboard(args, ctx):
    if not (args.tensorboard and ctx.is_main):
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ImportError("--tensorboard needs the tensorboard package: pip install tensorboard") from exc
    return SummaryWriter(os.path.join(args.output, "tensorboard"))


# ------------------------------------------------------------ eval/predict

def _training_checkpoint(path: str) -> Optional[Dict]:
    """The checkpoint at `path` when it is a training checkpoint, else None
    (a plain weights file, which read_state_dict then reads and reports on)."""
    if path.endswith(".safetensors") or not os.path.isfile(path):
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None
    return obj if is_training_checkpoint(obj) else None


def _model_from_weights(args, weights: ResolvedWeights, num_classes: Optional[int]) -> nn.Module:
    """args.arch with plain (non-checkpoint) weights; its head must fit
    num_classes when that is given."""
    state = read_state_dict(weights.source)
    outputs = _head_outputs(state)
    if num_classes is not None and outputs is not None and outputs != num_classes:
        raise ValueError(
            f"{args.weights} has a {outputs}-class head but the data has {num_classes} classes: fine-tune it "
            f"first (resnet-fast finetune --weights {args.weights} --data ...), or evaluate on data with "
            f"{outputs} classes"
        )
    return load_weights(_build(args.arch, outputs or num_classes or 1000, args.backend), state)


def _has_original_head(model: nn.Module, weights: ResolvedWeights) -> bool:
    """The weights name their classes (meta["categories"]) and the model
    still has that head."""
    return weights.categories is not None and model.fc.out_features == len(weights.categories)


def _is_digits(data: Optional[str]) -> bool:
    return data is None or data == "digits" or data.startswith("digits:")


def _model_from_checkpoint(ckpt: Dict, backend: Optional[str]) -> nn.Module:
    return load_weights(_build(ckpt["arch"], len(ckpt["class_names"]), backend), ckpt["model"])


def _weights_preprocess(weights: ResolvedWeights, image_size: Optional[int]) -> Preprocess:
    if weights.torchvision_weights is not None:
        return Preprocess.of_weights(weights.torchvision_weights, image_size)
    return Preprocess("folder", image_size or 224, IMAGENET_MEAN, IMAGENET_STD)


def _split_of_categories(args, image_size: int, categories: List[str]) -> Split:
    try:
        return load_split(args.data, args.split, image_size, class_names=categories)
    except ValueError as exc:
        raise ValueError(
            f"{exc}. With the weights' own head, the class folders must be named by its categories "
            f"(meta['categories'], e.g. {categories[0]!r}); to evaluate on other classes, fine-tune first "
            f"(resnet-fast finetune --weights {args.weights} --data {args.data})"
        ) from exc


def _all_classes(logits: torch.Tensor, targets: torch.Tensor, class_names: List[str]) -> Dict:
    return classification_report(logits, targets, class_names)


def _seen_classes(logits: torch.Tensor, targets: torch.Tensor, class_names: List[str]) -> Dict:
    """The report over the classes that occur in the data or the predictions
    (as scikit-learn's classification_report), for a head with many more
    classes than the data has (ImageNet's 1000); top-k over all of them."""
    seen = sorted(set(targets.tolist()) | set(logits.argmax(1).tolist()))
    remap = torch.full((logits.shape[1],), -1, dtype=torch.long)
    remap[seen] = torch.arange(len(seen))
    report = classification_report(logits[:, seen], remap[targets], [class_names[i] for i in seen])
    correct = topk_correct(logits, targets, (1, 5))
    report["top1"], report["top5"] = correct[1] / len(targets), correct[5] / len(targets)
    return report


def evaluate(args) -> Dict:
    device = distributed.pick_device(args.device, 0)
    ckpt = _training_checkpoint(args.weights)
    if ckpt is not None:
        model, class_names = _model_from_checkpoint(ckpt, args.backend), ckpt["class_names"]
        pre = Preprocess.from_dict(ckpt["preprocess"])
        if args.data is None:  # the data the checkpoint was trained on
            args.data = ckpt["config"].get("data")
        split = load_split(args.data, args.split, pre.image_size, class_names=class_names)
        report_classes = _all_classes
    else:
        weights = _resolve(args)
        if weights.categories is not None and not _is_digits(args.data):
            # The weights' own head: the data's class folders are some of its categories.
            model = _model_from_weights(args, weights, len(weights.categories))
            class_names = weights.categories
            pre = _weights_preprocess(weights, args.image_size)
            split = _split_of_categories(args, pre.image_size, class_names)
            report_classes = _seen_classes
        else:
            split = load_split(args.data, args.split, args.image_size)
            model = _model_from_weights(args, weights, len(split.class_names))
            class_names, pre = split.class_names, split.preprocess
            report_classes = _all_classes
    model.to(device, memory_format=torch.channels_last)
    ctx = distributed.Context(0, 1, 0, device)
    loader = _loader(split, eval_transform(pre), args.batch_size, args.workers, False, 0, ctx, drop_last=False)
    logits, targets, unreadable = predict_logits(model, loader, device, args.amp, args.progress)
    _report_unreadable(ctx, unreadable, f"{args.data}/{args.split}")
    report = report_classes(logits, targets, class_names)
    report["unreadable_images"] = unreadable
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "eval.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(args.output, "confusion_matrix.json"), "w") as f:
        json.dump({"class_names": report["class_names"], "matrix": report["confusion_matrix"]}, f)
    pictures = save_confusion_png(report["confusion_matrix"], report["class_names"],
                                  os.path.join(args.output, "confusion_matrix.png"))
    print(format_report(report))
    written = ["eval.json", "confusion_matrix.json", *(os.path.basename(p) for p in pictures)]
    print(f"wrote {args.output}/" + ", ".join(written))
    return report


def predict(args) -> List[Dict]:
    device = distributed.pick_device(args.device, 0)
    ckpt = _training_checkpoint(args.weights)
    if ckpt is not None:
        model, class_names = _model_from_checkpoint(ckpt, args.backend), ckpt["class_names"]
        pre = Preprocess.from_dict(ckpt["preprocess"])
    else:
        weights = _resolve(args)
        model = _model_from_weights(args, weights, None)
        original = _has_original_head(model, weights)
        class_names = weights.categories if original else [str(i) for i in range(model.fc.out_features)]
        pre = _weights_preprocess(weights, args.image_size)
    model.to(device).eval()
    k = min(args.topk, len(class_names))
    results = []
    for path in args.images:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image not found: {path}")
        try:
            x = image_file_to_input(path, pre).to(device)
        except Exception as exc:
            raise ValueError(f"{path} is not a readable image: {exc}") from exc
        with torch.no_grad():
            probs = model(x).float().softmax(1)[0]
        top = probs.topk(k)
        result = {"image": path, "top": [{"class": class_names[i], "probability": float(p)}
                                         for p, i in zip(top.values.tolist(), top.indices.tolist())]}
        results.append(result)
        print(f"{path}: " + ", ".join(f"{t['class']} {100 * t['probability']:.1f}%" for t in result["top"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results
