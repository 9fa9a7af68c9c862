"""The benchmark entry point runs end to end (tiny settings; no timing is
checked here: speed belongs in the benchmark's own output)."""
import json

from benchmarks.__main__ import main


def test_benchmark_entry_point_writes_results(tmp_path, capsys):
    args = ["--device", "cpu", "--models", "resnet18", "--batch", "1", "--size", "32", "--repeats", "1",
            "--no-compile", "--layers", "resnet18", "--out", str(tmp_path)]
    assert main(args) == 0
    (json_file,) = tmp_path.glob("*.json")
    data = json.loads(json_file.read_text())
    contenders = {r["contender"] for r in data["results"] if r["benchmark"] == "eval_forward"}
    assert {"resnet_fast (native)", "torchvision eager, channels_last"} <= contenders
    # resnet_fast's output is checked against torchvision in the same run.
    assert all(r["rel_err_vs_torchvision"] < 1e-4 for r in data["results"] if r["benchmark"] == "eval_forward")
    assert "Per conv layer" in capsys.readouterr().out
