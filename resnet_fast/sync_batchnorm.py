"""BatchNorm with statistics over every rank of a process group, fused with
the residual add and ReLU: the training path for nn.SyncBatchNorm modules.

Forward: one collective per layer, an all_gather of each rank's
(count, mean, M2) combined exactly (Chan et al.'s parallel variance), so the
result equals BatchNorm over the concatenated batch. Backward: one
all_reduce of the two per-channel gradient sums. The weight and bias
gradients stay local; DistributedDataParallel averages them like every other
parameter gradient.
"""
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .ops import update_running_stats


class SyncBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d whose training statistics span every rank of
    `process_group` (default: the whole world). Unlike nn.SyncBatchNorm it
    runs on the CPU (gloo) as well as on GPUs, and it is a BatchNorm2d, so
    eval mode folds it like any other. Same state_dict keys."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def forward(self, x: Tensor) -> Tensor:
        if sync_is_active(self):
            return sync_bn_act_train(self, x, None, False)
        return super().forward(x)


def sync_is_active(bn: nn.Module) -> bool:
    """True when `bn` is a synchronised BatchNorm in training mode with more
    than one rank to synchronise with."""
    if not (isinstance(bn, (SyncBatchNorm2d, nn.SyncBatchNorm)) and bn.training):
        return False
    if not (dist.is_available() and dist.is_initialized()):
        return False
    return dist.get_world_size(bn.process_group) > 1


def _channel_view(v: Tensor) -> Tensor:
    return v.view(1, -1, 1, 1)


class _SyncBatchNormAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, residual, eps, relu, group):
        xf = x.float()
        local_count = x.numel() // x.shape[1]
        local_var, local_mean = torch.var_mean(xf, dim=(0, 2, 3), correction=0)
        packed = torch.cat([xf.new_tensor([float(local_count)]), local_mean, local_var * local_count])
        gathered = [torch.empty_like(packed) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, packed, group=group)
        stats = torch.stack(gathered)  # (ranks, 1 + 2C): count, mean, M2
        counts, means, m2s = stats[:, :1], stats[:, 1:1 + x.shape[1]], stats[:, 1 + x.shape[1]:]
        total = counts.sum()
        if total <= 1:
            raise ValueError(f"expected more than 1 value per channel across all ranks when training, got {int(total)}")
        mean = (counts * means).sum(0) / total
        m2 = (m2s + counts * (means - mean) ** 2).sum(0)
        var = m2 / total
        invstd = torch.rsqrt(var + eps)
        scale = weight.float() * invstd
        shift = bias.float() - mean * scale
        out = xf * _channel_view(scale) + _channel_view(shift)
        if residual is not None:
            out = out + residual.float()
        if relu:
            out = torch.relu(out)
        out = out.to(x.dtype).contiguous(memory_format=torch.channels_last)
        ctx.save_for_backward(x, weight, mean, invstd, out if relu else None)
        ctx.total = float(total)
        ctx.group = group
        ctx.has_residual = residual is not None
        ctx.mark_non_differentiable(mean, var, total)
        return out, mean, var, total

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_var, _grad_total):
        x, weight, mean, invstd, out = ctx.saved_tensors
        grad = grad_out.float()
        if out is not None:
            grad = grad * (out > 0)
        xhat = (x.float() - _channel_view(mean)) * _channel_view(invstd)
        sums = torch.cat([grad.sum((0, 2, 3)), (grad * xhat).sum((0, 2, 3))])
        channels = x.shape[1]
        grad_bias = sums[:channels].clone()
        grad_weight = sums[channels:].clone()
        dist.all_reduce(sums, group=ctx.group)
        mean_dy = _channel_view(sums[:channels] / ctx.total)
        mean_dy_xhat = _channel_view(sums[channels:] / ctx.total)
        grad_x = (grad - mean_dy - xhat * mean_dy_xhat) * _channel_view(invstd * weight.float())
        grad_residual = grad.to(grad_out.dtype) if ctx.has_residual else None
        return (grad_x.to(x.dtype), grad_weight.to(weight.dtype), grad_bias.to(weight.dtype),
                grad_residual, None, None, None)


def sync_bn_act_train(bn: nn.BatchNorm2d, x: Tensor, residual: Optional[Tensor], relu: bool) -> Tensor:
    """act(sync_batch_norm(x) + residual) with statistics over bn's process
    group; updates bn's running statistics as nn.SyncBatchNorm does."""
    group = bn.process_group or dist.group.WORLD
    weight = bn.weight if bn.weight is not None else x.new_ones(x.shape[1])
    bias = bn.bias if bn.bias is not None else x.new_zeros(x.shape[1])
    out, mean, var, total = _SyncBatchNormAct.apply(x, weight, bias, residual, bn.eps, relu, group)
    if bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        update_running_stats(bn.running_mean, bn.running_var, mean, var, momentum, float(total))
    return out


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """`module` with every nn.BatchNorm2d below it replaced by a
    SyncBatchNorm2d holding the same parameters and statistics (in place for
    children; the new module is returned when `module` itself is one)."""
    if type(module) is nn.BatchNorm2d:
        sync = SyncBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats, process_group)
        sync.load_state_dict(module.state_dict())
        sync.to(device=module.running_mean.device if module.running_mean is not None else None)
        if module.weight is not None:
            sync.weight.requires_grad_(module.weight.requires_grad)
            sync.bias.requires_grad_(module.bias.requires_grad)
        sync.train(module.training)
        return sync
    for name, child in module.named_children():
        converted = convert_sync_batchnorm(child, process_group)
        if converted is not child:
            setattr(module, name, converted)
    return module
