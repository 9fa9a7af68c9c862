"""The GPU check (benchmarks/gpu_check.sh) and its smoke run
(benchmarks/smoke.py), rehearsed without a GPU: a phase that times out
leaves the later phases and the summary, missing CUTLASS headers stop it at
once, at most 8 files come back, and the smoke run's lines report errors,
crashes and hangs as such."""
import json
import os
import subprocess

import pytest
import torch

from benchmarks import smoke

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECK = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
TINY_BENCH = ("--device cpu --models resnet18 --layers resnet18 --batch 1 --batches 1 --size 32 --train-batch 0 "
              "--no-compile --repeats 1")


def run_check(out, **env):
    environment = dict(os.environ, OUT=str(out), BENCH_ARGS=TINY_BENCH, **env)
    done = subprocess.run(["bash", CHECK], capture_output=True, text=True, env=environment, cwd=ROOT, timeout=600)
    summary = (out / "summary.txt").read_text() if (out / "summary.txt").exists() else ""
    return done, summary


def test_a_phase_that_times_out_leaves_the_later_ones(tmp_path):
    done, summary = run_check(tmp_path, PHASES="versions smoke bench summary", LIMIT_SMOKE="2", LIMIT_BENCH="400")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "smoke         TIMED OUT at 2s" in summary
    assert "bench         ok" in summary
    assert "torch " in summary and "CUTLASS headers: " in summary
    # The benchmark saved its per-layer rows, and the summary quotes them.
    (results,) = tmp_path.glob("cpu-*.json")
    rows = json.loads(results.read_text())["results"]
    assert {r["benchmark"] for r in rows} == {"conv_layer", "eval_forward"}
    assert "| ours (native) |" in summary.split("== benchmark")[1]
    # Only what the GPU machine sends back: at most 8 files, no folders, no chart.
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) <= 8 and all((tmp_path / f).is_file() for f in files), files
    assert not list(tmp_path.glob("*.png"))
    assert summary.rstrip().endswith("s budget") and done.stdout.rstrip().endswith("s budget")


def test_missing_cutlass_headers_stop_the_check_at_once(tmp_path):
    done, summary = run_check(tmp_path, PHASES="versions build summary", CUTLASS_PATH=str(tmp_path / "nowhere"))
    assert done.returncode == 3
    assert "CUTLASS headers missing" in summary and "stage_cutlass.sh" in summary
    assert not (tmp_path / "build.log").exists()


# ------------------------------------------------------------ smoke

@pytest.fixture
def small_shapes(monkeypatch, tf32):
    """The smoke families at batch 2 (the CPU is slow), their process-wide
    switches restored afterwards."""
    monkeypatch.setattr(smoke, "LAYERS", {name: (2,) + shape[1:] for name, shape in smoke.LAYERS.items()})
    monkeypatch.setattr(smoke, "BN_SHAPE", (2,) + smoke.BN_SHAPE[1:])
    for var in ("RESNET_FAST_CUDA_CONV", "RESNET_FAST_TRITON_AUTOTUNE"):
        monkeypatch.setenv(var, os.environ.get(var, "auto" if var == "RESNET_FAST_CUDA_CONV" else "1"))
    tf32(torch.backends.cudnn.allow_tf32)


CPU_FAMILIES = [name for name, family in smoke.FAMILIES.items() if family.backend == "native"]


@pytest.mark.parametrize("name", CPU_FAMILIES)
def test_smoke_family_matches_the_reference_on_the_cpu(name, small_shapes):
    """Every native family's code path (the CUDA ones run the CPU kernels
    here, with their dtype and tolerance)."""
    result = smoke.run_family(name, "cpu")
    assert result["ok"], result
    assert result["errors"] and result["rel_err"] <= result["tol"]
    assert smoke.line(result).startswith(f"{name:<40} ok")
    family = smoke.FAMILIES[name]
    if family.expect_kernel and smoke._native_has_cuda():  # the CUDA kernel it is meant to reach
        assert result["kernel_on_cuda"].startswith(family.expect_kernel), result["kernel_on_cuda"]


def test_smoke_reports_a_wrong_kernel(small_shapes, monkeypatch):
    class Wrong:
        @staticmethod
        def conv_bias_act(*args):
            return torch.ops.resnet_fast.conv_bias_act(*args) * 1.01

    monkeypatch.setattr(smoke, "_namespace", lambda backend: Wrong)
    result = smoke.run_family("native conv (auto), float32", "cpu")
    assert not result["ok"] and "FAIL rel err 1.0e-02" in smoke.line(result)


def test_smoke_reports_crashes_and_hangs():
    hung = smoke._in_subprocess("native bias/ReLU backward, float32", "cpu", timeout_s=0.05)
    assert not hung["ok"] and smoke.line(hung).endswith("TIMED OUT after 0 s")
    crashed = smoke._in_subprocess("no such family", "cpu", timeout_s=120)
    assert not crashed["ok"] and "CRASHED (exit 2)" in smoke.line(crashed) and "unknown family" in crashed["outcome"]
