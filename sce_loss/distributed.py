"""Gathering keys across the ranks of torch.distributed, with gradients returned to their owners.

With W ranks each holding N keys, every rank sees the concatenation [keys of rank 0, ..., rank W−1],
so row i of rank r has its positive at column r·N + i. Each rank's loss L_r depends on every rank's
keys; the objective the ranks optimise together is Σ_r L_r (DDP then averages), so the gradient for
the keys of rank s is Σ_r ∂L_r/∂(block s): the backward reduce-scatters (sums, and keeps each rank's
own block of) the gradient of the gathered tensor, moving 1/W of it per rank.

The collectives are PyTorch's functional ones, so a compiled step traces through them. Every rank
must hold the same number of keys, of the same D and dtype. For CPU tensors (gloo) that is checked
on every eager call, since an uneven gather would abort the process: one 40-byte all-gather of the
shapes, read on the host, which costs no device synchronisation. On a GPU the check would
synchronise the device each step, so there it runs only under ``TORCH_DISTRIBUTED_DEBUG=DETAIL``;
it never runs while compiling.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

try:  # the name since torch 2.12; the gradient of the gather is a reduce-scatter (sum)
    from torch.distributed._functional_collectives import all_gather_single_autograd as _gather
except ImportError:
    from torch.distributed._functional_collectives import all_gather_tensor_autograd as _gather


def resolve_group(gather):
    """The process group meant by ``gather`` (False, True or a group); None for one process."""
    if isinstance(gather, np.bool_):
        gather = bool(gather)
    if gather is False:
        return None
    if not (gather is True or isinstance(gather, dist.ProcessGroup)):
        # None too: torch.distributed reads group=None as the default group, so it is no "no".
        raise TypeError(
            "gather must be a bool or a torch.distributed.ProcessGroup (True: the default "
            f"group), got {type(gather).__name__}"
        )
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = dist.group.WORLD if gather is True else gather
    return group if dist.get_world_size(group) > 1 else None


def gather_keys(key: Tensor, group, *, rows_per_sample: int = 1) -> tuple[Tensor, int]:
    """Every rank's keys, concatenated in rank order (differentiable), and this rank's offset
    (``group`` from :func:`resolve_group`; None for a single process). ``rows_per_sample``: how
    many of ``key``'s rows one sample gives (2 in the symmetric form), for the error message."""
    if group is None:
        return key, 0
    _check_equal_batches(key, group, rows_per_sample=rows_per_sample)
    gathered = _ContiguousGradient.apply(_gather(key.contiguous(), 0, group))
    return gathered, dist.get_rank(group) * key.shape[0]


class _ContiguousGradient(torch.autograd.Function):
    """The identity, whose backward makes the gradient contiguous: the gather's backward
    reduce-scatters it, which torch 2.7 to 2.11 refuse for a non-contiguous tensor (a loss that
    transposes or expands the gathered keys gives one)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.contiguous()


@torch.no_grad()
def all_gather_constant(tensor: Tensor, group) -> Tensor:
    """Every rank's ``tensor`` concatenated in rank order, without gradient (the same on all)."""
    _check_equal_batches(tensor, group)
    return _gather(tensor.detach().contiguous(), 0, group)


_DTYPES = (
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.bool,
)


def _check_equal_batches(tensor: Tensor, group, *, rows_per_sample: int = 1) -> None:
    """Refuse ranks holding tensors the gather cannot join (another number of samples, views, D
    or dtype), naming each rank's: for CPU tensors always, else under
    TORCH_DISTRIBUTED_DEBUG=DETAIL (module docstring)."""
    if torch.compiler.is_compiling():
        return
    if tensor.device.type != "cpu" and dist.get_debug_level() != dist.DebugLevel.DETAIL:
        return
    dtype = _DTYPES.index(tensor.dtype) if tensor.dtype in _DTYPES else len(_DTYPES)
    # (samples, views, D): a (B, V, D) tensor is B samples of V views; a (rows, D) one holds
    # rows_per_sample rows (views) per sample.
    if tensor.dim() == 3:
        samples, views, dim = tensor.shape
    else:
        samples, views = tensor.shape[0] // rows_per_sample, rows_per_sample
        dim = tensor.shape[1] if tensor.dim() == 2 else 0
    shape = [samples, views, dim, tensor.shape[0] % rows_per_sample, dtype]
    mine = torch.tensor(shape, device=tensor.device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    shapes = [tuple(int(v) for v in s) for s in every]
    if len(set(shapes)) != 1:
        raise ValueError(
            "every rank must hold the same number of samples, views, dimensions and dtype to "
            "gather them, got "
            + "; ".join(f"{_described(shape)} on rank {rank}" for rank, shape in enumerate(shapes))
        )


def _described(shape: tuple[int, ...]) -> str:
    """'3 samples × 2 views of D = 8, float32' from a rank's ``_check_equal_batches`` shape."""
    samples, views, dim, _, dtype = shape
    text = f"{samples} samples" + (f" × {views} views" if views > 1 else "")
    text += f" of D = {dim}" if dim else ""
    return text + (
        f", {str(_DTYPES[dtype]).removeprefix('torch.')}"
        if dtype < len(_DTYPES)
        else ", another dtype"
    )
