"""CACR and ReCo: two relation-aware alternatives to plain instance discrimination, next to SCE.

**CACR** (contrastive attraction and contrastive repulsion; Zheng et al., arXiv:2105.03746)
replaces the softmax over candidates by two weighted squared distances: each query is pulled
towards its positive views, the farther ones harder, and pushed from its negatives, the closer
ones harder.

**ReCo** (relation-aware contrastive learning) adds to MoCo v2's InfoNCE a ReSSL-style relation
term against a second queue of weak-view keys, and an InfoNCE term for the embedding of a CutMix
image whose positive is the interpolated key. It is a composition of the library's own losses
(:func:`~sce_loss.functional.info_nce_loss`, :func:`~sce_loss.functional.ressl_loss`), so every
backend of those serves it.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor

from . import distributed
from .arguments import (
    LARGEST_FLOAT,
    SHARED_CHECKS,
    autocast_disabled,
    check_backend,
    check_bool,
    check_by_name,
    check_finite,
    check_float_tensor,
    check_temperature,
    reduce_losses,
    scalar_value,
    traceable_scalar,
)
from .functional import info_nce_loss, ressl_loss
from .problem import HyperParameter, Scalar, compute_dtype_of, constant, tracing

CACR_BACKENDS = ("auto", "reference")


def cacr_loss(
    query: Tensor,
    key: Tensor | None = None,
    queue: Tensor | None = None,
    *,
    attraction_temperature: HyperParameter = 1.0,
    repulsion_temperature: HyperParameter = 1.0,
    attraction_weight: HyperParameter = 1.0,
    repulsion_weight: HyperParameter = 1.0,
    intra_batch: bool = True,
    weight_gradients: bool = False,
    normalize: bool = False,
    reduction: str = "mean",
    gather: bool | torch.distributed.ProcessGroup = False,
    backend: str = "auto",
) -> Tensor:
    """CACR: loss_vi = α·Σ_u w⁺_u ‖q_vi − k_ui‖² − β·Σ_j w⁻_j ‖q_vi − n_j‖², with the constant
    weights w⁺ = softmax_u(τ⁺·‖q_vi − k_ui‖²) (farther positives pulled harder) and
    w⁻ = softmax_j(−τ⁻·‖q_vi − n_j‖²) (closer negatives pushed harder).

    Positives of query view v, row i: the key views k_ui of row i — all of them, except that when
    ``key`` is (V, N, D) with the query's V ≥ 2 the own view u = v is left out (each view is
    attracted to the other views' keys). Negatives n_j: the queue rows, then, with ``intra_batch``,
    the other rows j ≠ i of the same query view. By default the weights carry no gradient;
    gradient flows through every distance: into the query, the key, and both ends of an
    intra-batch negative.

    **One-encoder form** (the official CIFAR/STL code): ``cacr_loss(views)`` with ``key`` None
    and no queue, ``views`` (V, N, D), V ≥ 2, all online. Attraction as above with the other views
    u ≠ v of row i as positives; repulsion for every pair of views x < y: row i of view x against
    the rows j ≠ i of view y, −β·Σ_j w⁻_j ‖z_xi − z_yj‖², averaged over the V(V−1)/2 pairs. The
    loss is attraction (averaged over views) + repulsion; ``reduction="none"`` gives per row (N,)
    the attraction plus the mean of the pair terms.

    The official code (JegZheng/CACR-SSL) differs in two places that change gradients, not values:
    it lets gradient flow through some weights (``weight_gradients=True`` does the same: the
    intra-batch repulsion distances inside w⁻ in the queue form, every weight in the one-encoder
    form), and it writes the queue distances as 2 − 2q·n (equal to ‖q − n‖² for unit vectors; the
    gradient differs by a multiple of q, which the normalisation before the loss removes).

    Args:
        query: online embeddings q, (N, D) or (V, N, D) for V views; gradients flow through it.
        key: target embeddings k, (N, D) or (U, N, D) for U views.
        queue: optional (M, D) bank of past keys, read when the loss is called; no gradient.
        attraction_temperature: τ⁺ ≥ 0 (0: every positive weighs the same).
        repulsion_temperature: τ⁻ ≥ 0 (0: every negative weighs the same).
        attraction_weight: α ≥ 0. repulsion_weight: β ≥ 0. Each hyper-parameter is a float or
            a 0-d tensor; τ⁺ and τ⁻ shape the constant weights, so no gradient reaches them.
        intra_batch: the other rows of the same query view are negatives too.
        weight_gradients: let gradient flow through the weights where the official code does.
        normalize: L2-normalise query, key and queue first.
        reduction: "mean" (default), "sum" or "none" (per-row losses, shape (N,) or (V, N)).
        gather: True or a process group: under torch.distributed, the intra-batch negatives are
            every rank's queries (gradients return to their owners), as if one process held
            every batch. Nothing else is gathered: positives and queue are per row.
        backend: "auto" or "reference": CACR runs on the plain PyTorch reference.
    """
    check_cacr_options(
        attraction_temperature=attraction_temperature,
        repulsion_temperature=repulsion_temperature,
        attraction_weight=attraction_weight,
        repulsion_weight=repulsion_weight,
        intra_batch=intra_batch,
        weight_gradients=weight_gradients,
        normalize=normalize,
        reduction=reduction,
        gather=gather,
        backend=backend,
    )
    attraction_temperature, repulsion_temperature, attraction_weight, repulsion_weight = (
        traceable_scalar(value, query.device if isinstance(query, Tensor) else None)
        for value in (
            attraction_temperature,
            repulsion_temperature,
            attraction_weight,
            repulsion_weight,
        )
    )
    if key is None:
        return _one_encoder_cacr(
            query,
            queue,
            attraction_temperature,
            repulsion_temperature,
            attraction_weight,
            repulsion_weight,
            intra_batch=intra_batch,
            weight_gradients=weight_gradients,
            normalize=normalize,
            reduction=reduction,
            gather=gather,
        )
    n, d = _check_query(query)
    _check_embedding(
        "key",
        key,
        query,
        "(N, D) or (U, N, D)",
        lambda shape: len(shape) in (2, 3) and shape[-2:] == (n, d) and shape[0] > 0,
    )
    if queue is not None:
        _check_embedding(
            "queue", queue, query, "(M, D)", lambda shape: shape[1:] == (d,), same_dtype=False
        )
    check_finite(query=query, key=key, queue=queue)
    group = distributed.resolve_group(gather) if intra_batch else None
    compute = compute_dtype_of(query.dtype)
    with autocast_disabled(query.device.type):
        views = _prepared(query, normalize=normalize, dtype=compute)
        views = views if views.dim() == 3 else views.unsqueeze(0)  # (V, N, D)
        key_views = _prepared(key, normalize=normalize, dtype=compute)
        key_views = key_views if key_views.dim() == 3 else key_views.unsqueeze(0)  # (U, N, D)
        attraction = _attraction(
            views,
            key_views,
            attraction_temperature,
            leave_own_view_out=query.dim() == 3 and key.dim() == 3 and len(query) == len(key) >= 2,
            weight_gradients=False,
        )
        if queue is not None:
            # A private copy when a backward will read it: the caller may update the queue in
            # place (MoCo enqueues inside forward) before the backward.
            queue = _prepared(
                queue.detach(), normalize=normalize, dtype=compute, copy=torch.is_grad_enabled()
            )
        cost, excluded = _negative_costs(views, queue, intra_batch=intra_batch, group=group)
        # The official queue code lets gradient into the intra-batch distances inside w⁻ only.
        live_from = (0 if queue is None else len(queue)) if weight_gradients else cost.shape[-1]
        repulsion = _repulsion(cost, excluded, repulsion_temperature, live_from)
        # NumPy numbers multiply tensors as Python's do (and stay traced under torch.compile).
        weights = cast("tuple[Scalar, Scalar]", (attraction_weight, repulsion_weight))
        losses = weights[0] * attraction - weights[1] * repulsion
    return reduce_losses(losses if query.dim() == 3 else losses.squeeze(0), reduction)


def _negative_costs(
    views: Tensor, queue: Tensor | None, *, intra_batch: bool, group
) -> tuple[Tensor, Tensor]:
    """c⁻ = ‖q − n‖² of each view and row to the K columns [queue, every rank's queries of the
    view], (V, N, K), and the (N, K) columns that are not negatives of a row: its own query."""
    n = views.shape[1]
    costs, excluded = [], []
    if queue is not None:
        costs.append(_squared_distances(views, queue))
        excluded.append(torch.zeros(n, len(queue), dtype=torch.bool, device=views.device))
    if intra_batch:
        rows, offset = distributed.gather_keys(views.transpose(0, 1), group)  # (B, V, D)
        costs.append(_squared_distances(views, rows.transpose(0, 1)))
        excluded.append(F.one_hot(torch.arange(n, device=views.device) + offset, len(rows)).bool())
    negatives = sum(x.shape[1] for x in excluded) - (1 if intra_batch else 0)  # not its own query
    if negatives < 1:
        raise ValueError(
            "each row needs at least one negative: got a queue of "
            f"{0 if queue is None else len(queue)} entries and intra_batch="
            f"{intra_batch} with a batch of {n} row(s)"
        )
    return torch.cat(costs, -1), torch.cat(excluded, -1)


def _one_encoder_cacr(
    views: Tensor,
    queue: Tensor | None,
    attraction_temperature,
    repulsion_temperature,
    attraction_weight,
    repulsion_weight,
    *,
    intra_batch: bool,
    weight_gradients: bool,
    normalize: bool,
    reduction: str,
    gather,
) -> Tensor:
    """The one-encoder form of :func:`cacr_loss` (``key`` None): per row (N,), α·mean_v Σ_u w⁺ c⁺
    over the other views, minus β·mean over pairs x < y of Σ_{j≠i} w⁻ c⁻ (row i of view x
    against the rows of view y)."""
    check_float_tensor("query", views)
    if views.dim() != 3 or len(views) < 2 or views.shape[1] == 0 or views.shape[2] == 0:
        raise ValueError(
            "cacr_loss without a key takes query as (V, N, D) views of one encoder with V ≥ 2, "
            f"got shape {tuple(views.shape)}"
        )
    if queue is not None or not intra_batch:
        raise ValueError(
            "cacr_loss without a key (the one-encoder form) takes no queue and intra_batch=True: "
            "its negatives are the other rows of the other views"
        )
    check_finite(query=views)
    group = distributed.resolve_group(gather)
    compute = compute_dtype_of(views.dtype)
    with autocast_disabled(views.device.type):
        views = _prepared(views, normalize=normalize, dtype=compute)
        attraction = _attraction(
            views,
            views,
            attraction_temperature,
            leave_own_view_out=True,
            weight_gradients=weight_gradients,
        ).mean(0)
        every, offset = distributed.gather_keys(views.transpose(0, 1), group)  # (B, V, D)
        n = views.shape[1]
        if len(every) < 2:
            raise ValueError(
                "each row needs at least one negative: the one-encoder form of cacr_loss needs a "
                f"batch of at least 2 samples (across every rank), got {len(every)}"
            )
        excluded = F.one_hot(torch.arange(n, device=views.device) + offset, len(every)).bool()
        live_from = 0 if weight_gradients else len(every)
        pairs = [
            _repulsion(
                _squared_distances(views[x], every[:, y]),
                excluded,
                repulsion_temperature,
                live_from,
            )
            for x in range(len(views))
            for y in range(x + 1, len(views))
        ]
        losses = attraction_weight * attraction - repulsion_weight * torch.stack(pairs).mean(0)
    return reduce_losses(losses, reduction)


def _attraction(
    views: Tensor,
    key_views: Tensor,
    temperature,
    *,
    leave_own_view_out: bool,
    weight_gradients: bool,
) -> Tensor:
    """Σ_u w⁺_u c⁺_u per view and row, (V, N), with c⁺_u = ‖q − k_u‖², w⁺ = softmax_u(τ⁺·c⁺)
    (constant unless ``weight_gradients``)."""
    cost = (views.unsqueeze(1) - key_views.unsqueeze(0)).pow(2).sum(-1)  # (V, U, N)
    logits = constant(temperature) * (cost if weight_gradients else cost.detach())
    if leave_own_view_out:
        own = torch.eye(len(views), dtype=torch.bool, device=views.device).unsqueeze(-1)
        logits = logits.masked_fill(own, float("-inf"))
    return (torch.softmax(logits, 1) * cost).sum(1)


def _repulsion(cost: Tensor, excluded: Tensor, temperature, live_from: int) -> Tensor:
    """Σ_j w⁻_j c⁻_j per row, over the columns of ``cost`` (..., N, K) that are not ``excluded``
    (N, K), with w⁻ = softmax_j(−τ⁻·c⁻); an excluded column weighs exactly 0. Gradient flows into
    w⁻ through the columns from ``live_from`` on (none when ``live_from`` is K)."""
    inside = torch.cat([cost[..., :live_from].detach(), cost[..., live_from:]], -1)
    logits = (-constant(temperature) * inside).masked_fill(excluded, float("-inf"))
    return (torch.softmax(logits, -1) * cost).sum(-1)


def _squared_distances(x: Tensor, bank: Tensor) -> Tensor:
    """‖x_i − b_j‖² = ‖x_i‖² + ‖b_j‖² − 2 x_i·b_j, (..., N, B), for x (..., N, D) and bank
    (..., B, D)."""
    return (x * x).sum(-1, keepdim=True) + (bank * bank).sum(-1).unsqueeze(-2) - 2 * x @ bank.mT


def reco_loss(
    query: Tensor,
    key: Tensor,
    queue: Tensor,
    *,
    weak_key: Tensor,
    weak_queue: Tensor,
    mixed_query: Tensor,
    mixed_key: Tensor,
    temperature: HyperParameter = 0.2,
    relation_temperature: HyperParameter = 0.1,
    target_temperature: HyperParameter = 0.04,
    global_weight: HyperParameter = 1.0,
    local_weight: HyperParameter = 1.0,
    normalize: bool = False,
    reduction: str = "mean",
    gather: bool | torch.distributed.ProcessGroup = False,
    backend: str = "auto",
) -> Tensor:
    """ReCo: loss_i = InfoNCE(query_i; key_i, queue; τ)
    + λ₁·[−Σ_j softmax_j(weak_key_i·weak_queue_j / τ_t) · log softmax_j(query_i·weak_queue_j / τ_s)]
    + λ₂·InfoNCE(mixed_query_i; mixed_key_i, queue; τ).

    That is :func:`info_nce_loss` + λ₁·:func:`ressl_loss` (queue mode, against the queue of
    weak-view keys, target from ``weak_key``) + λ₂·:func:`info_nce_loss` of the embedding of a
    CutMix image, computed by those functions (``backend``, ``gather`` and ``normalize`` are
    passed through).
    ``mixed_key`` (see :func:`interpolated_key`) and ``weak_key`` never get a gradient.

    Args:
        query: online embeddings of the strong view, (N, D) or (V, N, D).
        key: target embeddings of the key view, (N, D); the positive of the first term.
        queue: (M, D) bank of past keys: the negatives of both InfoNCE terms.
        weak_key: target embeddings of the weak view (crop and flip), (N, D).
        weak_queue: (M', D) bank of past weak keys: the relation term's candidates.
        mixed_query: online embeddings of the CutMix images, (N, D) or the query's shape.
        mixed_key: the positives of the mixed images, (N, D).
        temperature: τ of both InfoNCE terms. relation_temperature: τ_s of the online relation.
        target_temperature: τ_t of the weak-key relation (the constant target).
        global_weight: λ₁ ≥ 0, the relation term's. local_weight: λ₂ ≥ 0, the mixed term's.
        reduction: "mean" (default), "sum" or "none": per-row sums of the three terms, shape (N,)
            or (V, N) (a (N, D) ``mixed_query`` counts once per view).
        gather: passed through; in queue mode the rows are independent and nothing is gathered.
        backend: passed through: "auto", "reference", "chunked" or "fused".
    """
    check_reco_options(
        temperature=temperature,
        relation_temperature=relation_temperature,
        target_temperature=target_temperature,
        global_weight=global_weight,
        local_weight=local_weight,
        normalize=normalize,
        reduction=reduction,
        gather=gather,
        backend=backend,
    )
    n, d = _check_query(query)
    rows = lambda shape: shape == (n, d)  # noqa: E731
    bank = lambda shape: len(shape) == 2 and shape[0] > 0 and shape[1] == d  # noqa: E731
    _check_embedding("key", key, query, "(N, D)", rows)
    _check_embedding("queue", queue, query, "(M, D) with M ≥ 1", bank, same_dtype=False)
    _check_embedding("weak_key", weak_key, query, "(N, D)", rows)
    _check_embedding("weak_queue", weak_queue, query, "(M, D) with M ≥ 1", bank, same_dtype=False)
    _check_embedding(
        "mixed_query",
        mixed_query,
        query,
        f"(N, D) or the query's shape {tuple(query.shape)}",
        lambda shape: shape in ((n, d), query.shape),
    )
    _check_embedding("mixed_key", mixed_key, query, "(N, D)", rows)
    check_finite(
        query=query,
        key=key,
        queue=queue,
        weak_key=weak_key,
        weak_queue=weak_queue,
        mixed_query=mixed_query,
        mixed_key=mixed_key,
    )
    options: dict[str, Any] = dict(
        normalize=normalize, reduction="none", gather=gather, backend=backend
    )
    instance = info_nce_loss(query, key, queue, temperature=temperature, **options)
    relation = ressl_loss(
        query,
        weak_key.detach(),
        weak_queue,
        temperature=relation_temperature,
        target_temperature=target_temperature,
        **options,
    )
    local = info_nce_loss(
        mixed_query, mixed_key.detach(), queue, temperature=temperature, **options
    )
    weights = cast("tuple[Scalar, Scalar]", (global_weight, local_weight))  # as in cacr_loss
    return reduce_losses(instance + weights[0] * relation + weights[1] * local, reduction)


@torch.no_grad()
def interpolated_key(query: Tensor, key: Tensor, index: Tensor, ratio: Scalar) -> Tensor:
    """ReCo's target of a CutMix image: normalise(r·query_i + (1 − r)·key_index[i]), no gradient.

    ``query`` (N, D) embeds the image the mix kept a share ``ratio`` r ∈ [0, 1] of (a float, a 0-d
    tensor, or an (N,) tensor of per-row shares); ``index`` (N,) is the permutation that paired
    row i with key row index[i]; ``key`` (B, D). Returns (N, D) in the query's dtype.
    """
    n, d = _check_query(query, ranks=(2,))
    _check_embedding(
        "key",
        key,
        query,
        "(B, D)",
        lambda shape: len(shape) == 2 and shape[0] > 0 and shape[1] == d,
    )
    check_finite(query=query, key=key)
    if not isinstance(index, Tensor) or index.dtype not in (torch.int64, torch.int32):
        kind = f"a {index.dtype} tensor" if isinstance(index, Tensor) else type(index).__name__
        raise TypeError(f"index must be an int64 or int32 tensor, got {kind}")
    if index.shape != (n,) or index.device != query.device:
        raise ValueError(
            f"index must be ({n},) on query's device {query.device}, got shape "
            f"{tuple(index.shape)} on {index.device}"
        )
    if (
        not tracing()
        and index.device.type == "cpu"
        and (index.min() < 0 or index.max() >= len(key))
    ):
        raise ValueError(
            f"index must hold rows of key, in [0, {len(key)}), got values in "
            f"[{int(index.min())}, {int(index.max())}]"
        )
    if isinstance(ratio, Tensor) and ratio.dim() == 1:
        _check_ratio_rows(ratio, n, query)
        ratio = ratio.unsqueeze(-1)
    else:
        _check_range("ratio", ratio, high=1.0)
        ratio = traceable_scalar(ratio, query.device)  # a NumPy number as a Python one
    compute = compute_dtype_of(query.dtype)
    mixed = ratio * query.to(compute) + (1 - ratio) * key.to(compute)[index]
    return F.normalize(mixed, dim=-1).to(query.dtype)


# -- argument checks --------------------------------------------------------------------------


def check_cacr_options(**options) -> None:
    """Check keyword arguments of :func:`cacr_loss` by name, as
    :func:`~sce_loss.arguments.check_by_name`."""
    check_by_name(_CACR_CHECKS, **options)


def check_reco_options(**options) -> None:
    """Check keyword arguments of :func:`reco_loss` by name, as
    :func:`~sce_loss.arguments.check_by_name`."""
    check_by_name(_RECO_CHECKS, **options)


def _check_cacr_backend(name: str, value) -> None:
    if value not in CACR_BACKENDS:
        raise ValueError(
            f"{name} must be one of {CACR_BACKENDS} for cacr_loss (it runs on the "
            f"reference), got {value!r}"
        )


def _check_query(query, ranks=(2, 3)) -> tuple[int, int]:
    """``query`` is a non-empty float tensor of one of the ``ranks`` (2: (N, D); 3: (V, N, D));
    returns (N, D)."""
    check_float_tensor("query", query)
    shapes = {2: "(N, D)", 3: "(V, N, D)"}
    if query.dim() not in ranks:
        raise ValueError(
            f"query must be {' or '.join(shapes[r] for r in ranks)}, got shape {tuple(query.shape)}"
        )
    if query.numel() == 0:
        raise ValueError(f"query must be non-empty, got shape {tuple(query.shape)}")
    return tuple(query.shape[-2:])


def _check_embedding(
    name: str, value, query: Tensor, expected: str, fits, same_dtype: bool = True
) -> None:
    """``value`` is a float tensor on the query's device whose shape ``fits`` (a predicate), with
    the query's dtype if ``same_dtype``."""
    check_float_tensor(name, value)
    if not fits(value.shape):
        n, d = query.shape[-2:]
        raise ValueError(
            f"{name} must be {expected}, got shape {tuple(value.shape)} (query: N={n}, D={d})"
        )
    if same_dtype and value.dtype != query.dtype:
        raise TypeError(f"{name} must have query's dtype {query.dtype}, got {value.dtype}")
    if value.device != query.device:
        raise ValueError(f"{name} must be on query's device {query.device}, got {value.device}")


def _check_non_negative(name: str, value) -> None:
    _check_range(name, value, high=float("inf"))


def _check_range(name: str, value, high: float) -> None:
    """A float or 0-d tensor in [0, high] (its value is checked where it is free to read)."""
    number = scalar_value(name, value)
    # Comparisons only, as arguments.check_temperature: NaN and ±inf fail them.
    if number is not None and not (0 <= number <= high and number <= LARGEST_FLOAT):
        interval = "≥ 0" if high == float("inf") else f"in [0, {high:g}]"
        raise ValueError(f"{name} must be a finite number {interval}, got {number}")


def _check_ratio_rows(ratio: Tensor, n: int, query: Tensor) -> None:
    if not ratio.is_floating_point() or ratio.shape != (n,):
        raise TypeError(
            f"ratio must be a float, a 0-d float tensor or a ({n},) float tensor, got "
            f"a {ratio.dtype} tensor of shape {tuple(ratio.shape)}"
        )
    if ratio.device != query.device:
        raise ValueError(f"ratio must be on query's device {query.device}, got {ratio.device}")
    if not tracing() and ratio.device.type == "cpu" and not ((ratio >= 0) & (ratio <= 1)).all():
        raise ValueError("ratio must hold numbers in [0, 1]")


_CACR_CHECKS = SHARED_CHECKS | {
    "attraction_temperature": _check_non_negative,
    "repulsion_temperature": _check_non_negative,
    "attraction_weight": _check_non_negative,
    "repulsion_weight": _check_non_negative,
    "intra_batch": check_bool,
    "weight_gradients": check_bool,
    "backend": _check_cacr_backend,
}
_RECO_CHECKS = SHARED_CHECKS | {
    "temperature": check_temperature,
    "relation_temperature": check_temperature,
    "target_temperature": check_temperature,
    "global_weight": _check_non_negative,
    "local_weight": _check_non_negative,
    "backend": check_backend,
}


# -- helpers ----------------------------------------------------------------------------------


def _prepared(x: Tensor, *, normalize: bool, dtype: torch.dtype, copy: bool = False) -> Tensor:
    """``x`` in the compute ``dtype``, L2-normalised along its last dimension if asked."""
    x = x.to(dtype, copy=copy)
    return F.normalize(x, dim=-1) if normalize else x
