"""The fused kernels' streaming algorithm in plain PyTorch: flat memory on every device.

This is the readable mirror of :mod:`sce_loss.fused.kernels`, and the fast path wherever they do
not run (CPU, Apple MPS, CUDA without Triton, XPU). Rows r = 0..R−1 are the (crop, row) pairs of
the flattened query X (R = V·N); row r's target key is k_r = K[r mod N]. The candidates (the key
bank, then the queue) are read in chunks C of columns. One product [X/τ; K/τ_m]·Cᵀ gives a chunk's
online logits a = x·c/τ (R rows) and target logits b = k·c/τ_m (N rows, shared by the crops), and
each row keeps the states of ``partial_stats_kernel``, rescaled as its running maximum grows:

    m_a, l_a = Σ e^{a−m_a}, O_a = Σ e^{a−m_a}·c       (online)
    m_b, l_b = Σ e^{b−m_b}, O_b = Σ e^{b−m_b}·c       (target, k ≠ pos)

The kernels also sum U_a = Σ e^{a−m_a}·a and U_b = Σ e^{b−m_b}·a; as a is linear in c, these are
x·O_a/τ and x·O_b/τ, so here they come from the D-vectors. Then, as in ``finalize_kernel``, with
λ the target's weight on the positive (λ = 1 for InfoNCE, 0 for ReSSL):

    loss_r  = LSE_a − λ·a_pos − (1−λ)·U_b/l_b
    dL/dx_r = (O_a/l_a − λ·c_pos − (1−λ)·O_b/l_b) / τ
    dL/dτ_r = −(U_a/l_a − λ·a_pos − (1−λ)·U_b/l_b) / τ  =  −(x_r/τ)·dL/dx_r

The target is a constant and the queue gets no gradient, so the forward pass yields the gradients
and the backward scales them by the upstream gradient. A key bank that needs a gradient gets it
from a second chunked pass over the bank only, as in ``key_gradient_kernel``:
dL/dc_k = Σ_r g_r (P_rk − w_rk) x_r / τ, with P and w recomputed from the saved maxima and sums.
No tensor of rows × candidates larger than one chunk ever exists. The exponentials are taken in
base 2 (e^z = 2^{z·log2 e}: exp2 is the cheaper one on CPUs, as in FlashAttention). The two chunk
loops are PyTorch custom ops: torch.compile traces everything around them and runs them as they
are. Gradients are first-order only: differentiating the backward raises an error.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .problem import Problem

# Candidate columns per chunk: the logits of a chunk are (R + N) × CHUNK_SIZE values, 4 MiB at
# N = 256 in float32 (fastest of 512 to 16384 on a 2-core CPU: they stay in cache).
CHUNK_SIZE = 2048
LOG2_E, LN_2 = 1 / math.log(2), math.log(2)


def unsupported_reason(problem: Problem) -> str | None:
    """The chunked backend serves every problem: any device, any dtype."""
    return None


def losses(problem: Problem, chunk_size: int | None = None) -> Tensor:
    """Per-row losses (V, N) of ``problem``: float64 for float64 inputs, float32 otherwise."""
    dtype = problem.compute_dtype
    views, n, dim = problem.query.shape
    # With a bank, the keys are its rows offset..offset+N (and get their gradient through it).
    key, bank = (problem.key, None) if problem.bank is None else (None, problem.bank)
    flat = _StreamingLoss.apply(
        problem.query.reshape(-1, dim).to(dtype),
        None if key is None else key.to(dtype),
        None if bank is None else bank.to(dtype),
        problem.queue,
        problem.temperature,
        _constant(problem.target_temperature),
        _constant(problem.coeff),
        problem.offset,
        views,
        problem.online_has_positive,
        problem.needs_target,
        chunk_size or CHUNK_SIZE,
    )
    return flat.view(views, n)


def _constant(value):
    """A hyper-parameter that gets no gradient (λ, τ_m); 1.0 where it has no role."""
    if value is None:
        return 1.0
    return value.detach() if isinstance(value, Tensor) else value


class _StreamingLoss(torch.autograd.Function):
    """Per-row losses of the rows x (V·N, D) of ``views`` crops against [bank; queue], or against
    [key_r; queue] with no bank; dL/dx and dL/dτ come from the forward."""

    @staticmethod
    def forward(
        ctx,
        x,
        key,
        bank,
        queue,
        temperature,
        target_temperature,
        coeff,
        offset,
        views,
        online_has_pos,
        need_target,
        chunk_size,
    ):
        r = len(x)
        n = r // views
        if key is None:
            key = bank[offset : offset + n]
        rows = x / temperature  # a = rows·c; the target rows below give b = (k/τ_m)·c
        lhs = torch.cat([rows, key / target_temperature]) if need_target else rows
        c_pos = key.repeat(views, 1)
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[4]

        # The running states of every row of lhs, in base 2: m, l = Σ 2^{z−m}, and O = Σ 2^{z−m}·c
        # for the rows that need it (the target rows always: U_b = x·O_b/τ).
        exponents = lhs * LOG2_E
        a_pos2 = (exponents[:r] * c_pos).sum(-1)  # a_pos·log2 e
        m = torch.full((len(lhs),), float("-inf"), dtype=lhs.dtype, device=lhs.device)
        l = torch.zeros_like(m)
        o = lhs.new_zeros(len(lhs) - (0 if need_grad else r), lhs.shape[1])
        if bank is None and online_has_pos:  # queue mode: the positive z²_r is one more column
            m[:r], l[:r] = a_pos2, 1.0
            if need_grad:
                o[:r] = c_pos
        m, l, o = _stream(
            exponents, m, l, o, bank, queue, r, views, offset, online_has_pos, chunk_size
        )

        # loss_r = LSE_a − λ·a_pos − (1−λ)·U_b/l_b, summed as (LSE_a − a_pos) + (1−λ)·(a_pos −
        # U_b/l_b) so that large logits cancel before they are rounded.
        loss = (m[:r] - a_pos2 + l[:r].log2()) * LN_2
        target_mean = coeff * c_pos  # the target's mean candidate: λ·c_pos + (1−λ)·O_b/l_b
        if need_target:
            mean_b = (o[-n:] / l[-n:, None]).repeat(views, 1)
            loss = loss + (1 - coeff) * (rows * (c_pos - mean_b)).sum(-1)
            target_mean = target_mean + (1 - coeff) * mean_b
        grad = dtau = key_weight = None
        if need_grad:
            grad = (o[:r] / l[:r, None] - target_mean) / temperature
            dtau = -(rows * grad).sum(-1)
        if ctx.needs_input_grad[1] and online_has_pos:  # queue mode (key is None with a bank)
            # dL/dk_r = (p_pos − λ)·x_r/τ, with p_pos = 2^{a_pos·log2 e − m_a}/l_a: exactly 1/l_a
            # when the positive is the row's maximum, so p_pos − 1 keeps its digits.
            key_weight = torch.exp2(a_pos2 - m[:r]) / l[:r] - coeff
        ctx.save_for_backward(lhs, m, l, grad, dtau, key_weight, bank)
        ctx.options = (views, offset, coeff, online_has_pos, need_target, chunk_size)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, upstream):
        lhs, m, l, grad, dtau, key_weight, bank = ctx.saved_tensors
        views, offset, coeff, online_has_pos, need_target, chunk_size = ctx.options
        rows = lhs[: len(upstream)]
        grad_x = grad_key = grad_bank = grad_tau = None
        if ctx.needs_input_grad[0]:
            grad_x = upstream[:, None] * grad
        if ctx.needs_input_grad[1]:
            # Queue mode: the key is an online candidate only as its own row's positive, and
            # not at all for ReSSL (whose key then gets zeros).
            per_row = (
                rows * (upstream * key_weight)[:, None]
                if online_has_pos
                else torch.zeros_like(rows)
            )
            grad_key = per_row.view(views, -1, rows.shape[1]).sum(0)
        if ctx.needs_input_grad[2]:
            grad_bank = _bank_gradient(
                lhs,
                m,
                l,
                upstream,
                bank,
                views,
                offset,
                coeff,
                online_has_pos,
                need_target,
                chunk_size,
            )
        if ctx.needs_input_grad[4]:
            grad_tau = (upstream * dtau).sum()
        return (grad_x, grad_key, grad_bank, None, grad_tau) + (None,) * 7


# The two chunk loops are PyTorch custom ops, which torch.compile runs as they are. Traced, a loop
# would be unrolled (compile time grows with M) and inductor would fuse the chunks' maxima into one
# kernel, so every chunk's logits would exist at once.


@torch.library.custom_op("sce_loss::chunked_stream", mutates_args=())
def _stream(
    exponents: Tensor,
    m: Tensor,
    l: Tensor,
    o: Tensor,
    bank: Tensor | None,
    queue: Tensor | None,
    rows: int,
    views: int,
    offset: int,
    online_has_pos: bool,
    chunk_size: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """The running states (m, l, O) of the rows of ``exponents`` (base-2 logits z =
    exponents·c) after every candidate, [bank; queue], a chunk at a time: the loop of
    ``partial_stats_kernel``."""
    for candidates, has_pos in ((bank, True), (queue, False)):
        for start in range(0, 0 if candidates is None else len(candidates), chunk_size):
            c = candidates[start : start + chunk_size].to(exponents.dtype)
            logits = exponents @ c.T
            if has_pos:
                _mask_positives(logits, rows, views, offset - start, online_has_pos)
            m, l, o = _online_update(m, l, o, logits, c)
    return m, l, o


@_stream.register_fake
def _(exponents, m, l, o, *_):
    return torch.empty_like(m), torch.empty_like(l), torch.empty_like(o)


def _online_update(m: Tensor, l: Tensor, o: Tensor, logits: Tensor, c: Tensor):
    """One chunk of columns into the running (max, Σ2^z, Σ2^z·c) states of base-2 logits z, as
    the kernels' ``_online_update``: m' = max(m, max_k z_k), l' = l·2^{m−m'} + Σ_k 2^{z_k−m'},
    O' = O·2^{m−m'} + Σ_k 2^{z_k−m'}·c_k. ``o`` holds the last len(o) rows' O."""
    new_m = torch.maximum(m, logits.amax(1))
    safe_m = new_m.masked_fill(new_m == float("-inf"), 0.0)  # rows with no column yet
    alpha = torch.exp2(m - safe_m)
    p = logits.sub_(safe_m[:, None]).exp2_()
    l = l * alpha + p.sum(1)
    first = len(p) - len(o)
    o = torch.addmm(o * alpha[first:, None], p[first:], c)
    return new_m, l, o


def _mask_positives(
    logits: Tensor, rows: int, views: int, diagonal: int, online_has_pos: bool
) -> None:
    """Set the positive's logit to −inf where it is no candidate: in the target rows (those after
    the first ``rows``, if any), and in the online rows too for ReSSL. Row i's positive (in every
    crop) is column i + ``diagonal``."""
    logits[rows:].diagonal(diagonal).fill_(float("-inf"))
    if not online_has_pos:
        logits[:rows].view(views, rows // views, -1).diagonal(diagonal, 1, 2).fill_(float("-inf"))


def _bank_gradient(
    lhs, m, l, upstream, bank, views, offset, coeff, online_has_pos, need_target, chunk_size
) -> Tensor:
    """dL/dc_k = Σ_r g_r (P_rk − w_rk) x_r / τ for the bank's columns, with P_rk = e^{a_rk − LSE_a}
    and w_rk = λ·[k = pos] + (1−λ)·e^{b_rk − LSE_b} (k ≠ pos). The target rows are shared by the
    crops: Σ_r w_rk g_r x_r = Σ_i w_ik x̄_i with x̄_i = Σ_v g_vi x_vi."""
    rows = lhs[: len(upstream)]
    weighted = upstream[:, None] * rows  # g_r x_r / τ
    summed = weighted.view(views, -1, rows.shape[1]).sum(0)  # x̄_i / τ
    rhs = torch.cat([weighted, -(1 - coeff) * summed]) if need_target else weighted
    # P and w are 2^{z − m}/l with the forward's base-2 states: the 1/l goes into the rhs.
    grad = _bank_products(
        lhs * LOG2_E,
        m,
        rhs / l[:, None],
        bank,
        len(rows),
        views,
        offset,
        online_has_pos,
        chunk_size,
    )
    grad[offset : offset + len(summed)] -= coeff * summed
    return grad


@torch.library.custom_op("sce_loss::chunked_bank_products", mutates_args=())
def _bank_products(
    exponents: Tensor,
    m: Tensor,
    rhs: Tensor,
    bank: Tensor,
    rows: int,
    views: int,
    offset: int,
    online_has_pos: bool,
    chunk_size: int,
) -> Tensor:
    """Σ_r 2^{z_rk − m_r}·rhs_r for each bank column k, z = exponents·c_k as in the forward pass
    (positives masked), a chunk of columns at a time: ``key_gradient_kernel``'s loop."""
    chunks = []
    for start in range(0, len(bank), chunk_size):
        logits = exponents @ bank[start : start + chunk_size].T
        _mask_positives(logits, rows, views, offset - start, online_has_pos)
        chunks.append(logits.sub_(m[:, None]).exp2_().T @ rhs)
    return torch.cat(chunks)


@_bank_products.register_fake
def _(exponents, m, rhs, bank, *_):
    return rhs.new_empty(bank.shape)
