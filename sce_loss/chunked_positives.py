"""InfoNCE with a set of positives per row, streamed: :func:`sce_loss.reference.info_nce_positives`
without a rows × candidates tensor beyond one chunk, on any device.

Each row r has logits a_rk = x_r·c_k / τ over the candidates c_k (less its own column, masked per
chunk), and positives P(r): the candidates of its label. "mean" needs no per-chunk mask: Σ_P a,
|P| and the gradients' −1_P/|P| part come from per-class sums of the candidates and of the rows
(so do "decoupled"'s, scaled by the row's weight w). "pooled", "pairs" and "decoupled" recompute P
per chunk from label ids (the row's label against the chunk's).
The forward pass keeps per-row statistics only: the log-sum-exp over all candidates (LSE), over
the positives (LSE_P), over the negatives (LSE_N), Σ_P a and |P|; "pairs" makes a second pass for
Σ_p softplus(LSE_N − a_p) and G_N = Σ_p σ(LSE_N − a_p). The backward recomputes each chunk's
logits and its weights W_rk = ∂loss_r/∂a_rk,

  mean       W = softmax(a) − 1_P/|P|
  pooled     W = softmax(a) − 1_P·softmax_P(a)
  pairs      W = −1_P·σ(LSE_N − a) + 1_N·G_N·softmax_N(a)
  decoupled  W = 1_N·softmax_N(a) − w·1_P/|P|

and from them dL/dx_r = Σ_k g_r W_rk c_k/τ, dL/dc_k = Σ_r g_r W_rk x_r/τ and
dL/dτ = −Σ_r (x_r/τ)·dL/dx_r. The two chunk loops are custom ops (torch.compile runs them as they
are). A differentiated backward (create_graph=True) recomputes through the reference.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference
from .chunked import ROW_BLOCK, _mask_columns, chunk_columns
from .problem import differentiating_backward

NEG_INF = float("-inf")


def info_nce_positives(
    rows: Tensor,
    candidates: Tensor,
    *,
    row_labels: Tensor,
    candidate_labels: Tensor,
    own: Tensor | None,
    temperature,
    positives: str,
    positive_weight: Tensor | None = None,
    paired: Tensor | None = None,
    private: int = 0,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """As :func:`sce_loss.reference.info_nce_positives` (per-row losses and numbers of terms),
    streamed over ``chunk_size`` candidates at a time."""
    chunk = chunk_size or chunk_columns(rows.shape[0])
    tau = temperature if isinstance(temperature, Tensor) else None
    own_columns = torch.full_like(row_labels, -1) if own is None else own
    # 1·τ rather than torch.tensor(τ): a scheduled float stays symbolic under torch.compile.
    constant = torch.ones((), dtype=rows.dtype, device=rows.device) * temperature
    weight = torch.ones_like(rows[:, 0]) if positive_weight is None else positive_weight
    per_row, counts = _StreamingPositives.apply(
        rows,
        # An alias: rows and candidates are often one tensor (the symmetric form), which
        # torch.compile cannot pass to two inputs of an autograd.Function.
        candidates.view_as(candidates),
        tau if tau is not None else constant,
        row_labels,
        candidate_labels,
        own_columns,
        torch.full_like(row_labels, -1) if paired is None else paired,
        weight,
        positives,
        chunk,
        private,
        tau is None,
    )
    terms = counts if positives == "pairs" else (counts > 0).to(counts.dtype)
    return per_row, terms


class _StreamingPositives(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x,
        c,
        tau,
        row_labels,
        candidate_labels,
        own,
        paired,
        weight,
        positives,
        chunk,
        private,
        tau_const,
    ):
        tau_value = tau.to(x.dtype)
        stats = positive_stats(
            x,
            c,
            tau_value,
            row_labels,
            candidate_labels,
            own,
            paired,
            weight,
            positives=positives,
            chunk=chunk,
            private=private,
        )
        lse, lse_p, lse_n, sum_p, count, g_n, loss = stats
        ctx.save_for_backward(x, c, tau, row_labels, candidate_labels, own, paired, weight, *stats)
        ctx.positives, ctx.chunk, ctx.private, ctx.tau_const = positives, chunk, private, tau_const
        ctx.mark_non_differentiable(count)
        return loss, count

    @staticmethod
    def backward(ctx, upstream, _):
        x, c, tau, row_labels, candidate_labels, own, paired, weight, *stats = ctx.saved_tensors
        need_x, need_c, need_tau = ctx.needs_input_grad[:3]
        if differentiating_backward():
            return _differentiable_backward(ctx, upstream)
        grad_x, grad_c, grad_tau = positive_gradients(
            x,
            c,
            tau.to(x.dtype),
            row_labels,
            candidate_labels,
            own,
            paired,
            weight,
            upstream.to(x.dtype),
            *stats[:3],
            stats[4],
            stats[5],
            positives=ctx.positives,
            chunk=ctx.chunk,
            private=ctx.private,
        )
        return (
            grad_x if need_x else None,
            grad_c if need_c else None,
            grad_tau.to(tau.dtype) if need_tau and not ctx.tau_const else None,
            *(None,) * 10,
        )


def _differentiable_backward(ctx, upstream):
    """The gradients as a differentiable graph, through the reference's losses."""
    x, c, tau, row_labels, candidate_labels, own, paired, weight, *_ = ctx.saved_tensors
    with torch.enable_grad():
        # Aliases, so that rows and candidates (often one tensor) get their own partials.
        x, c = x.view_as(x), c.view_as(c)
        wanted = [t for t, need in zip((x, c, tau), ctx.needs_input_grad[:3]) if need]
        per_row, _ = reference.info_nce_positives(
            x,
            c,
            row_labels=row_labels,
            candidate_labels=candidate_labels,
            own=None if bool((own < 0).all()) else own,
            temperature=tau,
            positives=ctx.positives,
            positive_weight=weight,
            paired=paired if ctx.private else None,
            private=ctx.private,
        )
        grads = iter(torch.autograd.grad(per_row, wanted, upstream, create_graph=True))
    return (*(next(grads) if need else None for need in ctx.needs_input_grad[:3]), *(None,) * 10)


