"""Plain PyTorch losses, line by line the equations of docs/mathematics.md: the oracle and the
CPU path.

Notation (docs/mathematics.md): ``query`` z¹ is (V, N, D) (V online crops), ``key`` z² is
(N, D), ``queue`` Q is (M, D) or None. Row i's candidates c_k and its positive column ``pos_i``:

- in-batch mode: the keys of ``key_bank`` (the local keys, or every rank's), positive at offset + i;
- queue mode: [z²_i, Q_1..Q_M], positive at column 0;
- queue mode with ``include_keys``: [key_bank, Q], positive at offset + i;
- symmetric (SimCLR) form: in-batch mode over ``key_bank``, less each row's ``excluded`` column
  (its own embedding), which no distribution of the row includes.

With a_ik = z¹_i·c_k / τ and b_ik = z²_i·c_k / τ_m:
  InfoNCE  loss_i = −log softmax_k(a_i)[pos]
  ReSSL    loss_i = −Σ_{k≠pos} softmax_{k≠pos}(b_i)_k · log softmax_{k≠pos}(a_i)_k
  SCE      loss_i = −Σ_k w_ik log softmax_k(a_i)_k,  w_ik = λ[k=pos] + (1−λ) softmax_{k≠pos}(b_i)_k
The target (everything built from b) carries no gradient. Every function returns per-row losses
of shape (V, N), computed in the dtype of its inputs (all of one dtype and device).
:func:`losses` is the backend seam (:mod:`sce_loss.problem`): it computes a problem with them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .problem import Problem, Scalar, constant, transformed


@torch.library.custom_op("sce_loss::snapshot", mutates_args=())
def snapshot(x: Tensor, dtype: torch.dtype) -> Tensor:
    """A contiguous copy of ``x`` in ``dtype``. An opaque op, so that a compiled graph saves the
    copy for its backward rather than recomputing it from ``x``, which may have changed by then."""
    return x.new_empty(x.shape, dtype=dtype).copy_(x)


@snapshot.register_fake
def _(x: Tensor, dtype: torch.dtype) -> Tensor:
    return x.new_empty(x.shape, dtype=dtype)


def unsupported_reason(problem: Problem) -> str | None:
    """The reference serves every problem."""
    return None


def losses(problem: Problem) -> Tensor:
    """Per-row losses (V, N) of ``problem``, in float64 for float64 inputs and float32 otherwise."""
    dtype = problem.compute_dtype
    query, key = problem.query.to(dtype), problem.key.to(dtype)
    bank = None if problem.bank is None else problem.bank.to(dtype)
    queue = problem.queue
    if queue is not None:
        # A private copy when a backward will read it: the caller may update its queue in place
        # (MoCo enqueues inside forward) before the backward.
        # (torch.func transforms cannot batch the opaque op: there a plain copy serves.)
        private = torch.is_grad_enabled() and not transformed()
        queue = snapshot(queue, dtype) if private else queue.to(dtype, copy=True)
    options: dict[str, Any] = dict(
        include_keys=bank is not None and queue is not None,
        bank=key if bank is None else bank,
        offset=problem.offset,
        excluded=problem.own_columns(),
        temperature=problem.temperature,
    )
    if problem.loss == "info_nce":
        return info_nce(query, key, queue, **options)
    options.update(target_temperature=problem.target_temperature)
    if problem.loss == "ressl":
        return ressl(query, key, queue, **options)
    return sce(query, key, queue, coeff=problem.coeff, **options)


def recomputed_gradients(problem: Problem, inputs, needs_input_grad, upstream: Tensor) -> tuple:
    """The gradients of Σ upstream·losses(problem) w.r.t. each of ``inputs`` whose
    ``needs_input_grad`` is set (None for the others and for None inputs), as a differentiable
    graph: what a streaming backend's backward returns when it is itself differentiated."""
    needed = [need and x is not None for x, need in zip(inputs, needs_input_grad)]
    with torch.enable_grad():
        per_row = losses(problem).reshape(-1)
        wanted = [x for x, need in zip(inputs, needed) if need]
        grads = iter(torch.autograd.grad(per_row, wanted, upstream, create_graph=True))
    return tuple(next(grads) if need else None for need in needed)


