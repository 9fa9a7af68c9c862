"""Every Triton kernel and every launch config it can run with, compiled
ahead of time for sm_90 (H100/H200) and sm_80 (A100) by Triton's own
compiler, without a GPU (resnet_fast.kernels.triton.aot): each compiles,
fits the architecture's shared memory, and its tl.dot lowered to the
instruction meant (wgmma on Hopper wherever Triton can use it).

The compiles run in a fresh interpreter without TRITON_INTERPRET (the
interpreter's kernels are not compiled), in parallel processes, about
two minutes on two cores.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = (90, 80)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    try:
        import triton  # noqa: F401
    except ImportError:
        pytest.skip("triton is not installed")
    out = tmp_path_factory.mktemp("aot") / "kernels.json"
    env = dict(os.environ, PYTHONPATH=ROOT, TRITON_INTERPRET="0")
    code = ("import json, sys; from resnet_fast.kernels.triton import aot; "
            "json.dump({'defined': aot.kernels_defined(), 'limits': aot.SHARED_MEMORY_LIMIT}, sys.stdout)")
    defined = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                             timeout=300)
    assert defined.returncode == 0, defined.stderr[-3000:]
    done = subprocess.run([sys.executable, "-m", "resnet_fast.kernels.triton.aot", "--arch",
                           ",".join(map(str, ARCHS)), "--json", str(out), "--markdown", str(out) + ".md"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=1200)
    # Exit 1 means a compile failed; the rows say which (test_every_kernel_compiles).
    assert done.returncode in (0, 1), done.stderr[-3000:]
    info = json.loads(defined.stdout)
    return {"rows": json.loads(out.read_text())["rows"], "defined": info["defined"],
            "limits": {int(k): v for k, v in info["limits"].items()}}


def test_every_kernel_compiles_for_every_arch(compiled):
    failed = [f"{r['kernel']} {r['dtype']} {r['config']} sm_{r['arch']}: {r['error']}"
              for r in compiled["rows"] if r["error"]]
    assert not failed, "\n".join(failed)
    for arch in ARCHS:
        seen = {r["kernel"] for r in compiled["rows"] if r["arch"] == arch}
        assert seen == set(compiled["defined"]), f"sm_{arch}: never launched: {set(compiled['defined']) - seen}"


def test_every_config_fits_shared_memory(compiled):
    over = [(r["kernel"], r["dtype"], r["config"], r["arch"], r["shared_bytes"]) for r in compiled["rows"]
            if r["shared_bytes"] > compiled["limits"][r["arch"]]]
    assert not over, over


def _tensor_core_dtype(row) -> bool:
    return row["dtype"] != "float32"  # exact float32 runs on FMA units; TF32 and 16-bit on tensor cores


def test_dot_lowers_to_wgmma_on_hopper_where_triton_can(compiled):
    """On sm_90, Triton lowers tl.dot to wgmma when a warp group (4 warps)
    owns at least 64 rows: num_warps a multiple of 4 and BLOCK_M a multiple
    of 64. Every conv config meant for it must get it, the rest mma.sync."""
    convs = [r for r in compiled["rows"] if r["kernel"] == "_conv_bias_act_kernel"]
    assert len({r["config"] for r in convs}) >= 10
    for r in convs:
        label = f"{r['case']} {r['dtype']} {r['config']} sm_{r['arch']}"
        meant_for_wgmma = r["arch"] == 90 and r["num_warps"] % 4 == 0 and r["BLOCK_M"] % 64 == 0
        if not _tensor_core_dtype(r):
            assert not r["wgmma"] and not r["mma_sync"], label
        elif meant_for_wgmma:
            assert r["wgmma"], f"{label}: tl.dot did not lower to wgmma"
        else:
            assert r["mma_sync"] and not r["wgmma"], label
    for r in compiled["rows"]:
        if not r["uses_dot"]:
            assert not r["wgmma"] and not r["mma_sync"], r["kernel"]


def test_default_configs_do_not_spill_in_16_bit(compiled):
    """The config each reduction walk runs with when autotuning is off (the
    GPU tests, the GPU check's benchmark) keeps everything in registers."""
    from resnet_fast.kernels.triton.aot import _config_label
    from resnet_fast.kernels.triton.conv import DEFAULT_GPU_CONFIGS

    for walk, config in DEFAULT_GPU_CONFIGS.items():
        meta = {"BLOCK_M": config["block_m"], "BLOCK_N": config["block_n"], "BLOCK_K": config["block_k"]}
        label = _config_label(meta, config["num_warps"], config["num_stages"])
        rows = [r for r in compiled["rows"] if r["kernel"] == "_conv_bias_act_kernel" and r["config"] == label
                and r["FLAT_REDUCTION"] == (walk == "flat") and r["dtype"] in ("float16", "bfloat16")]
        assert len(rows) == 2 * len(ARCHS), (walk, label)  # two dtypes x archs
        for r in rows:
            if r["local_bytes"] is None:
                pytest.skip("cuobjdump could not read the compiled kernels")
            assert r["local_bytes"] == 0, f"{walk} {label} {r['dtype']} sm_{r['arch']}: {r['local_bytes']} B local memory"