def _class_ids(row_labels: Tensor, candidate_labels: Tensor) -> tuple[Tensor, Tensor, int]:
    """Labels as ids 0..C−1 shared by rows and candidates (for sums over a class), and C."""
    ids = torch.unique(torch.cat([row_labels, candidate_labels]), return_inverse=True)[1]
    return ids[: len(row_labels)], ids[len(row_labels) :], int(ids.max()) + 1


def _positive_sums(c, row_ids, candidate_ids, classes, own, paired, private):
    """Σ_{p∈P(r)} c_p and |P(r)| per row, from per-class sums: less the row's own column; of the
    first ``private`` columns, only the row's ``paired`` one."""
    shared, shared_ids = c[private:], candidate_ids[private:]
    class_sum = c.new_zeros(classes, c.shape[1]).index_add_(0, shared_ids, shared)
    class_count = torch.bincount(shared_ids, minlength=classes)
    has_own = own >= 0
    own_rows = c[own.clamp(min=0)] * has_own[:, None]
    sums, counts = class_sum[row_ids] - own_rows, class_count[row_ids] - has_own.long()
    if private:
        match = candidate_ids[paired] == row_ids
        sums, counts = sums + c[paired] * match[:, None], counts + match.long()
    return sums, counts


def _hidden(paired, private, start, width):
    """Within a chunk, the first ``private`` columns other than each row's ``paired`` one (no
    candidate of the row), as a (rows, w) mask of the chunk's first w columns; None if none."""
    width = min(width, private - start)
    if width <= 0:
        return None
    columns = torch.arange(start, start + width, device=paired.device)
    return columns[None, :] != paired[:, None]


def _masked_logits(scaled, block, own, start, paired, private):
    """(x/τ)·blockᵀ with each row's non-candidates in this chunk (its own column; the other
    rows' private columns) at −inf."""
    logits = scaled @ block.T
    _mask_columns(logits, (own - start)[:, None].masked_fill(own[:, None] < 0, -1))
    hidden = _hidden(paired, private, start, len(block))
    if hidden is not None:
        logits[:, : hidden.shape[1]].masked_fill_(hidden, NEG_INF)
    return logits