def similarities(
    x: Tensor, key: Tensor, queue: Tensor | None, *, include_keys: bool, bank: Tensor, offset: int
) -> tuple[Tensor, Tensor]:
    """Dot products x_i·c_k of each row with its candidates, shape (..., N, K), and each row's
    positive column, shape (N,)."""
    n = key.shape[0]
    rows = torch.arange(n, device=x.device)
    if queue is None:
        return x @ bank.mT, rows + offset
    if include_keys:
        return x @ torch.cat([bank, queue]).mT, rows + offset
    positive = (x * key).sum(-1, keepdim=True)
    return torch.cat([positive, x @ queue.mT], -1), torch.zeros_like(rows)


def _column_mask(logits: Tensor, *columns: Tensor | None) -> Tensor:
    """(N, K) mask, True at row i's column ``c[i]`` for each ``c`` of ``columns`` (None: none)."""
    mask = torch.zeros(logits.shape[-2:], dtype=torch.bool, device=logits.device)
    for column in columns:
        if column is not None:
            mask[torch.arange(len(column), device=logits.device), column] = True
    return mask


def _without(values: Tensor, excluded: Tensor | None, fill: float) -> Tensor:
    """``values`` with each row's ``excluded`` column set to ``fill`` (unchanged for None)."""
    return values if excluded is None else values.masked_fill(_column_mask(values, excluded), fill)


@torch.no_grad()
def _target_distribution(key, queue, *, target_temperature, excluded, **candidates):
    """s²_i = softmax of b_i over the candidates without the positive (whose weight is 0)."""
    sims, pos = similarities(key, key, queue, **candidates)
    mask = _column_mask(sims, pos, excluded)
    return torch.softmax((sims / target_temperature).masked_fill(mask, float("-inf")), -1)


def _gather_positive(values: Tensor, pos: Tensor) -> Tensor:
    index = pos.view(-1, 1).expand(*values.shape[:-2], -1, 1)
    return values.gather(-1, index).squeeze(-1)


def info_nce(
    query: Tensor,
    key: Tensor,
    queue: Tensor | None,
    *,
    temperature: Scalar,
    include_keys: bool,
    bank: Tensor,
    offset: int,
    excluded: Tensor | None,
) -> Tensor:
    """loss_i = −log p_i,pos with p_i = softmax_k(z¹_i·c_k / τ)."""
    sims, pos = similarities(query, key, queue, include_keys=include_keys, bank=bank, offset=offset)
    logits = _without(sims / temperature, excluded, float("-inf"))
    return -_gather_positive(torch.log_softmax(logits, -1), pos)


def ressl(
    query: Tensor,
    key: Tensor,
    queue: Tensor | None,
    *,
    temperature: Scalar,
    target_temperature: Scalar,
    include_keys: bool,
    bank: Tensor,
    offset: int,
    excluded: Tensor | None,
) -> Tensor:
    """loss_i = −Σ_{k≠pos} s²_ik log s¹_ik, both softmaxes over the candidates but the positive."""
    candidates: dict[str, Any] = dict(include_keys=include_keys, bank=bank, offset=offset)
    target = _target_distribution(
        key, queue, target_temperature=target_temperature, excluded=excluded, **candidates
    )
    sims, pos = similarities(query, key, queue, **candidates)
    logits = sims / temperature
    mask = _column_mask(logits, pos, excluded)
    log_s1 = torch.log_softmax(logits.masked_fill(mask, float("-inf")), -1).masked_fill(mask, 0.0)
    return -(target * log_s1).sum(-1)


