"""Run the benchmarks on whatever device this machine has and print the table.

    python -m benchmarks                 # defaults for the device found
    python -m benchmarks --models resnet50 --batches 1,32,256 --dtype bfloat16
"""
import argparse
import sys
from typing import List, Optional

import torch

from . import ceiling, conv_layers, end_to_end, train_step
from .environment import describe
from .report import markdown, save
from .plot import save_chart

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--models", default=None, help="comma-separated torchvision builder names "
                        "(default: resnet18,resnet50 on CPU, resnet18,resnet50,resnet101 on GPU)")
    parser.add_argument("--batch", type=int, default=None,
                        help="batch of the per-layer runs (default: 8 on CPU, 32 on GPU)")
    parser.add_argument("--batches", default=None,
                        help="comma-separated eval batches of the whole-model runs (default: 1,8,16 on CPU, 1,32,256 on GPU)")
    parser.add_argument("--bf16-batches", default=None,
                        help="comma-separated eval batches of a second whole-model section with model and input in "
                             "bfloat16, when --dtype is float32 (default on CPU: the eval batches where oneDNN has "
                             "bfloat16 kernels for it, else 1; none on GPU; '' skips it)")
    parser.add_argument("--train-batch", type=int, default=None,
                        help="batch of the training-step run (default: 8 on CPU, 128 on GPU; 0 skips it)")
    parser.add_argument("--train-size", type=int, default=None, help="image size of the training step "
                        "(default: 112 on CPU, --size on GPU)")
    parser.add_argument("--size", type=int, default=224, help="image height and width")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: float32 on CPU, bfloat16 on GPU")
    parser.add_argument("--layers", default="resnet50", help="model whose conv layers to time one by one ('' to skip)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--max-autotune", action="store_true",
                        help="also torch.compile(mode='max-autotune') of torchvision's model (minutes of tuning)")
    parser.add_argument("--tune", action="store_true",
                        help="also resnet_fast with backend=None following a per-layer plan that resnet_fast.tune() "
                             "measures in the same run (not saved)")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per contender (after 2 warm-up runs)")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON and markdown results")
    parser.add_argument("--no-plot", action="store_true", help="draw no PNG/SVG chart (`python -m benchmarks.plot "
                        "RESULTS.json` draws it later)")
    args = parser.parse_args(argv)
    if args.batch is not None and args.batch < 1:
        parser.error("--batch must be at least 1")
    args.batches = _batches(parser, "--batches", args.batches, allow_empty=False)
    args.bf16_batches = _batches(parser, "--bf16-batches", args.bf16_batches, allow_empty=True)
    if args.train_batch is not None and args.train_batch < 0:
        parser.error("--train-batch must be at least 0")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def _cpu_bf16_batches(batches: List[int]) -> List[int]:
    """The CPU's bfloat16 section: every eval batch where oneDNN has
    bfloat16 kernels for this CPU; elsewhere (where eager PyTorch runs a
    reference loop, 10x slower than float32) batch 1 alone."""
    from resnet_fast import ops

    return list(batches) if ops.cpu_compute_dtype(torch.bfloat16) == torch.bfloat16 else [1]


def _batches(parser, flag: str, text: Optional[str], allow_empty: bool) -> Optional[List[int]]:
    if text is None:
        return None
    if allow_empty and not text.strip():
        return []
    try:
        batches = [int(b) for b in text.split(",")]
    except ValueError:
        parser.error(f"{flag} must be comma-separated integers, got {text!r}")
    if not batches or min(batches) < 1:
        parser.error(f"{flag} must be positive")
    return batches


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA GPU is visible", file=sys.stderr)
        return 2
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          args.device if args.device != "auto" else "cpu")
    gpu = device.type == "cuda"
    models = args.models if args.models is not None else "resnet18,resnet50" + (",resnet101" if gpu else "")
    batch = args.batch or (32 if gpu else 8)
    batches = args.batches or ([1, 32, 256] if gpu else [1, 8, 16])
    train_batch = (128 if gpu else 8) if args.train_batch is None else args.train_batch
    train_size = args.train_size or (args.size if gpu else 112)
    dtype = DTYPES[args.dtype or ("float32" if device.type == "cpu" else "bfloat16")]
    bf16_batches = [] if dtype != torch.float32 else args.bf16_batches if args.bf16_batches is not None else (
        [] if gpu else _cpu_bf16_batches(batches))
    env = describe(device)
    env["settings"] = vars(args) | {"models": models, "batch": batch, "batches": batches, "bf16_batches": bf16_batches, "train_batch": train_batch,
                                    "train_size": train_size, "dtype": str(dtype)}
    print(f"benchmarking on {env['card']} ({device.type}), {dtype}", flush=True)
    env["ceiling"] = ceiling.measure(device)
    print(f"  ceiling: {env['ceiling']['matmul_tflops']:.1f} TFLOP/s {env['ceiling']['matmul_dtype']} matmul, "
          f"{env['ceiling']['copy_gb_per_s']:.0f} GB/s copy", flush=True)

    # Results are saved after every layer and section (same files, rewritten),
    # so a run cut short by a time limit keeps what it measured; the per-layer
    # table, what the kernels are judged on, comes first. The chart (a second
    # or two to draw) is drawn once, at the end.
    rows = []
    if args.layers:
        print(f"  per conv layer: {args.layers}", flush=True)
        for layer_rows in conv_layers.run(args.layers, batch, args.size, dtype, device, args.repeats):
            rows += layer_rows
            print(f"    {layer_rows[0]['layer']}: {layer_rows[0]['shape']}", flush=True)
            save(args.out, env, rows, plot=False)
    for arch in filter(None, models.split(",")):
        flops = end_to_end.flops_per_image(arch, args.size)
        for b in batches:
            print(f"  eval forward: {arch}, batch {b}", flush=True)
            rows += end_to_end.run(arch, b, args.size, dtype, device, not args.no_compile, args.repeats,
                                   flops, env["ceiling"], max_autotune=args.max_autotune and not args.no_compile,
                                   tune=args.tune)
            save(args.out, env, rows, plot=False)
        for b in bf16_batches:
            print(f"  eval forward: {arch}, batch {b}, bfloat16", flush=True)
            rows += end_to_end.run(arch, b, args.size, torch.bfloat16, device, not args.no_compile, args.repeats,
                                   flops, None)
            save(args.out, env, rows, plot=False)
        if train_batch:
            print(f"  train step: {arch}, batch {train_batch}, {train_size}x{train_size}", flush=True)
            rows += train_step.run(arch, train_batch, train_size, dtype, device, args.repeats,
                                   end_to_end.flops_per_image(arch, train_size), env["ceiling"],
                                   with_compile=not args.no_compile)
            save(args.out, env, rows, plot=False)

    stem = save(args.out, env, rows, plot=False)
    charts = [] if args.no_plot or not rows else save_chart(env, rows, stem)
    print()
    print(markdown(env, rows))
    print("\nresults: " + ", ".join([f"{stem}.json", f"{stem}.md", *charts]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
