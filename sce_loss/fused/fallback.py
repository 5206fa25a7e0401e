"""The fused ops' outputs computed by the chunked backend's streaming loop: what a custom op of
``backend="auto"`` computes when its kernels fail to launch (inside a compiled graph, where the
first-use check cannot run first). Same inputs and outputs as the kernels, in float32:
LSE_a = ln Σ_k e^{a_k} over the online candidates, LSE_b = ln Σ_{k≠pos} e^{b_k}, each (2, R) as
its two terms (m, log l)."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import chunked
from ..chunked import LN_2, LOG2_E


def streaming_forward(
    query,
    key,
    bank,
    queue,
    coeff,
    temperature,
    target_temperature,
    *,
    offset,
    online_has_pos,
    need_target,
    need_grad,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, dL/dquery, dL/dτ, LSE_a, LSE_b) per row, as ``fused_forward`` returns them."""
    rows, dim = query.shape
    n = key.shape[0]
    views = rows // n
    k = key.float()
    exponents = chunked.base2_rows(
        query.float(), k, temperature, target_temperature, need_target=need_target
    )
    c_pos = k.repeat(views, 1)
    masked = chunked.masked_columns(
        n,
        views=views,
        offset=offset,
        online_has_pos=online_has_pos,
        need_target=need_target,
        symmetric=False,
        device=query.device,
    )
    queue_positive = bank is None and online_has_pos
    # a_pos from a chunk's product: of the bank's, or, in queue mode, of one with the keys.
    m, l, offsets, tops, a_pos2, gaps = chunked.stream_states(
        exponents,
        None if bank is None else bank.float(),
        queue,
        masked,
        k if queue_positive else None,
        chunked.positive_columns(rows, n, 0 if bank is None else offset, query.device),
        chunk_size=chunked.chunk_columns(len(exponents)),
        views=views,
        need_target=need_target,
    )
    lse = torch.stack([m * LN_2, l.log()])  # (m, log l) in base e
    means = tops + offsets / l[:, None]
    u_a = chunked.row_dots(exponents[:rows], means[:rows]) * LN_2  # Σ_k P_k a_k
    a_pos = a_pos2 * LN_2
    target_mean, u_target, lse_b = c_pos, a_pos, a_pos.new_zeros(2, rows)
    if need_target:
        mean_b = means[rows:].repeat(views, 1)
        u_b = chunked.row_dots(exponents[:rows], mean_b) * LN_2
        target_mean = coeff * c_pos + (1 - coeff) * mean_b
        u_target = coeff * a_pos + (1 - coeff) * u_b
        lse_b = lse[:, rows:].repeat(1, views)
    # As finalize_kernel sums it, large logits cancelled first: log l_a + λ·(m_a − a_pos) +
    # (1−λ)·g_b/l_b (base 2, then in base e).
    loss = l[:rows].log2() + coeff * (m[:rows] - a_pos2)
    if need_target:
        loss = loss + (1 - coeff) * (gaps / l[rows:].repeat(views))
    loss = loss * LN_2
    dtau = -(u_a - u_target) / temperature
    grad = (
        (means[:rows] - target_mean) / temperature
        if need_grad
        else query.new_empty((0, dim), dtype=torch.float32)
    )
    return loss, grad, dtau, lse[:, :rows].contiguous(), lse_b


def streaming_bank_gradient(
    query,
    key,
    bank,
    upstream,
    lse_a,
    lse_b,
    coeff,
    temperature,
    target_temperature,
    *,
    offset,
    online_has_pos,
    need_target,
) -> Tensor:
    """dL/dbank as ``fused_bank_gradient`` returns it, from the forward's LSE_a and LSE_b."""
    rows = query.shape[0]
    n = key.shape[0]
    exponents = chunked.base2_rows(
        query.float(), key.float(), temperature, target_temperature, need_target=need_target
    )
    lse = torch.cat([lse_a, lse_b[:, :n]], 1) if need_target else lse_a  # (m, log l), base e
    masked = chunked.masked_columns(
        n,
        views=rows // n,
        offset=offset,
        online_has_pos=online_has_pos,
        need_target=need_target,
        symmetric=False,
        device=query.device,
    )
    positive_weight = None
    if online_has_pos:  # P_r,pos − λ, the positive's logit recomputed here
        c_pos = bank.float()[offset : offset + n].repeat(rows // n, 1)
        a_pos = chunked.row_dots(exponents[:rows], c_pos) * LN_2
        positive_weight = torch.exp((a_pos - lse_a[0]) - lse_a[1]) - coeff
    grad = chunked.bank_gradient(
        exponents,
        lse[0] * LOG2_E,
        lse[1].exp(),
        upstream.float(),
        bank.float(),
        masked=masked,
        views=rows // n,
        offset=offset,
        coeff=coeff,
        need_target=need_target,
        chunk_size=chunked.chunk_columns(len(exponents)),
        positive_weight=positive_weight,
    )
    return grad.to(bank.dtype)
