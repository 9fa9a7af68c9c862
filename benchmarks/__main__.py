"""Run the benchmarks on whatever device this machine has and print the table.

    python -m benchmarks                 # defaults for the device found
    python -m benchmarks --models resnet50 --batch 32 --dtype bfloat16
"""
import argparse
import sys

import torch

from . import conv_layers, end_to_end
from .environment import describe
from .report import markdown, save

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--models", default="resnet18,resnet50", help="comma-separated torchvision builder names")
    parser.add_argument("--batch", type=int, default=None, help="default: 8 on CPU, 32 on GPU")
    parser.add_argument("--size", type=int, default=224, help="image height and width")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: float32 on CPU, bfloat16 on GPU")
    parser.add_argument("--layers", default="resnet50", help="model whose conv layers to time one by one ('' to skip)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per contender (after 2 warm-up runs)")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON and markdown results")
    args = parser.parse_args(argv)
    if args.batch is not None and args.batch < 1:
        parser.error("--batch must be at least 1")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA GPU is visible", file=sys.stderr)
        return 2
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          args.device if args.device != "auto" else "cpu")
    batch = args.batch or (8 if device.type == "cpu" else 32)
    dtype = DTYPES[args.dtype or ("float32" if device.type == "cpu" else "bfloat16")]
    env = describe(device)
    env["settings"] = vars(args) | {"batch": batch, "dtype": str(dtype)}
    print(f"benchmarking on {env['card']} ({device.type}), batch {batch}, {dtype}", flush=True)

    rows = []
    for arch in filter(None, args.models.split(",")):
        print(f"  eval forward: {arch}", flush=True)
        rows += end_to_end.run(arch, batch, args.size, dtype, device, not args.no_compile, args.repeats)
    if args.layers:
        print(f"  per conv layer: {args.layers}", flush=True)
        rows += conv_layers.run(args.layers, batch, args.size, dtype, device, args.repeats)

    stem = save(args.out, env, rows)
    print()
    print(markdown(env, rows))
    print(f"\nresults: {stem}.json, {stem}.md, {stem}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
