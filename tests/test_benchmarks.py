"""The benchmark entry point runs end to end (tiny settings; no timing is
checked here: speed belongs in the benchmark's own output)."""
import json
import re

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
    from resnet_fast import tuning

    assert not tuning._plans
    assert {r["batch"] for r in data["results"] if r["benchmark"] == "eval_forward"} == {1, 2}
    train = [r for r in data["results"] if r["benchmark"] == "train_step"]
    assert {r["contender"] for r in train} >= {"resnet_fast (native)", "torchvision eager, channels_last"}
    assert all(r["first_loss_diff_vs_torchvision"] < 1e-3 for r in train)
    assert data["environment"]["ceiling"]["matmul_tflops"] > 0
    # resnet_fast's output is checked against torchvision in the same run.
    assert all(r["rel_err_vs_torchvision"] < 1e-4 for r in data["results"] if r["benchmark"] == "eval_forward")
    assert "Per conv layer" in capsys.readouterr().out
    (png,) = tmp_path.glob("*.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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
                 cuda_conv="cutlass (128x64 tiles, 3 input channels zero-padded to 4)")]
    table = markdown(env, rows)
    assert "| cuda_conv |" in table
    assert "| 2.00x | cutlass (128x64 tiles, 3 input channels zero-padded to 4) |" in table
    # Without such rows (a CPU run) the column is left out.
    assert "cuda_conv" not in markdown(dict(env, device="cpu"), rows[:1])