def _chunk_positives(row_labels, candidate_labels, own, start, width, paired, private):
    """P(r) within a chunk of columns: the candidates of the row's label, less its own column
    and the other rows' private columns."""
    positive = row_labels[:, None] == candidate_labels[None, start : start + width]
    inside = (own >= start) & (own < start + width)
    rows = inside.nonzero()[:, 0]
    positive[rows, own[rows] - start] = False
    hidden = _hidden(paired, private, start, width)
    if hidden is not None:
        positive[:, : hidden.shape[1]] &= ~hidden
    return positive


def _row_blocks(rows: int) -> list[slice]:
    """The rows in blocks of at most ``ROW_BLOCK``: each chunk's tiles are a block × chunk."""
    return [slice(start, start + ROW_BLOCK) for start in range(0, max(rows, 1), ROW_BLOCK)]


def _sum_row_blocks(gradients, rows: int) -> tuple[Tensor, Tensor, Tensor]:
    """(dL/dx, dL/dc, dL/dτ) of every row block: the blocks' dL/dx side by side, the rest summed."""
    grad_x, grad_c, grad_tau = zip(*(gradients(b) for b in _row_blocks(rows)))
    return torch.cat(grad_x), sum(grad_c[1:], grad_c[0]), sum(grad_tau[1:], grad_tau[0])


def _merge(m: Tensor, l: Tensor, logits: Tensor) -> tuple[Tensor, Tensor]:
    """Running (max, Σ e^{a−max}) merged with this chunk's logits (−inf: left out)."""
    new_m = torch.maximum(m, logits.amax(1))
    safe = new_m.masked_fill(new_m == NEG_INF, 0.0)
    l = l * torch.exp(m - safe) + torch.exp(logits - safe[:, None]).sum(1)
    return new_m, l


def _lse(m: Tensor, l: Tensor) -> Tensor:
    return torch.where(l > 0, m + torch.log(l), NEG_INF)


