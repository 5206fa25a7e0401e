"""The fused kernels' streaming algorithm in plain PyTorch: flat memory on every device.

This is the readable mirror of :mod:`sce_loss.fused.kernels`, and the fast path wherever they do
not run (CPU, Apple MPS, CUDA without Triton, XPU). Rows r = 0..R−1 are the (crop, row) pairs of
the flattened query X (R = V·N); row r's target key is k_r = K[r mod N]. The candidates (the key
bank, then the queue) are read in chunks C of columns. One product [X/τ; K/τ_m]·Cᵀ gives a chunk's
online logits a = x·c/τ (R rows) and target logits b = k·c/τ_m (N rows, shared by the crops), and
each row keeps the states of ``partial_stats_kernel``, rescaled as its running maximum grows:

    m_a, l_a = Σ e^{a−m_a}, O_a = Σ e^{a−m_a}·c                            (online)
    m_b, l_b = Σ e^{b−m_b}, g_b = Σ e^{b−m_b}·(m_a−a), O_b = Σ e^{b−m_b}·c  (target, k ≠ pos)

O is kept as t and O − l·t, t the candidate of the running maximum, summed without t's own term,
so that the mean O/l = t + (O − l·t)/l of a distribution sharp on t keeps t's digits; O only
where a gradient is wanted. Then, as in ``finalize_kernel``, with λ the target's weight on the
positive (λ = 1 for InfoNCE, 0 for ReSSL):

    loss_r  = LSE_a − λ·a_pos − (1−λ)·Σ_k s²_k a_k  =  log l_a + λ·(m_a − a_pos) + (1−λ)·g_b/l_b
    dL/dx_r = (O_a/l_a − λ·c_pos − (1−λ)·O_b/l_b) / τ
    dL/dτ_r = −(x_r/τ)·dL/dx_r

At small τ the logits are large (1.4e4 in base 2 at τ = 1e-4) and round by 1e-3, so the loss is
summed from terms in which they cancel before they are rounded: the gap g_b to the online
maximum (terms ≥ 0, moved with m_a) from the same logits as l_a, so that their rounding cancels
as in the reference's Σ_k (p_k − s²_k)·a_k, and a_pos read from a chunk's product (the one m_a
comes from, or in queue mode one that rounds as the queue's chunks do, so that a copy of the
positive in the queue gets the same logit); the gradient keeps the tops' differences apart,
exactly 0 where they are the same candidate. A chunk is multiplied by blocks of rows: every row
at once where they fit in ROW_BLOCK, else the target rows' blocks first, whose chunk their online
rows' gaps then read.

The target is a constant and the queue gets no gradient, so the forward pass yields the gradients
and the backward scales them by the upstream gradient. A key bank that needs a gradient gets it
from a second chunked pass over the bank only, as in ``key_gradient_kernel``:
dL/dc_k = Σ_r g_r (P_rk − w_rk) x_r / τ, with P and w recomputed from the saved maxima and sums.
No tensor of rows × candidates larger than one chunk ever exists. The exponentials are taken in
base 2 (e^z = 2^{z·log2 e}: exp2 is the cheaper one on CPUs, as in FlashAttention). The two chunk
loops are PyTorch custom ops: torch.compile traces everything around them and runs them as they
are. Columns that are no candidate of a row (the positive in the target rows, and in the online
rows for ReSSL; a row's own embedding in the symmetric form) are masked chunk by chunk.

Beyond first-order eager autograd the streaming backward cannot serve, so this backend computes
through the reference's differentiable graph, with the reference's memory: when the backward is
itself differentiated (``create_graph=True``, e.g. a gradient penalty), the backward recomputes
the losses with :mod:`sce_loss.reference` from the saved inputs (and under a torch.func
transform, grad, vjp, jacrev or vmap, :mod:`sce_loss.functional` hands every call to the
reference). Either way the numbers are the reference's. A queue updated in place between the
forward and such a backward cannot be recomputed: that raises an error.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from . import reference
from .problem import (
    Problem,
    check_queue_unchanged,
    constant,
    differentiating_backward,
    needs_target,
    online_has_positive,
    own_columns,
    queue_version,
)

# A chunk of logits is (at most ROW_BLOCK rows) × (columns) ≈ CHUNK_ELEMENTS values, 4 MiB in
# float32, which stay in cache: at N = 256 (512 online and target rows) 2048 columns, the fastest
# of 512 to 16384 measured on a 2-core CPU; a SimCLR batch of 2N = 16384 is streamed in row blocks
# of 8192 against 128 columns. Never fewer than MIN_CHUNK columns, so a product stays a GEMM that
# BLAS runs well.
CHUNK_ELEMENTS = 1 << 20
ROW_BLOCK = 8192
MIN_CHUNK = 64
LOG2_E, LN_2 = 1 / math.log(2), math.log(2)


def unsupported_reason(problem: Problem) -> str | None:
    """The chunked backend serves every problem: any device, any dtype."""
    return None


def chunk_columns(lhs_rows: int) -> int:
    """Candidate columns per chunk for ``lhs_rows`` rows of logits (online and target), streamed
    ROW_BLOCK rows at a time. While torch.compile traces, the width for a full row block, whatever
    the rows: a width that depended on them would specialise the graph to each batch size (it is
    an integer argument of the chunk loops), and no tile is larger for fewer rows."""
    if torch.compiler.is_compiling():
        return max(MIN_CHUNK, CHUNK_ELEMENTS // ROW_BLOCK)
    return max(MIN_CHUNK, CHUNK_ELEMENTS // max(min(lhs_rows, ROW_BLOCK), 1))


def losses(problem: Problem, *, chunk_size: int | None = None) -> Tensor:
    """Per-row losses (V, N) of ``problem``: float64 for float64 inputs, float32 otherwise.
    ``chunk_size`` (candidate columns per chunk; ``chunk_columns``' choice by default) is for
    tests, which stream ragged chunks down to one column."""
    dtype = problem.compute_dtype
    views, n, dim = problem.query.shape
    # With a bank, the keys are its rows offset..offset+N (and get their gradient through it).
    key, bank = (problem.key, None) if problem.bank is None else (None, problem.bank)
    flat = _StreamingLoss.apply(
        problem.query.reshape(-1, dim).to(dtype),
        None if key is None else key.to(dtype),
        None if bank is None else bank.to(dtype),
        problem.queue,
        _at_least(dtype, problem.temperature),
        _at_least(dtype, constant(problem.target_temperature)),
        _at_least(dtype, constant(problem.coeff)),
        Stream(
            problem.loss,
            problem.offset,
            views,
            problem.symmetric,
            # Columns per chunk for the online rows (V·N) and the target rows (N, if any).
            chunk_size or chunk_columns((views + problem.needs_target) * n),
        ),
    )
    return flat.view(views, n)


class Stream(NamedTuple):
    """A streaming pass's settings beside its tensors."""

    loss: str
    offset: int  # the bank row of query row 0's positive
    views: int  # crops V: the rows are V·N
    symmetric: bool  # the SimCLR form: each row's own embedding is no candidate
    chunk_size: int  # candidate columns per chunk


def _at_least(dtype: torch.dtype, value):
    """A tensor hyper-parameter in at least the compute dtype (differentiably: a learnable τ keeps
    its gradient), so that 1/τ is not rounded in a lower precision than the inputs', as the
    reference does not round it; floats as they are."""
    if not isinstance(value, Tensor):
        return value
    return value.to(torch.promote_types(value.dtype, dtype))


class _StreamingLoss(torch.autograd.Function):
    """Per-row losses of the rows x (V·N, D) of ``stream.views`` crops against [bank; queue], or,
    with no bank, against [own_key_r; queue] (queue mode); dL/dx and dL/dτ come from the forward."""

    @staticmethod
    def forward(
        ctx,
        x,
        own_key,
        bank,
        queue,
        temperature,
        target_temperature,
        coeff,
        stream: Stream,
    ):
        offset, views = stream.offset, stream.views
        r = x.shape[0]
        n = r // views
        online_has_pos, need_target = online_has_positive(stream.loss), needs_target(stream.loss)
        key = bank[offset : offset + n] if own_key is None else own_key
        c_pos = key if views == 1 else key.repeat(views, 1)
        # A tensor τ always gets dL/dτ (cheap, one dot per row): under torch.compile of a
        # torch.func transform, needs_input_grad does not see the transform's inputs.
        tau_is_tensor = isinstance(temperature, Tensor)
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[4] or tau_is_tensor

        # The base-2 logits z = exponents·c of every candidate c: the online rows x·log2(e)/τ,
        # then the target rows k·log2(e)/τ_m (one product per chunk serves both), scaled in place.
        exponents = base2_rows(x, key, temperature, target_temperature, need_target=need_target)
        masked = masked_columns(
            n,
            views=views,
            offset=offset,
            online_has_pos=online_has_pos,
            need_target=need_target,
            symmetric=stream.symmetric,
            device=x.device,
        )
        # a_pos·log2 e, read from a chunk's product: from the one the row's maximum comes from
        # with a bank, so that LSE_a − a_pos is not below 0 by rounding; in queue mode, where the
        # positive z²_r is one more column of the online rows before the others, from a product
        # of the rows with the keys that rounds as the queue's chunks do, so that a copy of z²_r
        # in the queue gets its logit bit for bit.
        queue_positive = bank is None and online_has_pos
        m, l, offsets, tops, a_pos2, gaps = stream_states(
            exponents,
            bank,
            queue,
            masked,
            key if queue_positive else None,
            positive_columns(r, n, offset if bank is not None else 0, x.device),
            chunk_size=stream.chunk_size,
            views=views,
            need_target=need_target,
            vectors_from=0 if need_grad else len(exponents),  # O: for the gradient only
        )

        # loss_r = LSE_a − λ·a_pos − (1−λ)·Σ_k w_k a_k, summed as log l_a + λ·(m_a − a_pos) +
        # (1−λ)·g_b/l_b, so that large logits cancel before they are rounded: m_a − a_pos from
        # one product, and g_b/l_b = Σ_k w_k (m_a − a_k) from terms that are each ≥ 0.
        loss = l[:r].log2()
        if online_has_pos:
            loss = loss + coeff * (m[:r] - a_pos2)
        if need_target:
            loss = loss + (1 - coeff) * (gaps / l[r:].repeat(views))
        loss = loss * LN_2
        grad = dtau = key_weight = None
        if need_grad:
            # dL/dx_r = (O_a/l_a − λ·c_pos − (1−λ)·O_b/l_b)/τ, with O/l = t + Δ (Δ = O/l − t,
            # each distribution's mean candidate less its maximum's candidate t) and the tops'
            # differences apart, so that the candidates cancel exactly where the tops are equal:
            # Δ_a + λ·(t_a − c_pos) + (1−λ)·(t_a − t_b − Δ_b).
            offsets.div_(l[:, None])
            top_a = tops[:r]
            grad = offsets[:r].add_(coeff * (top_a - c_pos))
            if need_target:
                top_b, offset_b = tops[r:].repeat(views, 1), offsets[r:].repeat(views, 1)
                grad.add_((1 - coeff) * ((top_a - top_b).sub_(offset_b)))
        del offsets, tops
        if grad is not None:
            grad.div_(temperature)
            dtau = -LN_2 * row_dots(exponents[:r], grad)
        if online_has_pos and (ctx.needs_input_grad[1] or ctx.needs_input_grad[2]):
            # The weight of row r's positive in dL/dk: p_pos − λ, with p_pos = 2^{a_pos·log2 e −
            # m_a}/l_a exactly 1/l_a when the positive is the row's maximum (a_pos and m_a come
            # from one product), so p_pos − 1 keeps its digits.
            key_weight = torch.exp2(a_pos2 - m[:r]) / l[:r] - coeff
        tau = temperature if isinstance(temperature, Tensor) else None
        ctx.save_for_backward(
            x, own_key, bank, tau, exponents, m, l, grad, dtau, key_weight, masked
        )
        ctx.target_temperature, ctx.coeff = target_temperature, coeff
        ctx.stream = stream
        # Kept for a recomputation (create_graph=True), which refuses a queue updated since.
        ctx.queue, ctx.queue_version = queue, queue_version(queue)
        ctx.temperature = None if isinstance(temperature, Tensor) else temperature
        return loss

    @staticmethod
    def backward(ctx, upstream):
        if differentiating_backward():
            return _differentiable_backward(ctx, upstream)
        _, _, bank, tau, exponents, m, l, grad, dtau, key_weight, masked = ctx.saved_tensors
        stream = ctx.stream
        grad_x = grad_key = grad_bank = grad_tau = None
        if ctx.needs_input_grad[0]:
            grad_x = upstream[:, None] * grad
        if ctx.needs_input_grad[1]:  # queue mode (with a bank, the key is one of its rows)
            # Queue mode: the key is an online candidate only as its own row's positive, and
            # not at all for ReSSL (whose key then gets zeros).
            scaled_x = exponents[: upstream.shape[0]] * LN_2  # x/τ
            per_row = (
                scaled_x * (upstream * key_weight)[:, None]
                if key_weight is not None
                else torch.zeros_like(scaled_x)
            )
            grad_key = per_row.view(stream.views, -1, scaled_x.shape[1]).sum(0)
        if ctx.needs_input_grad[2]:
            grad_bank = bank_gradient(
                exponents,
                m,
                l,
                upstream,
                bank,
                masked=masked,
                views=stream.views,
                offset=stream.offset,
                coeff=ctx.coeff,
                need_target=needs_target(stream.loss),
                chunk_size=stream.chunk_size,
                positive_weight=key_weight,
            )
        if tau is not None:
            grad_tau = (upstream * dtau).sum()
        return grad_x, grad_key, grad_bank, None, grad_tau, None, None, None


def base2_rows(x: Tensor, key: Tensor, temperature, target_temperature, *, need_target: bool):
    """The rows whose products with a candidate c are base-2 logits: x·log2(e)/τ (online), then,
    if ``need_target``, k·log2(e)/τ_m (target), one new tensor scaled in place."""
    exponents = torch.cat([x, key]) if need_target else x.clone()
    exponents[: x.shape[0]].mul_(LOG2_E / temperature)
    exponents[x.shape[0] :].mul_(LOG2_E / target_temperature)
    return exponents


def row_dots(a: Tensor, b: Tensor) -> Tensor:
    """a_r·b_r for each row r of two (R, D) tensors, without an (R, D) temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _differentiable_backward(ctx, upstream):
    """The gradients as a differentiable graph: the reference's losses recomputed from the saved
    inputs, differentiated with ``create_graph=True``."""
    x, key, bank, tau, *_ = ctx.saved_tensors
    stream, queue = ctx.stream, ctx.queue
    check_queue_unchanged(queue, ctx.queue_version, "chunked")
    n = x.shape[0] // stream.views
    problem = Problem(
        loss=stream.loss,
        query=x.view(stream.views, n, -1),
        key=bank[stream.offset : stream.offset + n] if bank is not None else key,
        bank=bank,
        queue=queue,
        offset=stream.offset,
        temperature=ctx.temperature if tau is None else tau,
        target_temperature=ctx.target_temperature if needs_target(stream.loss) else None,
        coeff=ctx.coeff,
        symmetric=stream.symmetric,
    )
    inputs = (x, key, bank, None, tau, None, None, None)
    return reference.recomputed_gradients(problem, inputs, ctx.needs_input_grad, upstream)


def positive_columns(rows: int, n: int, offset: int, device) -> Tensor:
    """The bank column of each online row's positive, (rows,): offset + (r mod N)."""
    return offset + torch.arange(rows, device=device) % n


def masked_columns(
    n: int,
    *,
    views: int,
    offset: int,
    online_has_pos: bool,
    need_target: bool,
    symmetric: bool,
    device,
) -> Tensor:
    """Bank columns that are no candidate of each row of [online rows (V·N); target rows (N)],
    shape (rows, 2), −1 for none: the positive offset + i in the target rows (and in the online
    rows for ReSSL), and in the symmetric form each row's own embedding."""
    positive = offset + torch.arange(n, device=device)
    none = torch.full_like(positive, -1)
    own = own_columns(n, offset, device) if symmetric else none
    online = torch.stack([none if online_has_pos else positive, own], 1).repeat(views, 1)
    if not need_target:
        return online
    return torch.cat([online, torch.stack([positive, own], 1)])


class StreamBlock(NamedTuple):
    """Rows that the chunk loops multiply by a chunk at once, ``rows`` of the exponents: its
    ``online`` rows v·N + i, ``views`` crops of the ``samples`` i, and its ``target`` rows R + i
    of the same samples (an empty slice where it has none)."""

    rows: slice
    online: slice
    target: slice
    samples: slice
    views: int

    @property
    def has_online(self) -> bool:
        return self.online.start < self.online.stop

    @property
    def has_target(self) -> bool:
        return self.target.start < self.target.stop


def stream_blocks(online_rows: int, n: int, need_target: bool) -> list[StreamBlock]:
    """The blocks of at most ROW_BLOCK rows: every row in one where they fit; else the target
    rows first, then the online rows, whole crops at a time where N ≤ ROW_BLOCK (else a crop's
    rows in blocks, as the target rows are), so that each online block's samples are one target
    block's. Every pass multiplies a chunk by the same blocks, so a row's logits are bit for bit
    the same in each."""
    n = max(n, 1)
    rows = online_rows + n * need_target
    none = slice(0, 0)
    if rows <= ROW_BLOCK:
        target = slice(online_rows, rows) if need_target else none
        return [
            StreamBlock(
                slice(0, rows), slice(0, online_rows), target, slice(0, n), online_rows // n
            )
        ]
    step = min(n, ROW_BLOCK)
    crops = max(ROW_BLOCK // n, 1)  # per block
    blocks = []
    if need_target:
        for s in range(0, n, step):
            target = slice(online_rows + s, online_rows + min(s + step, n))
            blocks.append(StreamBlock(target, none, target, slice(s, min(s + step, n)), 1))
    for v in range(0, online_rows // n, crops):
        block_views = min(crops, online_rows // n - v)
        for s in range(0, n, step):
            e = min(s + step, n)
            online = slice(v * n + s, (v + block_views - 1) * n + e)
            blocks.append(StreamBlock(online, online, none, slice(s, e), block_views))
    return blocks


def _part(logits: Tensor, block: StreamBlock, rows: slice) -> Tensor:
    """The rows ``rows`` (online or target) of a block's ``logits``."""
    return logits[rows.start - block.rows.start : rows.stop - block.rows.start]


# The two chunk loops are PyTorch custom ops, which torch.compile runs as they are. Traced, a loop
# would be unrolled (compile time grows with M) and inductor would fuse the chunks' maxima into one
# kernel, so every chunk's logits would exist at once.


@torch.library.custom_op("sce_loss::chunked_stream", mutates_args=())
def stream_states(
    exponents: Tensor,
    bank: Tensor | None,
    queue: Tensor | None,
    masked: Tensor,
    positives: Tensor | None = None,
    picked_columns: Tensor | None = None,
    *,
    chunk_size: int,
    views: int,
    need_target: bool,
    vectors_from: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The running states of the rows of ``exponents`` (base-2 logits z = exponents·c; V·N online
    rows, then N target rows if ``need_target``) after every candidate, [bank; queue], a chunk
    at a time, without each row's ``masked`` bank columns: the loop of ``partial_stats_kernel``.
    For each row the maximum m and l = Σ 2^{z−m}; for the rows from ``vectors_from`` on, the
    candidate t of the maximum and O − l·t = Σ 2^{z−m}·(c − t), summed without t's own term, so
    that where the distribution is sharp on t its mean t + (O − l·t)/l keeps t's digits; for
    each online row r (if ``need_target``) the gap g = Σ_k 2^{b_k−m_b}·(m_a − a_k) of its target
    row b = R + (r mod N), terms ≥ 0 measured from the online maximum m_a (moved with it). With
    ``positives`` (queue mode), the first len(picked_columns) rows start from one more column,
    before the others: their positive ``positives[picked_columns[r]]``. Returns (m, l, O − l·t,
    t, picked, g): picked, for the first rows, the logit at column ``picked_columns[r]`` of
    ``positives``, or else of the bank (before masking), as a chunk's product of the row's block
    computed it (empty without ``picked_columns``)."""
    rows, dim = exponents.shape
    n = rows // (views + need_target)
    online_rows = views * n
    m = exponents.new_full((rows,), float("-inf"))
    l = exponents.new_zeros(rows)
    offsets = exponents.new_zeros(rows - vectors_from, dim)
    tops = exponents.new_zeros(rows - vectors_from, dim)
    picked = exponents.new_zeros(0 if picked_columns is None else len(picked_columns))
    gaps = exponents.new_zeros(online_rows if need_target else 0)
    blocks = stream_blocks(online_rows, n, need_target)
    # One chunk's logits: a block's at the front, and where the target rows have blocks of their
    # own, every target row's after them, which their online rows' gaps read.
    width = max(chunk_size, MIN_CHUNK)
    front = min(rows, ROW_BLOCK) * width
    separate = need_target and not blocks[0].has_online
    buffer = exponents.new_empty(front + (n * width if separate else 0))
    target = _TargetChunk({}, l.new_empty(n), l.new_empty(n))

    def kept(part: slice) -> slice:  # the part's rows that keep t and O
        return slice(max(part.start - vectors_from, 0), max(part.stop - vectors_from, 0))

    def picks(block: StreamBlock) -> slice:  # the block's first rows, online
        return slice(min(block.rows.start, len(picked)), min(block.rows.stop, len(picked)))

    def state(rows: slice) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # views, updated in place
        return m[rows], l[rows], offsets[kept(rows)], tops[kept(rows)]

    if positives is not None and picked_columns is not None:  # queue mode's first column
        for block in blocks:
            if not block.has_online:
                continue
            first = picks(block)
            for start in range(0, len(positives), chunk_size):
                c = positives[start : start + chunk_size].to(exponents.dtype)
                logits = _logits(exponents[block.rows], c, buffer)
                _pick(picked[first], logits, picked_columns[first] - start)
            m[first], l[first] = picked[first], 1.0
            vectors = kept(first)
            tops[vectors] = positives[
                picked_columns[vectors.start + vectors_from : vectors.stop + vectors_from]
            ]
    for candidates, in_bank in ((bank, True), (queue, False)):
        if candidates is None:
            continue
        for start in range(0, len(candidates), chunk_size):
            c = candidates[start : start + chunk_size].to(exponents.dtype)
            for block in blocks:  # the target rows before their online rows' gaps read them
                at = front + block.samples.start * width if not block.has_online else 0
                logits = _logits(exponents[block.rows], c, buffer[at:])
                masked_here = masked[block.rows] - start if in_bank else None
                if masked_here is not None:  # a chunk of the bank
                    if picked_columns is not None and positives is None:
                        first = picks(block)
                        _pick(picked[first], logits, picked_columns[first] - start)
                    _mask_columns(logits, masked_here)
                if block.has_target:
                    t = block.target
                    old_l = l[t].clone()
                    alpha = _online_update_(*state(t), _part(logits, block, t), c)
                    target.alpha[block.samples] = alpha
                    target.carry[block.samples] = old_l * alpha
                    target.probabilities[block.samples.start] = _part(logits, block, t)
                if block.has_online:
                    o = block.online
                    gap = None
                    if need_target:
                        online_masked = (
                            None if masked_here is None else _part(masked_here, block, o)
                        )
                        gap = _Gap(gaps[o], target, block.samples, block.views, online_masked)
                    _online_update_(*state(o), _part(logits, block, o), c, gap=gap)
    return m, l, offsets, tops, picked, gaps


class _TargetChunk(NamedTuple):
    """A chunk of the target rows, as their online rows' gaps need it: their 2^{b−m_b'} (m_b'
    their maximum after the chunk) by the first sample of each block, and α = 2^{m_b−m_b'} and
    l_b·α, their sums' rescaling and the sums before the chunk rescaled."""

    probabilities: dict
    alpha: Tensor
    carry: Tensor


class _Gap(NamedTuple):
    """An online block's gaps, with its target rows' chunk, its samples and crops, and its
    masked columns (or None)."""

    values: Tensor
    target: _TargetChunk
    samples: slice
    views: int
    masked: Tensor | None


def _finite(m: Tensor) -> Tensor:
    """The running maxima with 0 for the rows that have no column yet (−inf)."""
    return m.masked_fill(m == float("-inf"), 0.0)


def _logits(exponents: Tensor, c: Tensor, buffer: Tensor) -> Tensor:
    """exponents·cᵀ, written into the front of ``buffer`` (reused from chunk to chunk, with room
    for MIN_CHUNK columns). Fewer columns are computed as MIN_CHUNK, the others zero: BLAS
    rounds a narrow product differently, and a copy of a candidate in another chunk (a key and
    its copy in the queue) would not get its logit bit for bit."""
    columns, width = len(c), max(len(c), MIN_CHUNK)
    if columns < width:
        c = torch.cat([c, c.new_zeros(width - columns, c.shape[1])])
    product = torch.mm(exponents, c.T, out=buffer[: len(exponents) * width].view(-1, width))
    return product[:, :columns]


@stream_states.register_fake
def _(
    exponents,
    bank,
    queue,
    masked,
    positives=None,
    picked_columns=None,
    *,
    chunk_size,
    views,
    need_target,
    vectors_from=0,
):
    rows, dim = exponents.shape
    online_rows = views * (rows // (views + need_target))
    return (
        exponents.new_empty(rows),
        exponents.new_empty(rows),
        exponents.new_empty(rows - vectors_from, dim),
        exponents.new_empty(rows - vectors_from, dim),
        exponents.new_empty(0 if picked_columns is None else picked_columns.shape[0]),
        exponents.new_empty(online_rows if need_target else 0),
    )


def _pick(picked: Tensor, logits: Tensor, columns: Tensor) -> None:
    """picked[r] = logits[r, columns[r]] where that column lies in this chunk (0 ≤ column < width),
    in place; the first len(picked) rows of ``logits``."""
    width = logits.shape[1]
    inside = (columns >= 0) & (columns < width)
    values = logits[: len(picked)].gather(1, columns.clamp(0, width - 1)[:, None])[:, 0]
    picked.copy_(torch.where(inside, values, picked))


def _online_update_(
    m: Tensor,
    l: Tensor,
    offsets: Tensor,
    tops: Tensor,
    logits: Tensor,
    c: Tensor,
    gap: _Gap | None = None,
) -> Tensor:
    """One chunk of columns into the running states of base-2 logits z, in place, as the
    kernels' ``_online_update``: m' = max(m, max_k z_k), l' = l·2^{m−m'} + Σ_k 2^{z_k−m'}, and
    for the last len(tops) rows, with t' the candidate of m' (t where the maximum stays),
    O' − l'·t' = 2^{m−m'}·(O − l·t + l·(t − t')) + Σ_{k≠t'} 2^{z_k−m'}·(c_k − t'); the ``gap``
    (online rows) as ``_add_gaps_``. ``logits`` becomes 2^{z−m'}. Returns the rescaling
    2^{m−m'}."""
    if not len(tops):
        chunk_m = logits.amax(1)
    else:
        chunk_m, chunk_argmax = logits.max(1)
    new_m = torch.maximum(m, chunk_m)
    safe_m = _finite(new_m)
    alpha = torch.exp2(m - safe_m)
    if gap is None:
        p = logits.sub_(safe_m[:, None]).exp2_()
    else:  # the gaps read the rises m' − z before they become 2^{−(m' − z)}
        rise = logits.neg_().add_(safe_m[:, None])
        _add_gaps_(gap, rise, m, safe_m)
        p = rise.neg_().exp2_()
    if not len(tops):
        l.mul_(alpha).add_(p.sum(1))
        m.copy_(new_m)
        return alpha
    first = len(p) - len(tops)
    moved = (chunk_m > m)[first:]  # rows whose maximum is now in this chunk, at t' (2^0 = 1)
    at = chunk_argmax[first:, None]
    p_kept = p[first:]
    p_kept.scatter_(1, at, p_kept.gather(1, at).masked_fill_(moved[:, None], 0.0))  # t' apart
    sums = p.sum(1)
    new_tops = torch.where(moved[:, None], c[at[:, 0]], tops)
    offsets.addcmul_(l[first:, None], tops - new_tops)
    offsets.mul_(alpha[first:, None]).addmm_(p_kept, c).sub_(sums[first:, None] * new_tops)
    tops.copy_(new_tops)
    p_kept.scatter_(1, at, p_kept.gather(1, at).masked_fill_(moved[:, None], 1.0))  # t' back
    sums[first:] += moved
    l.mul_(alpha).add_(sums)
    m.copy_(new_m)
    return alpha


def _add_gaps_(gap: _Gap, rise: Tensor, m: Tensor, new_m: Tensor) -> None:
    """The chunk into the online rows' gaps g = Σ_k 2^{b_k−m_b}·(m_a − a_k), in place, from the
    rises m_a' − a_k of the chunk's logits (+inf at the masked columns, as they are left):
    g' = α·g + l_b·α·(m_a' − m_a) + Σ_k 2^{b_k−m_b'}·(m_a' − a_k), with the target rows'
    α = 2^{m_b−m_b'} and l_b before the chunk. Every term is ≥ 0 (m_a' is the maximum); the
    masked columns (weight 0) are left out. ``new_m`` is m_a' (0 for rows with no column yet)."""
    target, samples, views = gap.target, gap.samples, gap.views
    if gap.masked is not None:
        _mask_columns(rise, gap.masked, value=0.0)
    probabilities = target.probabilities[samples.start]
    crops = rise.unflatten(0, (views, -1))
    in_chunk = torch.cat([torch.linalg.vecdot(crop, probabilities) for crop in crops])
    if gap.masked is not None:
        _mask_columns(rise, gap.masked, value=float("inf"))
    moved = torch.where(m == float("-inf"), 0.0, new_m - m)  # l_b is 0 where m_a is −inf
    gap.values.mul_(target.alpha[samples].repeat(views))
    gap.values.add_(target.carry[samples].repeat(views) * moved).add_(in_chunk)


def _mask_columns(logits: Tensor, columns: Tensor, value: float = float("-inf")) -> None:
    """Set logits[r, columns[r, j]] to ``value`` (−inf by default) for every j where that column
    lies in this chunk (0 ≤ column < width; −1 and other columns are left alone), in place."""
    width = logits.shape[1]
    for column in columns.unbind(1):
        index = column.clamp(0, width - 1)[:, None]
        inside = ((column >= 0) & (column < width))[:, None]
        logits.scatter_(1, index, torch.where(inside, value, logits.gather(1, index)))


def bank_gradient(
    exponents,
    maxima,
    sums,
    upstream,
    bank,
    *,
    masked,
    views,
    offset,
    coeff,
    need_target,
    chunk_size,
    positive_weight=None,
) -> Tensor:
    """dL/dc_k = Σ_r g_r (P_rk − w_rk) x_r / τ for the bank's columns, with P_rk = e^{a_rk − LSE_a}
    and w_rk = λ·[k = pos] + (1−λ)·e^{b_rk − LSE_b} (k ≠ pos), as 2^{z − m}/l from each row's
    base-2 ``maxima`` m and ``sums`` l, the forward's (their sum m + log2 l = LSE·log2 e would be
    rounded to the ulp of m, 1e-4 at τ = 1e-3, and P by as much). ``positive_weight``, required
    for InfoNCE and SCE (whose online rows have the positive), is the weight at each online row's
    positive column: the forward's P_r,pos − λ, from the product the row's maximum came from. The
    weights P − w of a chunk are summed before its product, as the reference's softmax − target
    is: where P and w both round to 1, their difference is 0, not the rounding of x/τ (large at
    small τ) minus itself."""
    r = upstream.shape[0]
    online = upstream * LN_2  # x_r/τ = exponents_r·ln 2: row r's weight on exponents_r
    return bank_products(
        exponents,
        maxima,
        sums.reciprocal(),
        online,
        -(1 - coeff) * online if need_target else None,
        None if positive_weight is None else positive_weight * online,
        bank,
        masked[:r] if positive_weight is None else _with_positive(masked[:r], offset, views),
        masked[r:],
        chunk_size=chunk_size,
        views=views,
        offset=offset,
    )


def _with_positive(masked: Tensor, offset: int, views: int) -> Tensor:
    """The online rows' masked columns with each row's positive column added, (R, 3)."""
    rows = masked.shape[0]
    positive = positive_columns(rows, rows // views, offset, masked.device)
    return torch.cat([masked, positive[:, None]], 1)


def _put(weights: Tensor, values: Tensor, columns: Tensor) -> None:
    """weights[r, columns[r]] = values[r] where that column lies in this chunk, in place."""
    width = weights.shape[1]
    inside = ((columns >= 0) & (columns < width))[:, None]
    index = columns.clamp(0, width - 1)[:, None]
    weights.scatter_(1, index, torch.where(inside, values[:, None], weights.gather(1, index)))


@torch.library.custom_op("sce_loss::chunked_bank_products", mutates_args=())
def bank_products(
    exponents: Tensor,
    maxima: Tensor,
    inverse_sums: Tensor,
    online_weights: Tensor,
    target_weights: Tensor | None,
    positive_weights: Tensor | None,
    bank: Tensor,
    online_masked: Tensor,
    target_masked: Tensor,
    *,
    chunk_size: int,
    views: int,
    offset: int,
) -> Tensor:
    """Σ_r W_rk·x_r for each bank column k, a chunk of columns at a time (``key_gradient_kernel``'s
    loop), x_r the first R = len(online_weights) rows of ``exponents`` and, with z = exponents·c_k
    computed in the forward's row blocks (so bit for bit the forward's logits) and
    p = 2^{z − maxima}·inverse_sums (``*_masked`` columns left out):
    W_rk = online_weights_r·p_rk + target_weights_r·p_(R + r mod N),k, and at row r's positive
    column offset + (r mod N) the given ``positive_weights_r`` instead (None: no such column)."""
    r = len(online_weights)
    n = r // views
    grad = exponents.new_zeros(bank.shape)
    buffer = exponents.new_empty(min(len(exponents), ROW_BLOCK) * max(chunk_size, MIN_CHUNK))
    weights = exponents.new_empty(r * chunk_size)  # W of one chunk
    # The forward's blocks, those with online rows first: their targets' weights add to theirs.
    blocks = sorted(stream_blocks(r, n, target_weights is not None), key=lambda b: not b.has_online)
    for start in range(0, len(bank), chunk_size):
        c = bank[start : start + chunk_size]
        w = weights[: r * len(c)].view(r, len(c))
        for block in blocks:
            p = _logits(exponents[block.rows], c, buffer)
            o, t = block.online, block.target
            if block.has_online:
                _mask_columns(_part(p, block, o), online_masked[o] - start)
            if block.has_target:
                _mask_columns(_part(p, block, t), target_masked[t.start - r : t.stop - r] - start)
            p.sub_(maxima[block.rows, None]).exp2_().mul_(inverse_sums[block.rows, None])
            if block.has_online:
                w[o] = _part(p, block, o) * online_weights[o, None]
            if block.has_target:
                assert target_weights is not None  # target rows come with their weights
                for v in range(views):  # the targets of samples i: every crop's row of i
                    crop = slice(v * n + block.samples.start, v * n + block.samples.stop)
                    w[crop].addcmul_(_part(p, block, t), target_weights[crop, None])
        if positive_weights is not None:
            _put(w, positive_weights, positive_columns(r, n, offset, w.device) - start)
        grad[start : start + len(c)].addmm_(w.T, exponents[:r])
    return grad


@bank_products.register_fake
def _(
    exponents,
    maxima,
    inverse_sums,
    online_weights,
    target_weights,
    positive_weights,
    bank,
    *_,
    **__,
):
    return exponents.new_empty(bank.shape)
