"""Whole-model eval forward: resnet_fast against torchvision eager (NCHW and
channels_last) and torch.compile of torchvision's model, same process, same
inputs. On a GPU at small batches also both replayed as CUDA graphs (ours
through resnet_fast.cuda_graphed, torch.compile in reduce-overhead mode);
torch.compile's max-autotune mode on request, and on request resnet_fast with
backend=None following a per-layer plan measured by resnet_fast.tune() in
the same run."""
import copy
from typing import Dict, List, Optional

import torch
import torchvision

import resnet_fast
from resnet_fast.testing import randomize_batchnorm_

from .timing import compare

BASELINE = "torchvision eager, channels_last"


def kernel_backends(device: torch.device):
    """resnet_fast's kernel backends that run natively on device (Triton's
    interpreter is a test tool, not a contender)."""
    from resnet_fast.backends import _unavailable_reason, triton_interpreted

    return [
        b for b in ("native", "triton")
        if _unavailable_reason(b, device) is None and not (b == "triton" and triton_interpreted())
    ]


# At and below this batch, launch overhead matters on a GPU: the CUDA-graph
# contenders (ours replayed, torch.compile's reduce-overhead mode) run too.
GRAPH_MAX_BATCH = 32


def compile_fixed_shape(model: torch.nn.Module, device: torch.device, mode: Optional[str] = None):
    """torch.compile's strongest setting for one fixed input shape: static
    shapes (torchvision's forward is one code object for every model and
    batch of the run, and dynamo would otherwise compile later ones for a
    dynamic batch, measured 30% slower at batch 1) and, on the CPU, Inductor's
    freezing (which folds BN and prepacks oneDNN weights; it applies to
    inference graphs only). Every (model, batch, dtype) of a run is another
    compiled entry of that one code object, more than dynamo's default
    recompile limit (8), past which it runs the model eagerly: the limit is
    raised for the run."""
    import torch._dynamo.config as dynamo_config

    limit = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    setattr(dynamo_config, limit, max(getattr(dynamo_config, limit), 256))
    if device.type == "cpu":
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
    return torch.compile(model, mode=mode, dynamic=False)


def flops_per_image(arch: str, size: int) -> float:
    """Forward FLOPs of one image through torchvision's `arch` (a multiply-add
    counts 2), counted by PyTorch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    model = getattr(torchvision.models, arch)().eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.randn(1, 3, size, size))
    return float(counter.get_total_flops())


def run(arch: str, batch: int, size: int, dtype: torch.dtype, device: torch.device,
        with_compile: bool, repeats: int, flops: float = 0.0, ceiling: Optional[Dict] = None,
        max_autotune: bool = False, tune: bool = False) -> List[Dict]:
    torch.manual_seed(0)
    tv = getattr(torchvision.models, arch)()
    randomize_batchnorm_(tv)  # non-trivial BN, so that the check of outputs means something
    tv = tv.eval().to(device=device, dtype=dtype)
    tv_cl = copy.deepcopy(tv).to(memory_format=torch.channels_last)
    ours = {backend: resnet_fast.from_torchvision(tv, backend=backend).eval() for backend in kernel_backends(device)}
    inputs = [torch.randn(batch, 3, size, size, device=device, dtype=dtype) for _ in range(3)]
    inputs_cl = [x.contiguous(memory_format=torch.channels_last) for x in inputs]

    contenders = {
        "torchvision eager, NCHW": lambda i: tv(inputs[i]),
        BASELINE: lambda i: tv_cl(inputs_cl[i]),
    }
    for backend, model in ours.items():
        contenders[f"resnet_fast ({backend})"] = lambda i, model=model: model(inputs_cl[i])
    graphs = device.type == "cuda" and batch <= GRAPH_MAX_BATCH
    if graphs:
        for backend, model in ours.items():
            graphed = resnet_fast.cuda_graphed(model, inputs_cl[0])
            contenders[f"resnet_fast ({backend}, CUDA graph)"] = lambda i, graphed=graphed: graphed(inputs_cl[i])
    if with_compile:
        compiled = compile_fixed_shape(copy.deepcopy(tv_cl), device)
        contenders["torch.compile(torchvision)" + (" freezing" if device.type == "cpu" else "")] = (
            lambda i: compiled(inputs_cl[i])
        )
        if graphs:
            overhead = compile_fixed_shape(copy.deepcopy(tv_cl), device, mode="reduce-overhead")
            contenders["torch.compile(torchvision) reduce-overhead"] = lambda i: overhead(inputs_cl[i])
        if max_autotune:
            autotuned = compile_fixed_shape(copy.deepcopy(tv_cl), device, mode="max-autotune")
            contenders["torch.compile(torchvision) max-autotune"] = lambda i: autotuned(inputs_cl[i])

    plan = None
    if tune:
        planned = resnet_fast.from_torchvision(tv).eval()  # backend=None: each layer as the plan says
        plan = resnet_fast.tune(planned, inputs_cl[0], save=False)
        contenders["resnet_fast (tuned plan)"] = lambda i: planned(inputs_cl[i])

    with torch.inference_mode():
        expected = tv(inputs[0]).float()
        errors = {name: _rel_err(fn(0).float(), expected) for name, fn in contenders.items()}
    timings = compare(contenders, list(range(len(inputs))), repeats=repeats, device=device)
    if tune:
        # The plan was installed for this process only: forget it, so that
        # later backend=None models follow their saved plans (or none).
        from resnet_fast.plans import clear_loaded_plans

        clear_loaded_plans()
    base = timings[BASELINE]["median_s"]
    return [
        {
            "benchmark": "eval_forward",
            "model": arch,
            "batch": batch,
            "image_size": size,
            "dtype": str(dtype).replace("torch.", ""),
            "contender": name,
            "median_ms": t["median_s"] * 1e3,
            "min_ms": t["min_s"] * 1e3,
            "max_ms": t["max_s"] * 1e3,
            "images_per_s": batch / t["median_s"],
            "speedup_vs_eager_channels_last": base / t["median_s"],
            "rel_err_vs_torchvision": errors[name],
            **_throughput(flops * batch / t["median_s"], ceiling),
            **({"peak_mem_mb": t["peak_mem_mb"]} if "peak_mem_mb" in t else {}),
            **({"plan": _plan_summary(plan)} if name == "resnet_fast (tuned plan)" else {}),
        }
        for name, t in timings.items()
    ]


def _throughput(flops_per_s: float, ceiling: Optional[Dict]) -> Dict:
    if not flops_per_s:
        return {}
    out = {"tflops": flops_per_s / 1e12}
    if ceiling:
        out["fraction_of_matmul_peak"] = out["tflops"] / ceiling["matmul_tflops"]
    return out


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm()).item()


def _plan_summary(plan: Dict[str, str]) -> str:
    """How many distinct layers the plan gives each backend: "native 14, reference 3"."""
    counts: Dict[str, int] = {}
    for backend in plan.values():
        counts[backend] = counts.get(backend, 0) + 1
    return ", ".join(f"{b} {n}" for b, n in sorted(counts.items(), key=lambda item: -item[1]))
