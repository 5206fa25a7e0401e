"""Nearest neighbours in a support set: NNCLR's positive, the support row most like each query.

``nearest_neighbours(query, support)`` = support[argmax_j query_i·support_j] for each row i, without
gradient. The products are streamed over chunks of the support (a custom op, which torch.compile
runs as it is), so no N × M similarity matrix exists: at most one chunk of about 2^20 values.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .arguments import check_bool, check_finite, check_float_tensor
from .chunked import chunk_columns
from .problem import compute_dtype_of


def nearest_neighbours(
    query: Tensor, support: Tensor, *, return_indices: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    """For each row of ``query``, the row of ``support`` with the largest dot product:
    nn_i = support[j*_i], j*_i = argmax_j query_i·support_j (the first such j on ties).

    Args:
        query: (N, D) embeddings (e.g. NNCLR's normalised projections).
        support: (M, D) support set, e.g. a :class:`~sce_loss.MemoryQueue`'s ``keys``; any float
            dtype (the products are computed in float32, or float64 when either is float64).
        return_indices: also return j* (N,), int64.

    Returns:
        (N, D) rows of ``support`` in its dtype, without gradient (and j* if asked).
    """
    for name, value in (("query", query), ("support", support)):
        check_float_tensor(name, value)
        if value.dim() != 2 or 0 in value.shape:
            raise ValueError(
                f"{name} must be a non-empty (rows, D) tensor, got shape {tuple(value.shape)}"
            )
    if support.shape[1] != query.shape[1]:
        raise ValueError(
            f"support must be (M, {query.shape[1]}) like query's D, got shape "
            f"{tuple(support.shape)}"
        )
    if support.device != query.device:
        raise ValueError(f"support must be on query's device {query.device}, got {support.device}")
    check_bool("return_indices", return_indices)
    check_finite(query=query, support=support)
    dtype = torch.promote_types(compute_dtype_of(query.dtype), compute_dtype_of(support.dtype))
    indices = nearest_indices(
        query.detach().to(dtype), support.detach(), chunk_size=chunk_columns(len(query))
    )
    rows = support.detach()[indices]
    return (rows, indices) if return_indices else rows


@torch.library.custom_op("sce_loss::nearest_indices", mutates_args=())
def nearest_indices(query: Tensor, support: Tensor, *, chunk_size: int) -> Tensor:
    """argmax_j query_i·support_j per row, streamed over ``chunk_size`` rows of ``support`` at a
    time (each converted to the query's dtype as it is read); the first maximum on ties."""
    best = query.new_full((len(query),), float("-inf"))
    indices = torch.zeros(len(query), dtype=torch.int64, device=query.device)
    for start in range(0, len(support), chunk_size):
        chunk = support[start : start + chunk_size].to(query.dtype)
        values, columns = (query @ chunk.T).max(1)
        better = values > best  # strictly: an earlier chunk keeps a tie
        best = torch.where(better, values, best)
        indices = torch.where(better, columns + start, indices)
    return indices


@nearest_indices.register_fake
def _(query: Tensor, support: Tensor, *, chunk_size: int) -> Tensor:
    return torch.empty(len(query), dtype=torch.int64, device=query.device)
