"""The public loss functions: check the arguments, prepare a :class:`~sce_loss.problem.Problem`,
pick a backend, reduce.

Every function takes ``query`` (N, D) or (V, N, D), ``key`` (N, D) and an optional ``queue``
(M, D) and returns the loss as float64 for float64 inputs and float32 otherwise.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from . import chunked, chunked_positives, distributed, fused, reference
from .arguments import (
    SHARED_CHECKS,
    autocast_disabled,
    check_backend,
    check_bool,
    check_by_name,
    check_coeff,
    check_finite,
    check_float_tensor,
    check_labels,
    check_temperature,
    reduce_losses,
    traceable_scalar,
)
from .problem import POSITIVES, HyperParameter, Problem, compute_dtype_of, transformed

# ``auto`` off the fused path streams (chunked) against a queue of at least CHUNKED_FROM_QUEUE keys
# from max(2^18, 16·D²) (row, candidate) pairs on: measured on a 2-core CPU
# (benchmarks/results/chunked-crossover-cpu.md), chunked is then as fast or faster (0.2–1.03× the
# reference's time at D ≤ 128 from 2^18; at D = 512 only from about 2^22, as it makes four
# half-size products where the reference makes three). In-batch, its second pass for the keys'
# gradient keeps it 1.02–2.6× slower up to 2^20 pairs (N = 1024), so there the reference serves
# below CHUNKED_FROM_IN_BATCH_PAIRS: at 2^26 (N = 8192, both sides requiring grad) chunked takes
# 0.84× the reference's time with 29 MiB against its 768 MiB (benchmarks/results/supcon-cpu.md).
CHUNKED_FROM_QUEUE = 1024
CHUNKED_FROM_PAIRS = 1 << 18
CHUNKED_FROM_IN_BATCH_PAIRS = 1 << 26
# The symmetric (SimCLR) form streams from 2N = 4096 rows on (2N × 2N logits of 64 MiB each in
# float32; benchmarks/results/simclr-cpu.md).
CHUNKED_FROM_SYMMETRIC_PAIRS = 1 << 24
# Several positives per row stream from 2^25 (row, candidate) pairs on: the reference's few
# rows × candidates temporaries pass a GiB there (1.1 GiB extra peak for SCE at 6000 rows, 2^25.1
# pairs). Measured on the 2-core CPU (V = 2, D = 128, float32, fwd+bwd): chunked 1.6× the
# reference's time at 4096 rows (2^24 pairs); at 16384 rows (2^28) 0.23× for SupCon with 53 MiB
# against 5.4 GiB, 0.26× for SCE with labels (benchmarks/results/supcon-cpu.md).
CHUNKED_POSITIVES_FROM_PAIRS = 1 << 25


def info_nce_loss(
    query: Tensor,
    key: Tensor | None = None,
    queue: Tensor | None = None,
    *,
    temperature: HyperParameter = 0.2,
    labels: Tensor | None = None,
    queue_labels: Tensor | None = None,
    positives: str = "mean",
    decoupled: bool = False,
    weight_sigma: HyperParameter | None = None,
    include_keys: bool = False,
    symmetric: bool = False,
    normalize: bool = False,
    reduction: str = "mean",
    gather: bool | torch.distributed.ProcessGroup = False,
    backend: str = "auto",
) -> Tensor:
    """InfoNCE (MoCo v2): loss_i = −log softmax_k(z¹_i·c_k / τ)[pos].

    Args:
        query: online embeddings z¹, (N, D) or (V, N, D) for V crops; gradients flow through it.
        key: target embeddings z², (N, D); gets gradient only where it is an online candidate.
        queue: optional (M, D) bank of past keys, read when the loss is called (it may be updated
            in place before the backward); never gets a gradient.
        temperature: τ ≥ 1e-4, a float or a 0-d tensor (which may require grad).
        include_keys: with a queue, every in-batch key is a candidate too (positive at column i).
        symmetric: the SimCLR form: ``query`` z1 and ``key`` z2 are (N, D), two views of N
            samples through one online network, both with gradients; each of the 2N embeddings
            is a row whose candidates are the other 2N − 1 and whose positive is its sample's
            other view (NT-Xent for InfoNCE). No queue, no ``include_keys``, no crops.
            With ``key`` omitted, ``query`` holds V views (V, N, D) (or one, (N, D)) of N
            samples: each of the V·N embeddings is a row whose candidates are the other V·N − 1
            and whose positives are its sample's other views (or, with ``labels``, every
            candidate of its label).
        labels: optional (N,) integer tensor, one label ≥ 0 per sample (shared by its views):
            a row's positives P are the candidates of its label (SupCon), in the symmetric form,
            in-batch mode, or with a queue and ``queue_labels``.
        queue_labels: with ``labels`` and a queue, (M,) integers, the label of each queue entry
            (one < 0 matches no row): same-label entries are positives too, beside the row's own
            key (every same-label key with ``include_keys``).
        positives: where a row has several positives: "mean" (SupCon's L_out,
            LSE(a) − mean_P a_p), "pooled" (L_in, LSE(a) − LSE_P(a)) or "pairs" (each (row,
            positive) pair against the row's negatives only; "mean" averages over pairs). A row
            with no positive counts for nothing: 0 in "none", left out of "mean".
        decoupled: DCL: the positives leave the denominator, loss_r = LSE_{n∉P}(a) −
            mean_P a_p (0 for a row with no negative). In-batch or symmetric, no queue.
        weight_sigma: σ > 0, DCLW (with ``decoupled``, one positive per row): the positive
            term is weighted by w_r = 2 − R·softmax_r(e_r·e_pos(r)/σ) over the R rows of the
            view (every rank's with ``gather``), without gradient.
        normalize: L2-normalise query, key and queue first.
        reduction: "mean" (default), "sum" or "none" (per-row losses, shape (N,) or (V, N);
            (2, N) in the symmetric form, row v holding view v's).
        gather: True or a process group: under torch.distributed, the keys of every rank are
            candidates (in-batch mode and ``include_keys``; both views in the symmetric form),
            as if one process held every batch.
        backend: "auto" (the fused kernels on CUDA when Triton is installed and they pass their
            first-use check, else chunked or reference, whichever is faster for the size),
            "reference", "chunked" or "fused". Several positives per row are computed by the
            reference.
    """
    check_options(
        temperature=temperature,
        positives=positives,
        decoupled=decoupled,
        weight_sigma=weight_sigma,
    )
    if weight_sigma is not None and not decoupled:
        raise ValueError("weight_sigma weighs DCL's positive term: pass decoupled=True too")
    if decoupled and positives != "mean":
        raise ValueError(
            "decoupled=True averages a row's positives: positives must be 'mean', got "
            f"{positives!r}"
        )
    _check_queue_labels(labels, queue, queue_labels)
    if key is None or labels is not None or decoupled:
        two_views = symmetric and query.dim() == 3 and len(query) == 2
        if key is None and labels is None and not decoupled and two_views:
            key, query = query[1], query[0]  # two views: the one-positive form
        else:
            return _with_positives(
                "info_nce",
                query,
                key,
                queue,
                dict(temperature=temperature),
                labels=labels,
                queue_labels=queue_labels,
                positives="decoupled" if decoupled else positives,
                weight_sigma=weight_sigma,
                include_keys=include_keys,
                symmetric=symmetric,
                normalize=normalize,
                reduction=reduction,
                gather=gather,
                backend=backend,
            )
    return _loss(
        "info_nce",
        query,
        key,
        queue,
        dict(temperature=temperature),
        include_keys=include_keys,
        symmetric=symmetric,
        normalize=normalize,
        reduction=reduction,
        gather=gather,
        backend=backend,
    )


def ressl_loss(
    query: Tensor,
    key: Tensor | None = None,
    queue: Tensor | None = None,
    *,
    temperature: HyperParameter = 0.1,
    target_temperature: HyperParameter = 0.04,
    labels: Tensor | None = None,
    queue_labels: Tensor | None = None,
    include_keys: bool = False,
    symmetric: bool = False,
    normalize: bool = False,
    reduction: str = "mean",
    gather: bool | torch.distributed.ProcessGroup = False,
    backend: str = "auto",
) -> Tensor:
    """ReSSL: loss_i = −Σ_{k≠pos} s²_ik log s¹_ik, where s¹ = softmax(z¹_i·c_k / τ) and
    s² = softmax(z²_i·c_k / τ_m) both run over the candidates without the positive (s² is a
    constant target). Arguments as :func:`info_nce_loss`; ``target_temperature`` is τ_m.

    With several positives per row (``labels``, or V ≥ 3 views with ``key`` omitted), both
    softmaxes run over the candidates that are not positives, and the target's row is t_r, the
    mean of the row's positives (not re-normalised; :func:`sce_loss`)."""
    check_options(temperature=temperature, target_temperature=target_temperature)
    hyper_parameters = dict(
        temperature=temperature, target_temperature=target_temperature, coeff=0.0
    )
    return _one_or_several_positives(
        "ressl",
        query,
        key,
        queue,
        hyper_parameters,
        labels=labels,
        queue_labels=queue_labels,
        include_keys=include_keys,
        symmetric=symmetric,
        normalize=normalize,
        reduction=reduction,
        gather=gather,
        backend=backend,
    )


def sce_loss(
    query: Tensor,
    key: Tensor | None = None,
    queue: Tensor | None = None,
    *,
    coeff: HyperParameter = 0.5,
    temperature: HyperParameter = 0.1,
    target_temperature: HyperParameter = 0.05,
    labels: Tensor | None = None,
    queue_labels: Tensor | None = None,
    include_keys: bool = False,
    symmetric: bool = False,
    normalize: bool = False,
    reduction: str = "mean",
    gather: bool | torch.distributed.ProcessGroup = False,
    backend: str = "auto",
) -> Tensor:
    """SCE (Similarity Contrastive Estimation): loss_i = −Σ_k w_ik log p_ik with
    p_i = softmax_k(z¹_i·c_k / τ) over all candidates and the constant target
    w_ik = λ·[k = pos] + (1−λ)·softmax_{k≠pos}(z²_i·c_k / τ_m).

    ``coeff`` is λ in [0, 1] (λ=1 is InfoNCE); λ and τ_m shape the target, which carries no
    gradient. Other arguments as :func:`info_nce_loss`.

    With several positives per row P(r) (``labels``, or V ≥ 3 views with ``key`` omitted):
    w_r = λ·uniform(P) + (1−λ)·softmax over the candidates neither in P nor the row itself of
    t_r·c/τ_m, where t_r is the mean of the row's positives (not re-normalised: one positive
    gives the loss above). A row with no negative keeps the λ part only; one with no positive
    counts for nothing, as in :func:`info_nce_loss`.
    """
    check_options(coeff=coeff, temperature=temperature, target_temperature=target_temperature)
    hyper_parameters = dict(
        temperature=temperature, target_temperature=target_temperature, coeff=coeff
    )
    return _one_or_several_positives(
        "sce",
        query,
        key,
        queue,
        hyper_parameters,
        labels=labels,
        queue_labels=queue_labels,
        include_keys=include_keys,
        symmetric=symmetric,
        normalize=normalize,
        reduction=reduction,
        gather=gather,
        backend=backend,
    )


def _one_or_several_positives(
    loss: str, query, key, queue, hyper_parameters: dict, *, labels, queue_labels, **options
) -> Tensor:
    """SCE's or ReSSL's call: with several positives per row (labels, or views with ``key``
    omitted), :func:`_with_positives`; else the one-positive :func:`_loss` (two stacked views in
    the symmetric form are its two tensors)."""
    _check_queue_labels(labels, queue, queue_labels)
    if _several_positives(query, key, labels, options["symmetric"]):
        return _with_positives(
            loss, query, key, queue, hyper_parameters,
            labels=labels, queue_labels=queue_labels, **options,
        )  # fmt: skip
    if key is None:
        key, query = query[1], query[0]
    return _loss(loss, query, key, queue, hyper_parameters, **options)


def _check_queue_labels(labels, queue, queue_labels) -> None:
    if queue_labels is not None and (labels is None or queue is None):
        missing = "labels (N,)" if labels is None else "the queue"
        raise ValueError(f"queue_labels label the queue's entries for labels: pass {missing} too")


def _several_positives(query, key, labels, symmetric) -> bool:
    """Whether a call of SCE or ReSSL has a set of positives per row: labels, or views (V, N, D)
    with ``key`` omitted other than V = 2 in the symmetric form (whose one positive is the
    other view: the two-tensor call)."""
    if labels is not None or key is not None:
        return labels is not None
    two_views = symmetric and isinstance(query, Tensor) and query.dim() == 3 and len(query) == 2
    return not two_views


def _loss(
    loss: str,
    query,
    key,
    queue,
    hyper_parameters: dict,
    *,
    include_keys,
    symmetric,
    normalize,
    reduction,
    gather,
    backend,
) -> Tensor:
    """Check the inputs, build the problem, compute its per-row losses on a backend, reduce."""
    check_options(
        include_keys=include_keys,
        symmetric=symmetric,
        normalize=normalize,
        reduction=reduction,
        gather=gather,
        backend=backend,
    )
    _check_tensors(query, key, queue)
    if symmetric:
        _check_symmetric(query, queue, include_keys)
    hyper_parameters = {
        name: _hyper_parameter(name, value, query.device)
        for name, value in hyper_parameters.items()
    }
    group = distributed.resolve_group(gather)
    # The losses compute as outside autocast: float32 statistics and products for float32 inputs.
    with autocast_disabled(query.device.type):
        if normalize:
            query, key = _normalized(query), _normalized(key)
            queue = None if queue is None else _normalized(queue)
        if symmetric:  # rows [z1; z2], each row's positive [z2; z1] (sce_loss.problem)
            query, key = torch.cat([query, key]), torch.cat([key, query])
        bank, offset = None, 0
        if queue is None or include_keys:
            bank, offset = distributed.gather_keys(
                key, group, rows_per_sample=2 if symmetric else 1
            )
        _check_has_negatives(bank, queue, symmetric)
        problem = Problem(
            loss=loss,
            query=query if query.dim() == 3 else query.unsqueeze(0),
            key=key,
            bank=bank,
            queue=None if queue is None else queue.detach(),
            offset=offset,
            **hyper_parameters,
            symmetric=symmetric,
        )
        chosen = _backend(backend, problem)
        if chosen is fused and backend == "auto":
            # auto may trust the kernels with a kind of call it could not check (inside a
            # compiled graph): a launch failure then computes the same outputs by streaming.
            losses = fused.losses(problem, fallback=True)
        else:
            losses = chosen.losses(problem)
    if symmetric:
        losses = losses.view(2, -1)
    elif query.dim() == 2:
        losses = losses.squeeze(0)
    return reduce_losses(losses, reduction)


def _with_positives(
    loss: str,
    query,
    key,
    queue,
    hyper_parameters: dict,
    *,
    labels,
    queue_labels=None,
    positives: str = "mean",
    weight_sigma=None,
    include_keys,
    symmetric,
    normalize,
    reduction,
    gather,
    backend,
) -> Tensor:
    """A loss with a set of positives per row (:func:`sce_loss.reference.info_nce_positives`,
    :func:`sce_loss.reference.soft_positives`): V views in the symmetric form, or labels
    (symmetric, in-batch, or with a labelled queue); and DCL."""
    check_options(
        include_keys=include_keys,
        symmetric=symmetric,
        normalize=normalize,
        reduction=reduction,
        gather=gather,
        backend=backend,
    )
    if key is None and not symmetric:
        raise ValueError("key may be omitted only in the symmetric form: pass symmetric=True")
    decoupled = positives == "decoupled"
    what = "decoupled=True" if decoupled else "several positives per row (labels, or V views)"
    if (queue is not None or include_keys) and (decoupled or symmetric or labels is None):
        raise ValueError(
            f"{what} {'compares' if decoupled else 'compare'} in-batch embeddings only: pass no "
            "queue and include_keys=False"
            + ("" if decoupled or symmetric else " (or labels and queue_labels with a queue)")
        )
    if queue is not None and queue_labels is None:
        raise ValueError(
            "labels with a queue need queue_labels (M,), the label of each queue entry (a "
            "MemoryQueue(..., labels=True) keeps them)"
        )
    if backend == "fused":
        raise ValueError(
            f"backend='fused' does not compute {what}; use backend='auto', 'chunked' or 'reference'"
        )
    if key is None:
        check_float_tensor("query", query)
        if query.dim() not in (2, 3) or 0 in query.shape:
            raise ValueError(
                "with key omitted, query must be non-empty views (V, N, D) or one view (N, D), got "
                f"shape {tuple(query.shape)}"
            )
        views = query if query.dim() == 3 else query[None]
        check_finite(query=query)
    else:
        _check_tensors(query, key, queue)
        if symmetric:
            _check_symmetric(query, None, False)
        views = torch.stack([query, key]) if symmetric else query
    crops, n, dim = views.shape if views.dim() == 3 else (1, *views.shape)
    if len(views) == 1 and symmetric and labels is None:
        raise ValueError("one view has no positive without labels: pass labels, or V ≥ 2 views")
    if labels is not None:
        check_labels(labels, n, views.device)
    if queue is not None:
        check_labels(queue_labels, len(queue), views.device, name="queue_labels", low=None)
    if weight_sigma is not None and (labels is not None or (symmetric and crops != 2)):
        raise ValueError(
            "weight_sigma (DCLW) weighs each row's one positive: pass no labels, and two views "
            f"in the symmetric form (got {'labels' if labels is not None else f'{crops} views'})"
        )
    hyper = {
        name: _hyper_parameter(name, value, views.device)
        for name, value in hyper_parameters.items()
    }
    group = distributed.resolve_group(gather)
    dtype = compute_dtype_of(views.dtype)
    with autocast_disabled(views.device.type):
        rows = views.reshape(-1, dim).to(dtype)
        if normalize:
            rows = F.normalize(rows, dim=-1)
        if symmetric:
            candidates, offset = distributed.gather_keys(rows, group, rows_per_sample=crops)
            own = offset + torch.arange(len(rows), device=rows.device)
            samples = offset // crops
        else:
            keys = key.to(dtype)
            keys = F.normalize(keys, dim=-1) if normalize else keys
            if queue is None or include_keys:  # every rank's keys are candidates
                candidates, offset = distributed.gather_keys(keys, group)
            else:  # plain queue mode: a row's one key is its own, private column
                candidates, offset, group = keys, 0, None
            own, samples = None, offset
        # Labels compared as int64: a narrower dtype would wrap a queue's −1 (or a large
        # label) into a real one, and the streaming backend indexes with them.
        labels = samples + torch.arange(n, device=rows.device) if labels is None else labels.long()
        sample_labels = labels if group is None else distributed.all_gather_constant(labels, group)
        row_labels = labels.repeat(crops)
        candidate_labels = (
            sample_labels.view(-1, n).repeat(1, crops).view(-1) if symmetric else (sample_labels)
        )
        private, paired = 0, None
        if queue is not None:
            if not include_keys:
                private, paired = n, torch.arange(len(rows), device=rows.device) % n
            entries = queue.detach().to(dtype)
            entries = F.normalize(entries, dim=-1) if normalize else entries
            candidates = torch.cat([candidates, entries])
            candidate_labels = torch.cat([candidate_labels, queue_labels.long()])
        weight = None
        if weight_sigma is not None:
            positive_rows = rows.view(crops, n, dim).flip(0) if symmetric else keys[None]
            weight = dclw_weights(
                rows.view(crops, n, dim), positive_rows, weight_sigma, group, first=samples
            )
        streamed = backend == "chunked" or (
            backend == "auto" and len(rows) * len(candidates) >= CHUNKED_POSITIVES_FROM_PAIRS
        )
        backend_module = chunked_positives if streamed and not transformed() else reference
        sets: dict[str, Any] = dict(
            row_labels=row_labels,
            candidate_labels=candidate_labels,
            own=own,
            paired=paired,
            private=private,
        )
        if loss == "info_nce":
            losses, terms = backend_module.info_nce_positives(
                rows, candidates, **sets, **hyper, positives=positives, positive_weight=weight
            )
        else:
            losses, terms = backend_module.soft_positives(
                rows, candidates, **sets, **hyper, loss=loss
            )
    if reduction == "none":
        one_set = query.dim() == 2 and (key is None or not symmetric)  # (N, D) in: (N,) out
        return losses if one_set else losses.view(crops, n)
    if reduction == "sum":
        return losses.sum()
    if group is not None:  # every rank's terms: the mean of the ranks' losses is one process's
        counts = distributed.all_gather_constant(terms.sum().view(1), group)
        return losses.sum() * len(counts) / counts.sum().clamp(min=1)
    return losses.sum() / terms.sum().clamp(min=1)


def dclw_weights(rows: Tensor, positives: Tensor, sigma, group, *, first: int) -> Tensor:
    """DCLW's weights w_(v,i) = 2 − R·softmax_i(e_(v,i)·p_(v,i)/σ), (V·N,), without gradient:
    the softmax over the R samples of each view (every rank's under ``group``, where this rank's
    are samples ``first`` to ``first`` + N), p the rows' positives (broadcast against ``rows``,
    (V, N, D))."""
    with torch.no_grad():
        similarity = (rows * positives).sum(-1) / sigma  # (V, N)
        if group is not None:
            similarity = distributed.all_gather_constant(similarity.T.contiguous(), group).T
        weights = 2 - similarity.shape[1] * similarity.softmax(1)
        return weights[:, first : first + rows.shape[1]].reshape(-1)


def _check_symmetric(query: Tensor, queue: Tensor | None, include_keys: bool) -> None:
    """The symmetric form takes two (N, D) views and nothing else."""
    if query.dim() != 2:
        raise ValueError(
            f"symmetric=True takes query and key as two (N, D) views, got query of shape "
            f"{tuple(query.shape)}"
        )
    if queue is not None or include_keys:
        raise ValueError(
            "symmetric=True compares the 2N in-batch embeddings only: pass no queue and "
            "include_keys=False"
        )


def _hyper_parameter(name: str, value, device: torch.device):
    """A checked hyper-parameter as the backends take it: a 0-d tensor on the inputs' device or
    the CPU, or a Python float (a NumPy number becomes one). Under torch.compile before torch
    2.13, a float becomes a float64 0-d tensor (1·value: the only form of it that those versions
    keep symbolic)."""
    if isinstance(value, Tensor):
        if value.device != device and value.device.type != "cpu":
            raise ValueError(
                f"{name} must be on the inputs' device {device} or the CPU, got {value.device}"
            )
        return value
    return traceable_scalar(value, device)


def _normalized(x: Tensor) -> Tensor:
    """``x`` L2-normalised along its last dimension (in at least float32), in its own dtype."""
    return F.normalize(x.to(compute_dtype_of(x.dtype)), dim=-1).to(x.dtype)


def _backend(name: str, problem: Problem):
    """The backend module that computes ``problem``: the named one, or ``auto``'s choice."""
    if name == "reference" or transformed():
        # torch.func transforms cannot see through the streaming backends' own autograd: every
        # backend computes through the reference's graph there (the same numbers).
        return reference
    if name == "chunked":
        return chunked
    if name == "fused":
        reason = fused.unsupported_reason(problem)
        if reason is not None:
            raise ValueError(f"backend='fused' cannot run here: {reason}")
        return fused
    if _fused_first(problem.query.device):
        reason = fused.unsupported_reason(problem)
        if reason is None and fused.verified(problem):
            return fused
        if reason is not None:
            _explain_once(
                f"sce_loss: the fused kernels cannot serve this call ({reason}); "
                "using the chunked backend"
            )
        return chunked
    if problem.symmetric:
        _, rows, _ = problem.query.shape
        return chunked if rows * rows >= CHUNKED_FROM_SYMMETRIC_PAIRS else reference
    views, rows, dim = problem.query.shape
    if problem.queue is None:
        pairs = views * rows * _candidates(problem)
        return chunked if pairs >= CHUNKED_FROM_IN_BATCH_PAIRS else reference
    if problem.queue.shape[0] < CHUNKED_FROM_QUEUE:
        return reference
    pairs = views * rows * _candidates(problem)
    return chunked if pairs >= max(CHUNKED_FROM_PAIRS, 16 * dim * dim) else reference


def _fused_first(device: torch.device) -> bool:
    """Whether ``auto`` tries the fused kernels first: on CUDA."""
    return device.type == "cuda"


def _candidates(problem: Problem) -> int:
    """K, the number of candidates of a row."""
    queue = 0 if problem.queue is None else problem.queue.shape[0]
    return queue + (1 if problem.bank is None else problem.bank.shape[0])


_EXPLAINED: set[str] = set()


def _explain_once(message: str) -> None:
    """Warn once per message, in eager mode only: a compiled graph that read the set of messages
    would guard on it, and recompile whenever an eager call adds one."""
    if not torch.compiler.is_compiling() and message not in _EXPLAINED:
        _EXPLAINED.add(message)
        warnings.warn(message, stacklevel=4)


def _check_tensors(query, key, queue) -> None:
    for name, value in (("query", query), ("key", key), ("queue", queue)):
        if value is not None or name != "queue":
            check_float_tensor(name, value)
    if query.dim() not in (2, 3):
        raise ValueError(f"query must be (N, D) or (V, N, D), got shape {tuple(query.shape)}")
    if key.dim() != 2:
        raise ValueError(f"key must be (N, D), got shape {tuple(key.shape)}")
    if query.shape[-2:] != key.shape:
        raise ValueError(
            f"query rows and dim {tuple(query.shape[-2:])} must match key's (N, D) "
            f"{tuple(key.shape)}"
        )
    if key.shape[0] == 0 or key.shape[1] == 0 or query.shape[0] == 0:
        raise ValueError(
            f"query and key must be non-empty, got shapes {tuple(query.shape)} and "
            f"{tuple(key.shape)}"
        )
    if key.dtype != query.dtype:
        raise TypeError(f"key must have query's dtype {query.dtype}, got {key.dtype}")
    if key.device != query.device:
        raise ValueError(f"key must be on query's device {query.device}, got {key.device}")
    if queue is not None:
        if queue.dim() != 2 or queue.shape[1] != key.shape[1]:
            raise ValueError(
                f"queue must be (M, D) with D={key.shape[1]}, got shape {tuple(queue.shape)}"
            )
        if queue.device != query.device:
            raise ValueError(f"queue must be on query's device {query.device}, got {queue.device}")
    check_finite(query=query, key=key, queue=queue)


def _check_has_negatives(bank: Tensor | None, queue: Tensor | None, symmetric: bool) -> None:
    queued = 0 if queue is None else queue.shape[0]
    banked = 0 if bank is None else bank.shape[0]
    if symmetric and banked - 2 < 1:
        raise ValueError(
            "each row needs at least one negative: symmetric=True needs a batch of at least 2 "
            f"samples (across every rank), got {banked // 2}"
        )
    if queued + max(banked - 1, 0) < 1 and bank is None:
        raise ValueError(
            "each row needs at least one negative: the queue is empty and include_keys=False; "
            "pass a non-empty queue or include_keys=True"
        )
    if queued + max(banked - 1, 0) < 1:
        raise ValueError(
            f"each row needs at least one negative: got {banked} in-batch key(s) (across every "
            f"rank) and a queue of {queued} entries"
        )


def check_weight_sigma(name: str, value) -> None:
    """None (DCL) or σ as a temperature (DCLW)."""
    if value is not None:
        check_temperature(name, value)


def check_positives(name: str, value) -> None:
    if not isinstance(value, str) or value not in POSITIVES:
        raise ValueError(f"{name} must be one of {POSITIVES}, got {value!r}")


_CHECKS = SHARED_CHECKS | {
    "coeff": check_coeff,
    "temperature": check_temperature,
    "target_temperature": check_temperature,
    "include_keys": check_bool,
    "symmetric": check_bool,
    "decoupled": check_bool,
    "weight_sigma": check_weight_sigma,
    "backend": check_backend,
    "positives": check_positives,
}


def check_options(**options) -> None:
    """Check keyword arguments of the functions by name (the modules call this in ``__init__``),
    as :func:`~sce_loss.arguments.check_by_name`."""
    check_by_name(_CHECKS, **options)
