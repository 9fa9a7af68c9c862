"""What a result was measured on: device, versions, settings."""
import datetime
import os
import platform

import torch

from resnet_fast.plans import device_name


def describe(device: torch.device) -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(card=props.name, cuda=torch.version.cuda, driver=_nvidia_driver())
    else:
        info.update(card=device_name(device), cpu_count=os.cpu_count())
    try:
        import triton

        from resnet_fast.kernels.triton.runtime import autotune_enabled

        info["triton"] = triton.__version__
        # Off: the Triton conv ran its default config per reduction walk, untuned.
        info["triton_autotune"] = autotune_enabled()
    except ImportError:
        info["triton"] = None
    return info


def _nvidia_driver() -> str:
    try:
        import subprocess

        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10,
        )
        return out.stdout.strip().splitlines()[0]
    except Exception:
        return "unknown"
