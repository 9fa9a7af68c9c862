"""Benchmark results as JSON and markdown tables."""
import json
import math
import os
import re
from typing import Dict, List


def geomean(values: List[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _table(rows: List[Dict], columns: List[str], formats: Dict[str, str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [formats.get(c, "{}").format(row[c]) if c in row else "" for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(env: Dict, rows: List[Dict]) -> str:
    parts = [
        f"# resnet_fast benchmark: {env['card']} ({env['device']})",
        "",
        f"{env['date']} · torch {env['torch']} · triton {env.get('triton')} · {env['threads']} threads"
        + (f" · CUDA {env['cuda']} · driver {env['driver']}" if env["device"] == "cuda" else "")
        + ("" if env.get("triton_autotune", True) else " · Triton conv untuned (default configs)"),
        "",
    ]
    if "ceiling" in env:
        c = env["ceiling"]
        parts += [f"Ceiling measured in this run: {c['matmul_tflops']:.2f} TFLOP/s ({c['matmul_dtype']} matrix "
                  f"product), {c['copy_gb_per_s']:.0f} GB/s copy bandwidth. Fractions below are of the former.", ""]
    e2e = [r for r in rows if r["benchmark"] == "eval_forward"]
    if e2e:
        parts += [
            "## Eval forward, whole model",
            "",
            "Speed-up is against torchvision eager with channels_last input (higher is better); "
            "error is ‖out − torchvision‖ / ‖torchvision‖ on the same input.",
            "",
            _table(
                e2e,
                ["model", "batch", "dtype", "contender", "median_ms", "images_per_s", "speedup_vs_eager_channels_last",
                 "fraction_of_matmul_peak", "peak_mem_mb", "rel_err_vs_torchvision"]
                + (["plan"] if any("plan" in r for r in e2e) else []),
                {"median_ms": "{:.1f}", "images_per_s": "{:.1f}", "speedup_vs_eager_channels_last": "{:.2f}x",
                 "fraction_of_matmul_peak": "{:.1%}", "peak_mem_mb": "{:.0f}", "rel_err_vs_torchvision": "{:.1e}"},
            ),
            "",
        ]
    train = [r for r in rows if r["benchmark"] == "train_step"]
    if train:
        parts += [
            "## Training step (forward, backward, SGD), whole model",
            "",
            "From the same weights; the first step's loss is compared with torchvision's.",
            "",
            _table(
                train,
                ["model", "batch", "image_size", "dtype", "contender", "median_ms", "images_per_s",
                 "speedup_vs_eager_channels_last", "fraction_of_matmul_peak", "peak_mem_mb",
                 "first_loss_diff_vs_torchvision"],
                {"median_ms": "{:.1f}", "images_per_s": "{:.1f}", "speedup_vs_eager_channels_last": "{:.2f}x",
                 "fraction_of_matmul_peak": "{:.1%}", "peak_mem_mb": "{:.0f}", "first_loss_diff_vs_torchvision": "{:.1e}"},
            ),
            "",
        ]
    layers = [r for r in rows if r["benchmark"] == "conv_layer"]
    if layers:
        contenders = list(dict.fromkeys(r["contender"] for r in layers))
        folded_ms = {r["layer"]: r["median_ms"] for r in layers if r["contender"] == "folded"}
        summary = []
        for c in contenders:
            mine = [r for r in layers if r["contender"] == c]
            row = {"contender": c, "geomean_speedup_vs_eager": geomean([r["speedup_vs_eager"] for r in mine]),
                   "min_speedup_vs_eager": min(r["speedup_vs_eager"] for r in mine),
                   "total_ms": sum(r["median_ms"] for r in mine)}
            if all(r["layer"] in folded_ms for r in mine):
                row["geomean_speedup_vs_folded"] = geomean([folded_ms[r["layer"]] / r["median_ms"] for r in mine])
            summary.append(row)
        parts += [
            f"## Per conv layer ({layers[0]['model']}, batch {layers[0]['batch']}, {layers[0]['dtype']})",
            "",
            "Each distinct conv + BN (+ residual) (+ ReLU) layer; speed-up against eager conv + BN + add + ReLU, "
            "and against the folded conv + one fused add/ReLU.",
            "",
            _table(summary, ["contender", "geomean_speedup_vs_eager", "min_speedup_vs_eager",
                             "geomean_speedup_vs_folded", "total_ms"],
                   {"geomean_speedup_vs_eager": "{:.2f}x", "min_speedup_vs_eager": "{:.2f}x",
                    "geomean_speedup_vs_folded": "{:.2f}x", "total_ms": "{:.1f}"}),
            "",
            _table(layers, ["layer", "shape", "contender", "median_ms", "tflops", "speedup_vs_eager"]
                   + [key for key in ("cuda_conv", "choice") if any(key in r for r in layers)],
                   {"median_ms": "{:.2f}", "tflops": "{:.3f}", "speedup_vs_eager": "{:.2f}x"}),
            "",
        ]
    return "\n".join(parts)


def save(out_dir: str, env: Dict, rows: List[Dict], plot: bool = True) -> str:
    """Write <out_dir>/<device>-<card>-<date>.{json,md}, and the chart as
    .png and .svg with `plot` (skipped, with a note, without matplotlib);
    returns the stem."""
    from .plot import save_chart

    os.makedirs(out_dir, exist_ok=True)
    card = re.sub(r"[^a-z0-9]+", "-", env["card"].lower()).strip("-")[:40]
    stem = os.path.join(out_dir, f"{env['device']}-{card}-{env['date'][:10]}")
    with open(stem + ".json", "w") as f:
        json.dump({"environment": env, "results": rows}, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown(env, rows))
    if rows and plot:
        save_chart(env, rows, stem)
    return stem
