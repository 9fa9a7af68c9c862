"""The benchmark entry point runs end to end (tiny settings; no timing is
checked here: speed belongs in the benchmark's own output)."""
import json
import random
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from benchmarks.__main__ import main


def test_benchmark_entry_point_writes_results(tmp_path, capsys):
    args = ["--device", "cpu", "--models", "resnet18", "--batch", "1", "--batches", "1,2", "--size", "32",
            "--repeats", "1", "--no-compile", "--layers", "resnet18", "--train-batch", "2", "--train-size", "32",
            "--tune", "--out", str(tmp_path)]
    assert main(args) == 0
    (json_file,) = tmp_path.glob("*.json")
    data = json.loads(json_file.read_text())
    contenders = {r["contender"] for r in data["results"] if r["benchmark"] == "eval_forward"}
    assert {"resnet_fast (native)", "torchvision eager, channels_last", "resnet_fast (tuned plan)"} <= contenders
    # The tuned model's row says which backends its plan chose, for every distinct layer.
    (tuned,) = [r for r in data["results"] if r["contender"] == "resnet_fast (tuned plan)" and r["batch"] == 1]
    assert re.fullmatch(r"(native|reference) \d+(, (native|reference) \d+)?", tuned["plan"])
    # The unsaved plan does not outlive the benchmark.
    from resnet_fast import plans

    assert not plans._plans
    # The CPU's default bfloat16 section: every eval batch where oneDNN has bfloat16 kernels, else batch 1.
    from resnet_fast import ops

    bf16_batches = [1, 2] if ops.cpu_compute_dtype(torch.bfloat16) == torch.bfloat16 else [1]
    assert {(r["batch"], r["dtype"]) for r in data["results"] if r["benchmark"] == "eval_forward"} == {
        (1, "float32"), (2, "float32")} | {(b, "bfloat16") for b in bf16_batches}
    train = [r for r in data["results"] if r["benchmark"] == "train_step"]
    assert {r["contender"] for r in train} >= {"resnet_fast (native)", "torchvision eager, channels_last"}
    assert all(r["first_loss_diff_vs_torchvision"] < 1e-3 for r in train)
    assert data["environment"]["ceiling"]["matmul_tflops"] > 0
    # resnet_fast's output is checked against torchvision in the same run.
    tolerance = {"float32": 1e-4, "bfloat16": 5e-2}
    assert all(r["rel_err_vs_torchvision"] < tolerance[r["dtype"]] for r in data["results"]
               if r["benchmark"] == "eval_forward")
    assert "Per conv layer" in capsys.readouterr().out
    (png,) = tmp_path.glob("*.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.with_suffix(".svg").exists()


def test_pytest_benchmarks_run_and_check_their_outputs():
    """`pytest benchmarks/` (pytest-benchmark) with timing disabled: every
    contender runs once and its output is checked against eager PyTorch."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "RESNET_FAST_BENCH_BATCH": "1", "RESNET_FAST_BENCH_SIZE": "32"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks/", "--benchmark-disable", "-q", "-p", "no:cacheprovider"],
        cwd=root, env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and " failed" not in result.stdout


def test_train_step_has_a_compiled_contender(monkeypatch):
    """torch.compile of torchvision's model is a training-step contender
    (compiled forward and backward, eager SGD) from the same weights. The
    compiler is aot_eager here: the benchmark's wiring is under test, not
    Inductor's code generation, which takes minutes on a small CPU."""
    import functools

    import torch
    import torch._inductor.config as inductor_config

    from benchmarks import train_step

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    monkeypatch.setattr(inductor_config, "freezing", inductor_config.freezing)  # the benchmark sets it
    rows = train_step.run("resnet18", 2, 32, torch.float32, torch.device("cpu"), 1, 1e9, {"matmul_tflops": 1.0},
                          with_compile=True)
    by_contender = {r["contender"]: r for r in rows}
    assert {train_step.BASELINE, train_step.COMPILED, "resnet_fast (native)"} <= set(by_contender)
    assert by_contender[train_step.COMPILED]["first_loss_diff_vs_torchvision"] < 1e-5
    assert by_contender[train_step.COMPILED]["median_ms"] > 0


def test_per_layer_table_says_which_cuda_convolution_ran():
    """On CUDA each layer's row for the native op names the convolution it
    picked (a GPU run is the only place those rows are made)."""
    from benchmarks.report import markdown

    env = {"card": "a GPU", "device": "cuda", "date": "today", "torch": "2", "triton": "3", "threads": 1,
           "cuda": "13.0", "driver": "580"}
    layer = {"benchmark": "conv_layer", "model": "resnet50", "layer": "conv1", "shape": "3x224x224 -> 64, 7x7/2",
             "batch": 256, "dtype": "bfloat16", "median_ms": 1.0, "tflops": 100.0, "speedup_vs_eager": 1.0}
    rows = [dict(layer, contender="eager"),
            dict(layer, contender="ours (native)", median_ms=0.5, speedup_vs_eager=2.0,
                 cuda_conv="cutlass sm80 (128x64 tiles, 3 input channels zero-padded to 4)")]
    table = markdown(env, rows)
    assert "| cuda_conv |" in table
    assert "| 2.00x | cutlass sm80 (128x64 tiles, 3 input channels zero-padded to 4) |" in table
    # Without such rows (a CPU run) the column is left out.
    assert "cuda_conv" not in markdown(dict(env, device="cpu"), rows[:1])


# ------------------------------------------------------------ the chart

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ENV = {"card": "a test card", "device": "cpu", "date": "2026-01-02T03:04:05+00:00", "torch": "2", "triton": "3",
       "threads": 4}


def _results(rng: random.Random):
    """Rows shaped as the benchmark writes them, with made-up speed-ups:
    two models x two batches of eval forward in float32, one more eval group
    in bfloat16, a training step per model and one model's conv layers."""
    rows = []
    eval_contenders = ["torchvision eager, NCHW", "torchvision eager, channels_last", "resnet_fast (native)",
                       "torch.compile(torchvision) freezing"]

    def whole_model(benchmark, model, batch, dtype, size, contenders):
        for contender in contenders:
            speedup = 1.0 if contender == "torchvision eager, channels_last" else rng.uniform(0.5, 2.5)
            rows.append({"benchmark": benchmark, "model": model, "batch": batch, "image_size": size, "dtype": dtype,
                         "contender": contender, "speedup_vs_eager_channels_last": speedup})

    for model in ("resnet18", "resnet50"):
        for batch in (1, 8):
            whole_model("eval_forward", model, batch, "float32", 224, eval_contenders)
        whole_model("train_step", model, 8, "float32", 112, eval_contenders[1:3])
    whole_model("eval_forward", "resnet18", 1, "bfloat16", 224, eval_contenders)
    for layer in ("conv1", "layer1.0.conv1", "layer1.0.conv2"):
        for contender in ("eager", "folded", "ours (native)"):
            rows.append({"benchmark": "conv_layer", "model": "resnet50", "layer": layer, "batch": 8,
                         "dtype": "float32", "contender": contender, "median_ms": rng.uniform(1, 10),
                         "speedup_vs_eager": 1.0 if contender == "eager" else rng.uniform(0.8, 2.0)})
    return rows


EXPECTED_TITLES = [
    "resnet18 · eval forward · float32 · batch 1 · 224×224",
    "resnet18 · eval forward · float32 · batch 8 · 224×224",
    "resnet50 · eval forward · float32 · batch 1 · 224×224",
    "resnet50 · eval forward · float32 · batch 8 · 224×224",
    "resnet18 · eval forward · bfloat16 · batch 1 · 224×224",
    "resnet18 · train step · float32 · batch 8 · 112×112",
    "resnet50 · train step · float32 · batch 8 · 112×112",
    "resnet50 · 3 conv layers (geometric mean) · float32 · batch 8",
]


@pytest.fixture
def no_matplotlib(monkeypatch):
    """As if matplotlib were not installed."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)


def test_chart_has_one_labelled_panel_per_group_of_rows():
    pytest.importorskip("matplotlib")
    from benchmarks.plot import make_figure

    rows = _results(random.Random(1))
    fig = make_figure(ENV, rows)
    assert [ax.get_title(loc="left") for ax in fig.axes] == EXPECTED_TITLES
    speedups = {}
    for r in rows:
        if r["benchmark"] == "eval_forward" and r["model"] == "resnet50" and r["batch"] == 8:
            speedups[r["contender"]] = r["speedup_vs_eager_channels_last"]
    panel = fig.axes[EXPECTED_TITLES.index("resnet50 · eval forward · float32 · batch 8 · 224×224")]
    assert [t.get_text() for t in panel.get_yticklabels()] == list(speedups)
    assert [t.get_text() for t in panel.texts] == [f"{v:.2f}×" for v in speedups.values()]
    assert [p.get_width() for p in panel.patches] == pytest.approx(list(speedups.values()))
    for ax in fig.axes:
        assert ax.get_xlabel().startswith("speed-up vs ")
        assert ax.xaxis.get_major_formatter()(1.5) == "1.5×"
        (reference,) = [line for line in ax.get_lines() if list(line.get_xdata()) == [1, 1]]
        assert reference.get_linestyle() == "--"
    # The conv-layer panel shows each contender's geometric mean over the layers.
    conv = fig.axes[-1]
    ours = [r["speedup_vs_eager"] for r in rows if r.get("contender") == "ours (native)"]
    assert conv.patches[2].get_width() == pytest.approx((ours[0] * ours[1] * ours[2]) ** (1 / 3))


def test_chart_is_written_as_png_and_svg(tmp_path):
    pytest.importorskip("matplotlib")
    from benchmarks.plot import save_chart

    written = save_chart(ENV, _results(random.Random(2)), str(tmp_path / "run"))
    assert written == [str(tmp_path / "run.png"), str(tmp_path / "run.svg")]
    assert (tmp_path / "run.png").read_bytes()[:8] == PNG_MAGIC
    svg_text = "".join(ET.parse(tmp_path / "run.svg").getroot().itertext())
    for title in EXPECTED_TITLES + ["resnet_fast (native)", "a test card"]:
        assert title in svg_text


def test_chart_is_redrawn_from_a_saved_run(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from benchmarks.plot import main as plot_main

    saved = tmp_path / "saved.json"
    saved.write_text(json.dumps({"environment": ENV, "results": _results(random.Random(3))}))
    assert plot_main([str(saved)]) == 0
    assert (tmp_path / "saved.png").read_bytes()[:8] == PNG_MAGIC
    ET.parse(tmp_path / "saved.svg")
    assert str(tmp_path / "saved.svg") in capsys.readouterr().out


def test_without_matplotlib_the_results_are_saved_and_the_chart_skipped(no_matplotlib, tmp_path, capsys,
                                                                        monkeypatch):
    from benchmarks import plot
    from benchmarks.report import save

    monkeypatch.setattr(plot, "_skip_reported", False)
    rows = _results(random.Random(4))
    stem = Path(save(str(tmp_path), ENV, rows))
    save(str(tmp_path), ENV, rows)  # saved again after the next section: said once
    assert sorted(p.name for p in tmp_path.iterdir()) == [stem.name + ".json", stem.name + ".md"]
    assert json.loads(stem.with_suffix(".json").read_text())["results"] == rows
    err = capsys.readouterr().err
    assert err.count("benchmark chart skipped") == 1
    assert "pip install matplotlib" in err and "requirements/bench.txt" in err
