"""The benchmark entry point runs end to end (tiny settings; no timing is
checked here: speed belongs in the benchmark's own output)."""
import json

from benchmarks.__main__ import main


def test_benchmark_entry_point_writes_results(tmp_path, capsys):
    args = ["--device", "cpu", "--models", "resnet18", "--batch", "1", "--batches", "1,2", "--size", "32",
            "--repeats", "1", "--no-compile", "--layers", "resnet18", "--train-batch", "2", "--train-size", "32",
            "--out", str(tmp_path)]
    assert main(args) == 0
    (json_file,) = tmp_path.glob("*.json")
    data = json.loads(json_file.read_text())
    contenders = {r["contender"] for r in data["results"] if r["benchmark"] == "eval_forward"}
    assert {"resnet_fast (native)", "torchvision eager, channels_last"} <= contenders
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
