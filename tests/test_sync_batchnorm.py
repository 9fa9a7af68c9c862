"""Synchronised BatchNorm over two gloo ranks equals BatchNorm over the
combined batch: output, running statistics and every gradient."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from conftest import ELEM_TOL, channels_last
from resnet_fast.layers import conv_norm_act
from resnet_fast.sync_batchnorm import SyncBatchNorm2d, convert_sync_batchnorm

WORLD = 2


def _problem(with_residual: bool):
    """Conv + BN (+ residual) + ReLU inputs for the combined batch of 6."""
    g = torch.Generator().manual_seed(7)
    x = channels_last(torch.randn(6, 5, 9, 7, generator=g))
    conv = nn.Conv2d(5, 4, 3, padding=1, bias=False)
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.3)
        bn.weight.copy_(torch.rand(4, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(4, generator=g))
        bn.running_mean.copy_(torch.randn(4, generator=g))
        bn.running_var.copy_(torch.rand(4, generator=g) + 0.5)
    residual = channels_last(torch.randn(6, 4, 9, 7, generator=g)) if with_residual else None
    grad_out = torch.randn(6, 4, 9, 7, generator=g)
    return x, conv, bn, residual, grad_out


def _run(x, conv, norm, residual, grad_out):
    x = x.clone().requires_grad_(True)
    res = residual.clone().requires_grad_(True) if residual is not None else None
    out = conv_norm_act(conv, norm, x, res, True)
    (out * grad_out).sum().backward()
    return {
        "out": out.detach(), "grad_x": x.grad, "grad_res": None if res is None else res.grad,
        "grad_conv": conv.weight.grad, "grad_gamma": norm.weight.grad, "grad_beta": norm.bias.grad,
        "running_mean": norm.running_mean.clone(), "running_var": norm.running_var.clone(),
    }


def _worker(rank, init_file, with_residual, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        x, conv, bn, residual, grad_out = _problem(with_residual)
        sync = convert_sync_batchnorm(nn.Sequential(conv, bn))
        shard = slice(3 * rank, 3 * rank + 3)
        # Each rank's loss is its share of the combined loss; summing the
        # ranks' parameter gradients then gives the combined gradient.
        got = _run(x[shard], sync[0], sync[1], None if residual is None else residual[shard], grad_out[shard])
        for key in ("grad_conv", "grad_gamma", "grad_beta"):
            dist.all_reduce(got[key])
        results[rank] = got
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("with_residual", [False, True])
def test_two_ranks_match_one_process_on_the_combined_batch(tmp_path, with_residual):
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(str(tmp_path / "init"), with_residual, results), nprocs=WORLD, join=True)
    x, conv, bn, residual, grad_out = _problem(with_residual)
    expected = _run(x, conv, bn, residual, grad_out)
    # Reference check of the single-process path itself against eager PyTorch.
    x_ref = x.clone().requires_grad_(True)
    _, conv_ref, bn_ref, _, _ = _problem(with_residual)
    eager = bn_ref(conv_ref(x_ref)) + (residual if residual is not None else 0)
    torch.testing.assert_close(expected["out"], F.relu(eager).detach(), **ELEM_TOL[torch.float32])

    tol = dict(rtol=1e-4, atol=1e-5)
    for rank in range(WORLD):
        got, shard = results[rank], slice(3 * rank, 3 * rank + 3)
        torch.testing.assert_close(got["out"], expected["out"][shard], **tol)
        torch.testing.assert_close(got["grad_x"], expected["grad_x"][shard], **tol)
        if with_residual:
            torch.testing.assert_close(got["grad_res"], expected["grad_res"][shard], **tol)
        for key in ("grad_conv", "grad_gamma", "grad_beta", "running_mean", "running_var"):
            torch.testing.assert_close(got[key], expected[key], **tol, msg=lambda m, k=key: f"{k}: {m}")


def test_single_rank_sync_batchnorm_is_plain_batchnorm():
    x, conv, bn, residual, grad_out = _problem(True)
    expected = _run(x, conv, bn, residual, grad_out)
    x2, conv2, bn2, _, _ = _problem(True)
    sync = convert_sync_batchnorm(nn.Sequential(conv2, bn2))
    assert isinstance(sync[1], SyncBatchNorm2d)
    got = _run(x2, sync[0], sync[1], residual, grad_out)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, msg=lambda m, k=key: f"{k}: {m}")
