"""The benchmark results as a PNG bar chart: one panel per model's eval
forward and one for the per-layer geometric means, each bar a contender's
speed-up over the panel's baseline (1.0x marked). Drawn with Pillow, which
torchvision already needs."""
from typing import Dict, List, Tuple

from .report import geomean

WIDTH, BAR_H, GAP, LABEL_W, TITLE_H = 900, 22, 6, 330, 28
COLOURS = {"resnet_fast": (46, 125, 50), "torch.compile": (230, 126, 34), "torchvision": (120, 144, 156)}


def _colour(contender: str) -> Tuple[int, int, int]:
    for prefix, colour in COLOURS.items():
        if contender.startswith(prefix) or prefix in contender:
            return colour
    return (84, 110, 122) if "ours" not in contender else COLOURS["resnet_fast"]


def panels(rows: List[Dict]) -> List[Tuple[str, List[Tuple[str, float]]]]:
    """(title, [(contender, speed-up)]) for each panel of the chart."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows if r["benchmark"] == "eval_forward"):
        mine = [r for r in rows if r["benchmark"] == "eval_forward" and r["model"] == model]
        title = f"{model} eval forward, batch {mine[0]['batch']}, {mine[0]['dtype']}: speed-up vs eager channels_last"
        out.append((title, [(r["contender"], r["speedup_vs_eager_channels_last"]) for r in mine]))
    layers = [r for r in rows if r["benchmark"] == "conv_layer"]
    if layers:
        title = f"{layers[0]['model']} conv layers (geomean), batch {layers[0]['batch']}: speed-up vs eager conv+BN+ReLU"
        contenders = list(dict.fromkeys(r["contender"] for r in layers))
        out.append((title, [(c, geomean([r["speedup_vs_eager"] for r in layers if r["contender"] == c]))
                            for c in contenders]))
    return out


def save_png(env: Dict, rows: List[Dict], path: str) -> None:
    from PIL import Image, ImageDraw

    chart = panels(rows)
    height = 40 + sum(TITLE_H + len(bars) * (BAR_H + GAP) + 14 for _, bars in chart)
    img = Image.new("RGB", (WIDTH, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 10), f"resnet_fast on {env['card']} ({env['device']}), {env['date'][:10]}", fill="black")
    y = 40
    for title, bars in chart:
        draw.text((10, y + 6), title, fill="black")
        y += TITLE_H
        top = max(max(v for _, v in bars), 1.0) * 1.1
        scale = (WIDTH - LABEL_W - 70) / top
        for name, value in bars:
            draw.text((10, y + 5), name[:48], fill="black")
            draw.rectangle([LABEL_W, y, LABEL_W + value * scale, y + BAR_H], fill=_colour(name))
            draw.text((LABEL_W + value * scale + 6, y + 5), f"{value:.2f}x", fill="black")
            y += BAR_H + GAP
        one = LABEL_W + scale  # the 1.0x line
        draw.line([one, y - len(bars) * (BAR_H + GAP) - 2, one, y], fill=(200, 0, 0), width=1)
        y += 14
    img.save(path)


def main(argv=None) -> int:
    """python -m benchmarks.plot RESULTS.json: the chart of a saved run, next to it."""
    import json
    import sys

    paths = sys.argv[1:] if argv is None else argv
    if not paths:
        print("usage: python -m benchmarks.plot RESULTS.json [...]", file=sys.stderr)
        return 2
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        out = path[:-len(".json")] + ".png" if path.endswith(".json") else path + ".png"
        save_png(data["environment"], data["results"], out)
        print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