def sce(
    query: Tensor,
    key: Tensor,
    queue: Tensor | None,
    *,
    coeff: Scalar,
    temperature: Scalar,
    target_temperature: Scalar,
    include_keys: bool,
    bank: Tensor,
    offset: int,
    excluded: Tensor | None,
) -> Tensor:
    """loss_i = −λ log p_i,pos − (1−λ) Σ_k s²_ik log p_ik, i.e. −Σ_k w_ik log p_ik."""
    candidates: dict[str, Any] = dict(include_keys=include_keys, bank=bank, offset=offset)
    target = _target_distribution(
        key, queue, target_temperature=target_temperature, excluded=excluded, **candidates
    )
    sims, pos = similarities(query, key, queue, **candidates)
    logits = _without(sims / temperature, excluded, float("-inf"))
    log_p = _without(torch.log_softmax(logits, -1), excluded, 0.0)  # its target weight is 0
    coeff = constant(coeff)
    return -coeff * _gather_positive(log_p, pos) - (1 - coeff) * (target * log_p).sum(-1)


def not_candidates(
    logits: Tensor, own: Tensor | None, paired: Tensor | None, private: int
) -> Tensor | None:
    """(rows, candidates) mask of the columns that are no candidate of the row: its ``own``
    column, and of the first ``private`` columns (plain queue mode's keys) all but its
    ``paired`` one; None if there are none."""
    mask = None if own is None else _column_mask(logits, own)
    if paired is not None and private:
        columns = torch.arange(logits.shape[-1], device=logits.device)
        others = (columns[None, :] < private) & (columns[None, :] != paired[:, None])
        mask = others if mask is None else mask | others
    return mask


def _candidate_sets(logits, row_labels, candidate_labels, own, paired, private):
    """(rows, candidates) masks: the non-candidates (:func:`not_candidates`, or None), the
    positives P (the candidates of the row's label) and the negatives (the other candidates)."""
    excluded = not_candidates(logits, own, paired, private)
    positive = row_labels[:, None] == candidate_labels[None, :]
    if excluded is None:
        return None, positive, ~positive
    positive &= ~excluded
    return excluded, positive, ~positive & ~excluded


def info_nce_positives(
    rows: Tensor,
    candidates: Tensor,
    *,
    row_labels: Tensor,
    candidate_labels: Tensor,
    own: Tensor | None,
    temperature: Scalar,
    positives: str,
    positive_weight: Tensor | None = None,
    paired: Tensor | None = None,
    private: int = 0,
) -> tuple[Tensor, Tensor]:
    """InfoNCE of each row against ``candidates`` with a set of positives P(r) (the candidates
    with the row's label, less its ``own`` column, which is no candidate at all); a = x·c / τ:

      mean       loss_r = LSE_c(a) − (1/|P|)·Σ_{p∈P} a_p                (SupCon's L_out)
      pooled     loss_r = LSE_c(a) − LSE_{p∈P}(a)                       (L_in)
      pairs      loss_r = Σ_{p∈P} [log(e^{a_p} + Σ_{n∉P} e^{a_n}) − a_p]  (one term per pair)
      decoupled  loss_r = LSE_{n∉P}(a) − w_r·(1/|P|)·Σ_{p∈P} a_p         (DCL; DCLW's weights w,
                 ``positive_weight``, else 1)

    Of the first ``private`` candidates (plain queue mode's keys) a row sees only its ``paired``
    one. Returns the per-row losses and their numbers of terms (|P| for "pairs", else 1), both 0
    for a row with no positive; a row with no negative gives 0 in "pairs" and "decoupled"."""
    logits = rows @ candidates.mT / temperature
    excluded, positive, negative = _candidate_sets(
        logits, row_labels, candidate_labels, own, paired, private
    )
    if excluded is not None:
        logits = logits.masked_fill(excluded, float("-inf"))
    counts = positive.sum(-1)
    has_positive, has_negative = counts > 0, negative.any(-1)
    lse = torch.logsumexp(logits, -1)
    mean_positive = logits.masked_fill(~positive, 0.0).sum(-1) / counts.clamp(min=1)
    if positives == "mean":
        losses = lse - mean_positive
    elif positives == "decoupled":
        kept = negative | ~has_negative[:, None]  # a row with no negative: see "pairs"
        lse_negatives = torch.logsumexp(logits.masked_fill(~kept, float("-inf")), -1)
        weight = 1.0 if positive_weight is None else positive_weight
        losses = torch.where(has_negative, lse_negatives - weight * mean_positive, 0.0)
    elif positives == "pooled":
        # A row with no positive keeps its logits: a finite LSE, whose (masked) gradient is 0.
        kept = positive | ~has_positive[:, None]
        losses = lse - torch.logsumexp(logits.masked_fill(~kept, float("-inf")), -1)
    else:
        kept = negative | ~has_negative[:, None]  # as above, for a row with no negative
        lse_negatives = torch.logsumexp(logits.masked_fill(~kept, float("-inf")), -1)
        lse_negatives = torch.where(has_negative, lse_negatives, float("-inf"))
        # log(e^{a_p} + e^{LSE_n}) − a_p = softplus(LSE_n − a_p): 0 for a row with no negative.
        per_pair = torch.nn.functional.softplus(lse_negatives[:, None] - logits)
        losses = per_pair.masked_fill(~positive, 0.0).sum(-1)
    losses = torch.where(has_positive, losses, torch.zeros_like(losses))
    terms = counts if positives == "pairs" else has_positive.to(counts.dtype)
    return losses, terms


