"""The benchmark results as a bar chart, PNG and SVG, drawn with matplotlib.

One panel per group of rows measured together: whole-model eval forward and
training step per (model, precision, batch, image size), and the per-layer
geometric means per (model, precision, batch). Each bar is a contender's
speed-up over the panel's baseline, with its value written on it; the dashed
line marks 1.0x, the baseline itself.

matplotlib is optional (it is in requirements/bench.txt): without it the
chart is skipped with a note saying how to get it, and everything else the
benchmark writes is unaffected.

Redraw the chart of a saved run from its JSON, next to it (RESULTS.png and
RESULTS.svg):

    python -m benchmarks.plot benchmarks/results/cpu-amd-epyc-2026-12-02.json
"""
import json
import statistics
import sys
from dataclasses import dataclass
from typing import Callable, Dict, Hashable, List, Tuple

INSTALL_HINT = "pip install matplotlib, or pip install -r requirements/bench.txt"
WHOLE_MODEL = {"eval_forward": "eval forward", "train_step": "train step"}
GREEN, ORANGE, GREY = "#2e7d32", "#e67e22", "#78909c"
BAR_INCHES, PANEL_EXTRA_INCHES, HEADER_INCHES, WIDTH_INCHES = 0.32, 1.15, 0.7, 15.0

_skip_reported = False


@dataclass(frozen=True)
class Panel:
    title: str
    baseline: str  # what the speed-ups are relative to
    bars: List[Tuple[str, float]]  # (contender, speed-up), in the order measured


def _groups(rows: List[Dict], key: Callable[[Dict], Hashable]) -> Dict[Hashable, List[Dict]]:
    """Rows grouped by key(row), groups and rows in the order measured."""
    out: Dict[Hashable, List[Dict]] = {}
    for row in rows:
        out.setdefault(key(row), []).append(row)
    return out


def whole_model_panels(rows: List[Dict]) -> List[Panel]:
    """Eval forward panels first, then training step, one per (model,
    precision, batch, image size)."""
    out = []
    for benchmark, name in WHOLE_MODEL.items():
        mine = [r for r in rows if r["benchmark"] == benchmark]
        groups = _groups(mine, lambda r: (r["model"], r["dtype"], r["batch"], r.get("image_size")))
        for (model, dtype, batch, size), group in groups.items():
            title = f"{model} · {name} · {dtype} · batch {batch}" + (f" · {size}×{size}" if size else "")
            bars = [(r["contender"], r["speedup_vs_eager_channels_last"]) for r in group]
            out.append(Panel(title, "torchvision eager, channels_last", bars))
    return out


def conv_layer_panels(rows: List[Dict]) -> List[Panel]:
    """Per (model, precision, batch): each contender's geometric mean
    speed-up over the model's distinct conv layers."""
    layers = [r for r in rows if r["benchmark"] == "conv_layer"]
    out = []
    for (model, dtype, batch), group in _groups(layers, lambda r: (r["model"], r["dtype"], r["batch"])).items():
        by_contender = _groups(group, lambda r: r["contender"])
        count = len({r["layer"] for r in group})
        title = f"{model} · {count} conv layers (geometric mean) · {dtype} · batch {batch}"
        bars = [(contender, statistics.geometric_mean([r["speedup_vs_eager"] for r in mine]))
                for contender, mine in by_contender.items()]
        out.append(Panel(title, "eager conv + BN + add + ReLU", bars))
    return out


def panels(rows: List[Dict]) -> List[Panel]:
    return whole_model_panels(rows) + conv_layer_panels(rows)


def bar_colour(contender: str) -> str:
    if contender.startswith(("resnet_fast", "ours")):
        return GREEN
    if "torch.compile" in contender:  # before torchvision: "torch.compile(torchvision)"
        return ORANGE
    return GREY


def _legend_handles():
    from matplotlib.patches import Patch

    return [Patch(color=GREEN, label="resnet_fast"), Patch(color=ORANGE, label="torch.compile of torchvision"),
            Patch(color=GREY, label="other: eager PyTorch, aten conv variants")]


