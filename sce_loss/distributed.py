"""Gathering keys across the ranks of torch.distributed, with gradients returned to their owners.

With W ranks each holding N keys, every rank sees the concatenation [keys of rank 0, ..., rank W−1],
so row i of rank r has its positive at column r·N + i. Each rank's loss L_r depends on every rank's
keys; the objective the ranks optimise together is Σ_r L_r (DDP then averages), so the gradient for
the keys of rank s is Σ_r ∂L_r/∂(block s): the backward all-reduces (sums) the gradient of the
gathered tensor and keeps its own block.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def resolve_group(gather):
    """The process group meant by ``gather`` (False, True or a group), or None for a single process."""
    if gather is False or gather is None:
        return None
    if not (gather is True or isinstance(gather, dist.ProcessGroup)):
        raise TypeError(f"gather must be a bool or a torch.distributed.ProcessGroup, got {type(gather).__name__}")
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = dist.group.WORLD if gather is True else gather
    return group if dist.get_world_size(group) > 1 else None


def gather_keys(key: Tensor, group) -> tuple[Tensor, int]:
    """Every rank's keys, concatenated in rank order (differentiable), and this rank's offset
    (``group`` from :func:`resolve_group`; None for a single process)."""
    if group is None:
        return key, 0
    _check_equal_batches(key, group)
    return _AllGather.apply(key, group), dist.get_rank(group) * key.shape[0]


@torch.no_grad()
def all_gather_constant(tensor: Tensor, group) -> Tensor:
    """Every rank's ``tensor`` concatenated in rank order, without gradient; the same on each rank."""
    _check_equal_batches(tensor, group)
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts)


def _check_equal_batches(tensor: Tensor, group) -> None:
    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.empty_like(size) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, size, group=group)
    sizes = [int(s) for s in sizes]
    if len(set(sizes)) != 1:
        raise ValueError(f"every rank must hold the same number of keys to gather them, got {sizes}")


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, key: Tensor, group) -> Tensor:
        ctx.group, ctx.rows = group, key.shape[0]
        parts = [torch.empty_like(key) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, key.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = dist.get_rank(ctx.group) * ctx.rows
        return grad[start:start + ctx.rows], None