def _positive_stats(
    x: Tensor,
    c: Tensor,
    tau: Tensor,
    row_labels: Tensor,
    candidate_labels: Tensor,
    own: Tensor,
    paired: Tensor,
    weight: Tensor,
    *,
    positives: str,
    chunk: int,
    private: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-row (LSE, LSE_P, LSE_N, Σ_P a, |P|, G_N, loss), chunk by chunk. "mean" needs only LSE
    (Σ_P a and |P| come from per-class sums); "pooled" and "pairs" LSE_P and LSE_N, whose
    log-add-exp is LSE; "decoupled" LSE_N, and its rows' ``weight`` w."""
    r = len(x)
    row_ids, candidate_ids, classes = _class_ids(row_labels, candidate_labels)
    sum_pc, count = _positive_sums(c, row_ids, candidate_ids, classes, own, paired, private)
    scaled = x / tau  # x/τ: logits = scaled·cᵀ
    sum_p = (scaled * sum_pc).sum(1)
    stats_p = (x.new_full((r,), NEG_INF), x.new_zeros(r))
    stats_n = (x.new_full((r,), NEG_INF), x.new_zeros(r))
    for start in range(0, len(c), chunk):
        block = c[start : start + chunk]
        logits = _masked_logits(scaled, block, own, start, paired, private)
        if positives == "mean":
            stats_n = _merge(*stats_n, logits)  # every candidate: LSE
            continue
        positive = _chunk_positives(
            row_labels, candidate_labels, own, start, len(block), paired, private
        )
        if positives != "decoupled":  # which needs the negatives' only
            stats_p = _merge(*stats_p, logits.masked_fill(~positive, NEG_INF))
        stats_n = _merge(*stats_n, logits.masked_fill_(positive, NEG_INF))
    if positives == "mean":
        lse = _lse(*stats_n)
        lse_p, lse_n = torch.full_like(lse, NEG_INF), torch.full_like(lse, NEG_INF)
    else:
        lse_p, lse_n = _lse(*stats_p), _lse(*stats_n)
        lse = torch.logaddexp(lse_p, lse_n)
    g_n = x.new_zeros(r)
    if positives == "mean":  # LSE ≥ any mean of its logits: below 0 is rounding
        loss = (lse - sum_p / count.clamp(min=1)).clamp(min=0)
    elif positives == "pooled":
        loss = (lse - lse_p).clamp(min=0)
    elif positives == "decoupled":  # 0 for a row with no negative
        loss = torch.where(lse_n > NEG_INF, lse_n - weight * sum_p / count.clamp(min=1), 0.0)
    else:  # Σ_p softplus(LSE_N − a_p): a second pass over the positives
        loss = x.new_zeros(r)
        for start in range(0, len(c), chunk):
            block = c[start : start + chunk]
            positive = _chunk_positives(
                row_labels, candidate_labels, own, start, len(block), paired, private
            )
            gap = (lse_n[:, None] - scaled @ block.T).masked_fill_(~positive, NEG_INF)
            loss = loss + torch.nn.functional.softplus(gap).sum(1)
            g_n = g_n + torch.sigmoid(gap).sum(1)
    loss = torch.where(count > 0, loss, torch.zeros_like(loss))
    return lse, lse_p, lse_n, sum_p, count, g_n, loss


@torch.library.custom_op("sce_loss::positive_stats", mutates_args=())
def positive_stats(
    x: Tensor,
    c: Tensor,
    tau: Tensor,
    row_labels: Tensor,
    candidate_labels: Tensor,
    own: Tensor,
    paired: Tensor,
    weight: Tensor,
    *,
    positives: str,
    chunk: int,
    private: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`_positive_stats` over blocks of at most ``ROW_BLOCK`` rows."""
    blocks = [
        _positive_stats(
            x[b],
            c,
            tau,
            row_labels[b],
            candidate_labels,
            own[b],
            paired[b],
            weight[b],
            positives=positives,
            chunk=chunk,
            private=private,
        )  # fmt: skip
        for b in _row_blocks(len(x))
    ]
    return tuple(torch.cat(parts) for parts in zip(*blocks))  # type: ignore[return-value]


@positive_stats.register_fake
def _(x, c, tau, row_labels, candidate_labels, own, paired, weight, *, positives, chunk, private):
    r = x.shape[0]
    return (
        *(x.new_empty(r) for _ in range(4)),
        torch.empty(r, dtype=torch.int64, device=x.device),
        x.new_empty(r),
        x.new_empty(r),
    )


def _positive_gradients(
    x: Tensor,
    c: Tensor,
    tau: Tensor,
    row_labels: Tensor,
    candidate_labels: Tensor,
    own: Tensor,
    paired: Tensor,
    weight: Tensor,
    upstream: Tensor,
    lse: Tensor,
    lse_p: Tensor,
    lse_n: Tensor,
    count: Tensor,
    g_n: Tensor,
    *,
    positives: str,
    chunk: int,
    private: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """dL/dx, dL/dc and dL/dτ of Σ_r upstream_r·loss_r, from each chunk's weights W (module
    docstring) recomputed from the saved statistics; "mean"'s −1_P/|P| part from per-class
    sums."""
    g = torch.where(count > 0, upstream, torch.zeros_like(upstream))  # rows with no positive: 0
    if positives == "decoupled":  # rows with no negative: 0
        g = torch.where(lse_n > NEG_INF, g, torch.zeros_like(g))
    grad_x, grad_c = torch.zeros_like(x), torch.zeros_like(c)
    scaled = x / tau  # x/τ: logits = scaled·cᵀ
    if positives in ("mean", "decoupled"):
        row_ids, candidate_ids, classes = _class_ids(row_labels, candidate_labels)
        sum_pc, _ = _positive_sums(c, row_ids, candidate_ids, classes, own, paired, private)
        share = g / count.clamp(min=1)  # g_r/|P_r| (times w_r, decoupled)
        if positives == "decoupled":
            share = share * weight
        grad_x -= share[:, None] * sum_pc
        # dc_k −= Σ_{r: k ∈ P(r)} g_r/|P_r|·x_r/τ: the rows' class sums, less each own column's.
        pulled = (share[:, None] * scaled).to(c.dtype)
        class_sum = c.new_zeros(classes, c.shape[1]).index_add_(0, row_ids, pulled)
        grad_c[private:] -= class_sum[candidate_ids[private:]]
        has_own = own >= 0
        grad_c.index_add_(0, own[has_own], pulled[has_own])
        if private:  # a private column is a positive of its paired rows only
            match = (candidate_ids[paired] == row_ids)[:, None]
            grad_c.index_add_(0, paired, -pulled * match)
    for start in range(0, len(c), chunk):
        block = c[start : start + chunk]
        logits = _masked_logits(scaled, block, own, start, paired, private)
        weights = torch.exp(logits - _finite(lse)[:, None])  # softmax: 0 at the own column
        if positives == "decoupled":
            positive = _chunk_positives(
                row_labels, candidate_labels, own, start, len(block), paired, private
            )
            weights = torch.exp(logits - _finite(lse_n)[:, None]).masked_fill_(positive, 0.0)
        elif positives == "pooled":
            positive = _chunk_positives(
                row_labels, candidate_labels, own, start, len(block), paired, private
            )
            weights -= torch.exp(logits - _finite(lse_p)[:, None]).masked_fill_(~positive, 0.0)
        elif positives == "pairs":
            positive = _chunk_positives(
                row_labels, candidate_labels, own, start, len(block), paired, private
            )
            negatives = torch.exp(logits - _finite(lse_n)[:, None]).masked_fill_(positive, 0.0)
            pairs = torch.sigmoid(lse_n[:, None] - logits).masked_fill_(~positive, 0.0)
            weights = g_n[:, None] * negatives - pairs
        weights *= g[:, None]
        grad_x += weights @ block
        grad_c[start : start + chunk] += weights.T @ scaled
    grad_x /= tau
    # a = x·c/τ, so dL/dτ = Σ W·(−a/τ) = −Σ_r (x_r/τ)·dL/dx_r.
    return grad_x, grad_c, -(scaled * grad_x).sum()


def _finite(lse: Tensor) -> Tensor:
    """A log-sum-exp with −inf (a row with no positive, or no negative) as 0: its weights are
    masked out anyway."""
    return lse.masked_fill(lse == NEG_INF, 0.0)


@torch.library.custom_op("sce_loss::positive_gradients", mutates_args=())
def positive_gradients(
    x: Tensor,
    c: Tensor,
    tau: Tensor,
    row_labels: Tensor,
    candidate_labels: Tensor,
    own: Tensor,
    paired: Tensor,
    weight: Tensor,
    upstream: Tensor,
    lse: Tensor,
    lse_p: Tensor,
    lse_n: Tensor,
    count: Tensor,
    g_n: Tensor,
    *,
    positives: str,
    chunk: int,
    private: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_positive_gradients` over blocks of at most ``ROW_BLOCK`` rows."""
    return _sum_row_blocks(
        lambda b: _positive_gradients(
            x[b],
            c,
            tau,
            row_labels[b],
            candidate_labels,
            own[b],
            paired[b],
            weight[b],
            upstream[b],
            lse[b],
            lse_p[b],
            lse_n[b],
            count[b],
            g_n[b],
            positives=positives,
            chunk=chunk,
            private=private,
        ),  # fmt: skip
        len(x),
    )


@positive_gradients.register_fake
def _(x, c, tau, *_, positives, chunk, private):
    return torch.empty_like(x), torch.empty_like(c), x.new_empty(())


def soft_positives(
    rows: Tensor,
    candidates: Tensor,
    *,
    row_labels: Tensor,
    candidate_labels: Tensor,
    own: Tensor | None,
    temperature,
    target_temperature,
    coeff,
    loss: str,
    paired: Tensor | None = None,
    private: int = 0,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """As :func:`sce_loss.reference.soft_positives` (SCE or ReSSL with a set of positives per
    row: per-row losses and numbers of terms), streamed over ``chunk_size`` candidates at a time.

    The target rows t_r come from per-class sums of the candidates; per chunk, the forward keeps
    the running LSE of a (over every candidate for SCE, the negatives for ReSSL), of b = t·c/τ_m
    over the negatives, and u = Σ_N e^{b − max} a, so that Σ_N s²·a = u / Σ_N e^{b − max}:

      sce    loss = λ·(LSE − Σ_P a/|P|) + (1 − λ)·(LSE − Σ_N s²·a)
      ressl  loss = LSE_N − Σ_N s²·a

    (the (1 − λ) part, and ReSSL's loss, 0 for a row with no negative). The backward recomputes
    each chunk's W = ∂loss/∂a: SCE's (λ + (1 − λ)·[N ≠ ∅])·softmax(a) − λ·1_P/|P| − (1 − λ)·s²,
    ReSSL's [N ≠ ∅]·(1_N·softmax_N(a) − s²), and from it the gradients as in the module docstring.
    """
    chunk = chunk_size or chunk_columns(rows.shape[0])
    tau = temperature if isinstance(temperature, Tensor) else None
    one = torch.ones((), dtype=rows.dtype, device=rows.device)
    per_row, counts = _StreamingSoftPositives.apply(
        rows,
        candidates.view_as(candidates),  # an alias, as in info_nce_positives
        tau if tau is not None else one * temperature,
        (one * target_temperature).detach(),
        (one * coeff).detach(),
        row_labels,
        candidate_labels,
        torch.full_like(row_labels, -1) if own is None else own,
        torch.full_like(row_labels, -1) if paired is None else paired,
        loss,
        chunk,
        private,
        tau is None,
    )
    return per_row, (counts > 0).to(counts.dtype)


class _StreamingSoftPositives(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x,
        c,
        tau,
        target_tau,
        coeff,
        row_labels,
        candidate_labels,
        own,
        paired,
        loss,
        chunk,
        private,
        tau_const,
    ):
        lse, lse_b, count, per_row = soft_stats(
            x,
            c,
            tau.to(x.dtype),
            target_tau.to(x.dtype),
            coeff.to(x.dtype),
            row_labels,
            candidate_labels,
            own,
            paired,
            loss=loss,
            chunk=chunk,
            private=private,
        )
        ctx.save_for_backward(
            x,
            c,
            tau,
            target_tau,
            coeff,
            row_labels,
            candidate_labels,
            own,
            paired,
            lse,
            lse_b,
            count,
        )
        ctx.loss, ctx.chunk, ctx.private, ctx.tau_const = loss, chunk, private, tau_const
        ctx.mark_non_differentiable(count)
        return per_row, count

    @staticmethod
    def backward(ctx, upstream, _):
        x, c, tau, target_tau, coeff, row_labels, candidate_labels, own, paired, *stats = (
            ctx.saved_tensors
        )
        need_x, need_c, need_tau = ctx.needs_input_grad[:3]
        if differentiating_backward():
            with torch.enable_grad():
                x, c = x.view_as(x), c.view_as(c)  # aliases: their own partials
                wanted = [t for t, need in zip((x, c, tau), ctx.needs_input_grad[:3]) if need]
                per_row, _ = reference.soft_positives(
                    x,
                    c,
                    row_labels=row_labels,
                    candidate_labels=candidate_labels,
                    own=None if bool((own < 0).all()) else own,
                    temperature=tau,
                    target_temperature=target_tau,
                    coeff=coeff,
                    loss=ctx.loss,
                    paired=paired if ctx.private else None,
                    private=ctx.private,
                )
                grads = iter(torch.autograd.grad(per_row, wanted, upstream, create_graph=True))
            return (*(next(grads) if n else None for n in ctx.needs_input_grad[:3]), *(None,) * 11)
        grad_x, grad_c, grad_tau = soft_gradients(
            x,
            c,
            tau.to(x.dtype),
            target_tau.to(x.dtype),
            coeff.to(x.dtype),
            row_labels,
            candidate_labels,
            own,
            paired,
            upstream.to(x.dtype),
            *stats,
            loss=ctx.loss,
            chunk=ctx.chunk,
            private=ctx.private,
        )
        return (
            grad_x if need_x else None,
            grad_c if need_c else None,
            grad_tau.to(tau.dtype) if need_tau and not ctx.tau_const else None,
            *(None,) * 11,
        )


def _target_rows(
    c, row_labels, candidate_labels, own, paired, private, target_tau
) -> tuple[Tensor, Tensor]:
    """t_r/τ_m, t_r = the mean of the row's positives (per-class sums), and |P(r)|."""
    row_ids, candidate_ids, classes = _class_ids(row_labels, candidate_labels)
    sum_pc, count = _positive_sums(c, row_ids, candidate_ids, classes, own, paired, private)
    return sum_pc / (count.clamp(min=1)[:, None] * target_tau), count


def _chunk_logits(scaled, target, block, row_labels, candidate_labels, own, start, paired, private):
    """A chunk's logits a (own column −inf), its positives, and b = t·c/τ_m over its negatives
    (−inf elsewhere)."""
    logits = _masked_logits(scaled, block, own, start, paired, private)
    positive = _chunk_positives(
        row_labels, candidate_labels, own, start, len(block), paired, private
    )
    target_logits = _masked_logits(target, block, own, start, paired, private)
    target_logits.masked_fill_(positive, NEG_INF)
    return logits, positive, target_logits


def _soft_stats(
    x: Tensor,
    c: Tensor,
    tau: Tensor,
    target_tau: Tensor,
    coeff: Tensor,
    row_labels: Tensor,
    candidate_labels: Tensor,
    own: Tensor,
    paired: Tensor,
    *,
    loss: str,
    chunk: int,
    private: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-row (LSE of a, LSE_N of b, |P|, loss), chunk by chunk (:func:`soft_positives`)."""
    r = len(x)
    target, count = _target_rows(c, row_labels, candidate_labels, own, paired, private, target_tau)
    scaled = x / tau
    stats_a = (x.new_full((r,), NEG_INF), x.new_zeros(r))
    m_b, l_b, u = x.new_full((r,), NEG_INF), x.new_zeros(r), x.new_zeros(r)
    for start in range(0, len(c), chunk):
        block = c[start : start + chunk]
        logits, positive, target_logits = _chunk_logits(
            scaled, target, block, row_labels, candidate_labels, own, start, paired, private
        )
        if loss == "ressl":
            stats_a = _merge(*stats_a, logits.masked_fill(positive, NEG_INF))
        else:
            stats_a = _merge(*stats_a, logits)
        new_m = torch.maximum(m_b, target_logits.amax(1))
        safe = new_m.masked_fill(new_m == NEG_INF, 0.0)
        rescale = torch.exp(m_b - safe)
        e = torch.exp(target_logits - safe[:, None])  # 0 off the negatives
        m_b, l_b = new_m, l_b * rescale + e.sum(1)
        u = u * rescale + (e * logits.masked_fill(e == 0, 0.0)).sum(1)
    has_negative = l_b > 0
    expected = torch.where(has_negative, u / l_b.masked_fill(~has_negative, 1.0), 0.0)
    lse = _lse(*stats_a)
    # Each part is an LSE less a weighted mean of its logits, ≥ 0: below 0 is rounding.
    soft = torch.where(has_negative, lse - expected, 0.0).clamp(min=0)
    if loss == "ressl":
        per_row = soft
    else:
        sum_p = (scaled * target).sum(1) * target_tau  # Σ_P a / |P| = (x/τ)·t
        per_row = coeff * (lse - sum_p).clamp(min=0) + (1 - coeff) * soft
    per_row = torch.where(count > 0, per_row, torch.zeros_like(per_row))
    return lse, _lse(m_b, l_b), count, per_row


@torch.library.custom_op("sce_loss::soft_stats", mutates_args=())
def soft_stats(
    x: Tensor,
    c: Tensor,
    tau: Tensor,
    target_tau: Tensor,
    coeff: Tensor,
    row_labels: Tensor,
    candidate_labels: Tensor,
    own: Tensor,
    paired: Tensor,
    *,
    loss: str,
    chunk: int,
    private: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`_soft_stats` over blocks of at most ``ROW_BLOCK`` rows."""
    blocks = [
        _soft_stats(
            x[b],
            c,
            tau,
            target_tau,
            coeff,
            row_labels[b],
            candidate_labels,
            own[b],
            paired[b],
            loss=loss,
            chunk=chunk,
            private=private,
        )  # fmt: skip
        for b in _row_blocks(len(x))
    ]
    return tuple(torch.cat(parts) for parts in zip(*blocks))  # type: ignore[return-value]


@soft_stats.register_fake
def _(
    x, c, tau, target_tau, coeff, row_labels, candidate_labels, own, paired, *, loss, chunk, private
):
    r = x.shape[0]
    count = torch.empty(r, dtype=torch.int64, device=x.device)
    return x.new_empty(r), x.new_empty(r), count, x.new_empty(r)


def _soft_gradients(
    x: Tensor,
    c: Tensor,
    tau: Tensor,
    target_tau: Tensor,
    coeff: Tensor,
    row_labels: Tensor,
    candidate_labels: Tensor,
    own: Tensor,
    paired: Tensor,
    upstream: Tensor,
    lse: Tensor,
    lse_b: Tensor,
    count: Tensor,
    *,
    loss: str,
    chunk: int,
    private: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """dL/dx, dL/dc and dL/dτ of Σ_r upstream_r·loss_r, from each chunk's W
    (:func:`soft_positives`) recomputed from the saved statistics."""
    target, _ = _target_rows(c, row_labels, candidate_labels, own, paired, private, target_tau)
    g = torch.where(count > 0, upstream, torch.zeros_like(upstream))  # rows with no positive: 0
    has_negative = (lse_b > NEG_INF).to(x.dtype)
    share = coeff / count.clamp(min=1)
    grad_x, grad_c = torch.zeros_like(x), torch.zeros_like(c)
    scaled = x / tau
    for start in range(0, len(c), chunk):
        block = c[start : start + chunk]
        logits, positive, target_logits = _chunk_logits(
            scaled, target, block, row_labels, candidate_labels, own, start, paired, private
        )
        s2 = torch.exp(target_logits - _finite(lse_b)[:, None])  # 0 off the negatives
        if loss == "ressl":
            weights = torch.exp(logits.masked_fill_(positive, NEG_INF) - _finite(lse)[:, None])
            weights = (weights - s2) * has_negative[:, None]
        else:
            p = torch.exp(logits - _finite(lse)[:, None])  # a row with no candidate: 0
            weights = (coeff + (1 - coeff) * has_negative)[:, None] * p - (1 - coeff) * s2
            weights -= positive * share[:, None]
        weights *= g[:, None]
        grad_x += weights @ block
        grad_c[start : start + chunk] += weights.T @ scaled
    grad_x /= tau
    return grad_x, grad_c, -(scaled * grad_x).sum()


@torch.library.custom_op("sce_loss::soft_gradients", mutates_args=())
def soft_gradients(
    x: Tensor,
    c: Tensor,
    tau: Tensor,
    target_tau: Tensor,
    coeff: Tensor,
    row_labels: Tensor,
    candidate_labels: Tensor,
    own: Tensor,
    paired: Tensor,
    upstream: Tensor,
    lse: Tensor,
    lse_b: Tensor,
    count: Tensor,
    *,
    loss: str,
    chunk: int,
    private: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_soft_gradients` over blocks of at most ``ROW_BLOCK`` rows."""
    return _sum_row_blocks(
        lambda b: _soft_gradients(
            x[b],
            c,
            tau,
            target_tau,
            coeff,
            row_labels[b],
            candidate_labels,
            own[b],
            paired[b],
            upstream[b],
            lse[b],
            lse_b[b],
            count[b],
            loss=loss,
            chunk=chunk,
            private=private,
        ),  # fmt: skip
        len(x),
    )


@soft_gradients.register_fake
def _(x, c, tau, *_, loss, chunk, private):
    return torch.empty_like(x), torch.empty_like(c), x.new_empty(())