def _grid(count: int) -> Tuple[int, int]:
    """(rows, columns): two columns once there are more than two panels."""
    columns = 1 if count <= 2 else 2
    return -(-count // columns), columns


def _draw_panel(ax, panel: Panel, xmax: float, slots: int) -> None:
    """Bars from the top down; `slots` (the most bars of any panel in the
    row) keeps bars equally thick across a row."""
    from matplotlib.ticker import MaxNLocator

    names = [name for name, _ in panel.bars]
    values = [value for _, value in panel.bars]
    bars = ax.barh(range(len(values)), values, height=0.7, color=[bar_colour(n) for n in names])
    ax.axvline(1.0, color="#c62828", linestyle="--", linewidth=1.2)
    # A white box keeps a value readable where it crosses the 1.0x line.
    ax.bar_label(bars, labels=[f"{v:.2f}×" for v in values], padding=3, fontsize=9,
                 bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5, "alpha": 0.85})
    ax.set_yticks(range(len(names)), names, fontsize=9)
    ax.set_ylim(slots - 0.5, -0.5)  # first measured on top, as in the tables
    ax.set_xlim(0, xmax)
    ax.xaxis.set_major_locator(MaxNLocator(steps=[1, 2, 2.5, 5, 10]))
    ax.xaxis.set_major_formatter("{x:g}×")
    ax.tick_params(axis="x", labelsize=8)
    ax.grid(axis="x", color="0.9", linewidth=0.8)
    ax.set_axisbelow(True)
    ax.set_xlabel(f"speed-up vs {panel.baseline}", fontsize=9)
    ax.set_title(panel.title, fontsize=10, loc="left")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def make_figure(env: Dict, rows: List[Dict]):
    """The chart as a matplotlib Figure (Agg canvas, no pyplot: no global
    state is touched); one axes per panel, none left over."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    chart = panels(rows)
    if not chart:
        raise ValueError("no benchmark rows to draw")
    nrows, ncols = _grid(len(chart))
    row_slots = [max(len(p.bars) for p in chart[r * ncols:(r + 1) * ncols]) for r in range(nrows)]
    height = HEADER_INCHES + sum(BAR_INCHES * n + PANEL_EXTRA_INCHES for n in row_slots)
    fig = Figure(figsize=(WIDTH_INCHES if ncols == 2 else WIDTH_INCHES / 1.7, height), layout="constrained")
    FigureCanvasAgg(fig)
    fig.get_layout_engine().set(hspace=0.04)  # room between a panel's axis label and the next title
    grid = fig.add_gridspec(nrows, ncols, height_ratios=row_slots)
    # One scale for every panel, with room for the value written past the longest bar.
    xmax = max(1.0, *(v for p in chart for _, v in p.bars)) * 1.16
    for i, panel in enumerate(chart):
        _draw_panel(fig.add_subplot(grid[i // ncols, i % ncols]), panel, xmax, row_slots[i // ncols])
    fig.legend(handles=_legend_handles(), loc="outside lower center", ncols=3, frameon=False, fontsize=9)
    fig.suptitle(f"resnet_fast on {env['card']} ({env['device']}), {env['date'][:10]} · torch {env.get('torch')} · "
                 "higher is better, dashed line: the baseline (1.0×)", fontsize=11)
    return fig


def save_figure(fig, stem: str) -> List[str]:
    """stem.png and stem.svg; the SVG keeps its text as text (searchable,
    smaller), and has no date and fixed ids, so redrawing the same results
    gives the same file."""
    from matplotlib import rc_context

    paths = [stem + ".png", stem + ".svg"]
    fig.savefig(paths[0], dpi=110)
    with rc_context({"svg.fonttype": "none", "svg.hashsalt": "resnet_fast"}):
        fig.savefig(paths[1], metadata={"Date": None})
    return paths


def report_skipped(error: ImportError) -> None:
    """Say once per run that the chart was skipped, and how to get it."""
    global _skip_reported
    if not _skip_reported:
        print(f"benchmark chart skipped: matplotlib is not available ({error}); {INSTALL_HINT}. "
              "`python -m benchmarks.plot RESULTS.json` draws it later", file=sys.stderr, flush=True)
        _skip_reported = True


def save_chart(env: Dict, rows: List[Dict], stem: str) -> List[str]:
    """Write stem.png and stem.svg; returns the files written (none, with a
    note on stderr, without matplotlib)."""
    try:
        import matplotlib  # noqa: F401  (optional: only the chart needs it)
    except ImportError as error:
        report_skipped(error)
        return []
    return save_figure(make_figure(env, rows), stem)


def main(argv=None) -> int:
    """python -m benchmarks.plot RESULTS.json [...]: the chart of each saved
    run, next to it."""
    paths = sys.argv[1:] if argv is None else argv
    if not paths:
        print("usage: python -m benchmarks.plot RESULTS.json [...]", file=sys.stderr)
        return 2
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        stem = path[:-len(".json")] if path.endswith(".json") else path
        written = save_chart(data["environment"], data["results"], stem)
        if not written:
            return 1
        print("\n".join(written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