def soft_positives(
    rows: Tensor,
    candidates: Tensor,
    *,
    row_labels: Tensor,
    candidate_labels: Tensor,
    own: Tensor | None,
    temperature: Scalar,
    target_temperature: Scalar,
    coeff: Scalar,
    loss: str,
    paired: Tensor | None = None,
    private: int = 0,
) -> tuple[Tensor, Tensor]:
    """SCE ("sce") or ReSSL ("ressl") of each row against ``candidates`` with a set of positives
    P(r) (as :func:`info_nce_positives`), a = x·c / τ, N(r) the candidates neither in P(r) nor
    the row's ``own`` column. The target row t_r = (1/|P|)·Σ_{p∈P} c_p (not re-normalised: the
    positive itself when there is one) gives s²_r = softmax_{N(r)}(t_r·c / τ_m), no gradient:

      sce    loss_r = −Σ_c w_rc log softmax_c(a_r)_c,  w_r = λ·1_P/|P| + (1 − λ)·s²_r
      ressl  loss_r = −Σ_{c∈N} s²_rc log softmax_{N}(a_r)_c

    A row with no negative has no s²: its (1 − λ) part is 0 (ReSSL's whole loss). Returns the
    per-row losses and their numbers of terms (1, or 0 for a row with no positive, whose loss
    is 0). ``paired`` and ``private`` as in :func:`info_nce_positives`."""
    logits = rows @ candidates.mT / temperature
    excluded, positive, negative = _candidate_sets(
        logits, row_labels, candidate_labels, own, paired, private
    )
    counts = positive.sum(-1)
    has_positive, has_negative = counts > 0, negative.any(-1)
    kept = negative | ~has_negative[:, None]  # a row with no negative: finite, then zeroed
    with torch.no_grad():
        c = candidates.detach()
        target_rows = positive.to(c.dtype) @ c / counts.clamp(min=1)[:, None].to(c.dtype)
        target_logits = (target_rows @ c.mT / target_temperature).masked_fill(~kept, float("-inf"))
        target = torch.softmax(target_logits, -1) * has_negative[:, None]
    if loss == "sce":
        if excluded is not None:
            logits = logits.masked_fill(excluded, float("-inf"))
        log_p = torch.log_softmax(logits, -1)
        log_p = log_p if excluded is None else log_p.masked_fill(excluded, 0.0)
        coeff = constant(coeff)
        one_hot = positive.to(log_p.dtype) / counts.clamp(min=1)[:, None].to(log_p.dtype)
        losses = -coeff * (one_hot * log_p).sum(-1) - (1 - coeff) * (target * log_p).sum(-1)
    else:
        log_s1 = torch.log_softmax(logits.masked_fill(~kept, float("-inf")), -1)
        losses = -(target * log_s1.masked_fill(~kept, 0.0)).sum(-1)
    losses = torch.where(has_positive, losses, torch.zeros_like(losses))
    return losses, has_positive.to(counts.dtype)
