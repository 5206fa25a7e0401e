"""nn.Module wrappers: they hold the hyper-parameters (and optionally a queue) and call the
functions of :mod:`sce_loss.functional`.

Hyper-parameters are plain attributes, checked in ``__init__``, so a scheduler may set them
(``criterion.temperature = 0.05``); an ``nn.Parameter`` (a learnable τ) is a registered parameter:
in ``parameters()`` and ``state_dict``, moved by ``.to()``. The keyword arguments of each module are
those of its function (tests/test_drop_in.py checks that they cannot drift).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from . import functional, relational
from .problem import HyperParameter
from .queue import MemoryQueue


class _ContrastiveLoss(nn.Module):
    """Holds the options (checked when built) and optionally a ``MemoryQueue``; calls
    ``loss_fn(query, key, queue, **options)`` with the queue passed to ``forward``, else the held
    queue's keys, else none (in-batch mode). A held queue is saved in ``state_dict``; push to it
    (``module.queue.push(key)``) after the loss."""

    loss_fn: ClassVar[Callable[..., Tensor]] = staticmethod(functional.info_nce_loss)
    check_options: ClassVar[Callable[..., None]] = staticmethod(functional.check_options)

    def __init__(self, queue: MemoryQueue | None, **options: Any) -> None:
        super().__init__()
        if queue is not None and not isinstance(queue, MemoryQueue):
            raise TypeError(f"queue must be a MemoryQueue or None, got {type(queue).__name__}")
        self.check_options(**options)
        if queue is not None and options.get("symmetric"):
            raise ValueError("symmetric=True compares in-batch embeddings only: hold no queue")
        self.queue = queue
        self._option_names = tuple(options)
        for name, value in options.items():
            setattr(self, name, value)  # an nn.Parameter registers itself

    def _options(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._option_names}

    def extra_repr(self) -> str:
        return ", ".join(
            f"{name}={getattr(self, name)}"
            for name in self._option_names
            if not isinstance(getattr(self, name), nn.Parameter)
        )


def _keys(passed: Tensor | None, held: MemoryQueue | None) -> Tensor | None:
    """The queue passed to ``forward``, else the held queue's keys, else None."""
    if passed is None and held is not None:
        return held.keys
    return passed


def _required(name: str, passed: Tensor | None, held: MemoryQueue | None) -> Tensor:
    """As :func:`_keys`, for a queue the loss cannot do without."""
    queue = _keys(passed, held)
    if queue is None:
        raise TypeError(
            f"{name} is required: pass it to the call, or build the module with "
            f"{name}=MemoryQueue(...)"
        )
    return queue


class _QueryKeyLoss(_ContrastiveLoss):
    """A loss of ``query``, ``key`` and an optional queue (InfoNCE, ReSSL, SCE)."""

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        queue: Tensor | None = None,
        *,
        labels: Tensor | None = None,
        queue_labels: Tensor | None = None,
    ) -> Tensor:
        """The loss of ``query`` and ``key`` (omitted: ``query`` holds V views, symmetric form)
        against ``queue`` or the held queue's keys, with optional per-sample ``labels`` (and
        ``queue_labels``, else a held labelled queue's)."""
        if queue is None and queue_labels is None and labels is not None:
            queue_labels = None if self.queue is None else self.queue.labels
        return self.loss_fn(
            query,
            key,
            _keys(queue, self.queue),
            labels=labels,
            queue_labels=queue_labels,
            **self._options(),
        )


class InfoNCELoss(_QueryKeyLoss):
    """InfoNCE (MoCo v2; NT-Xent with ``symmetric=True``) as an ``nn.Module``: it holds the
    keyword arguments of :func:`sce_loss.info_nce_loss` and calls it.

    Called as ``criterion(query, key=None, queue=None, *, labels=None)``: ``queue`` (M, D) if
    given, else the held queue's keys, else none (in-batch mode); ``key`` omitted (symmetric
    form: ``query`` holds V views) and ``labels`` give several positives per row; returns the
    loss. Every argument is keyword-only and
    becomes an attribute of the same name, checked here, that a scheduler may set
    (``criterion.temperature = 0.05``); an ``nn.Parameter`` (a learnable τ) is registered: in
    ``parameters()`` and ``state_dict``, moved by ``.to()``.

    Args:
        temperature: τ ≥ 1e-4, a float or a 0-d tensor (an ``nn.Parameter`` is learned).
        positives: "mean", "pooled" or "pairs": the loss of a row with several positives
            (labels passed to the call, or V ≥ 3 views), as :func:`sce_loss.info_nce_loss`.
        decoupled: DCL (the positives leave the denominator); in-batch or symmetric.
        weight_sigma: σ of DCLW's weights (with ``decoupled``), or None.
        queue: a ``MemoryQueue`` to hold (saved in ``state_dict``), read when no queue is passed
            to the call; push the keys to it after the loss.
        include_keys: with a queue, every in-batch key is a candidate too.
        symmetric: the SimCLR form, over two views (N, D) with gradients (no queue).
        normalize: L2-normalise query, key and queue first.
        reduction: "mean", "sum" or "none" (per-row losses).
        gather: True or a process group: every rank's keys are candidates under
            torch.distributed.
        backend: "auto", "reference", "chunked" or "fused".
    """

    loss_fn = staticmethod(functional.info_nce_loss)

    def __init__(
        self,
        *,
        temperature: HyperParameter = 0.2,
        positives: str = "mean",
        decoupled: bool = False,
        weight_sigma: HyperParameter | None = None,
        queue: MemoryQueue | None = None,
        include_keys: bool = False,
        symmetric: bool = False,
        normalize: bool = False,
        reduction: str = "mean",
        gather: bool | torch.distributed.ProcessGroup = False,
        backend: str = "auto",
    ) -> None:
        super().__init__(
            queue,
            temperature=temperature,
            positives=positives,
            decoupled=decoupled,
            weight_sigma=weight_sigma,
            include_keys=include_keys,
            symmetric=symmetric,
            normalize=normalize,
            reduction=reduction,
            gather=gather,
            backend=backend,
        )


class ReSSLLoss(_QueryKeyLoss):
    """ReSSL as an ``nn.Module``: it holds the keyword arguments of :func:`sce_loss.ressl_loss`
    and calls it.

    Called as ``criterion(query, key=None, queue=None, *, labels=None)``: ``queue`` (M, D) if
    given, else the held queue's keys, else none (in-batch mode); ``key`` omitted (symmetric
    form: ``query`` holds V views) and ``labels`` give several positives per row; returns the
    loss. Every argument is keyword-only and
    becomes an attribute of the same name, checked here, that a scheduler may set; an
    ``nn.Parameter`` (a learnable τ) is registered and saved in ``state_dict``.

    Args:
        temperature: τ ≥ 1e-4 of the online relation, a float or a 0-d tensor.
        target_temperature: τ_m ≥ 1e-4 of the target relation (no gradient reaches it).
        queue: a ``MemoryQueue`` to hold (saved in ``state_dict``), read when no queue is passed
            to the call; push the keys to it after the loss.
        include_keys: with a queue, every in-batch key is a candidate too.
        symmetric: the SimCLR form, over two views (N, D) with gradients (no queue).
        normalize: L2-normalise query, key and queue first.
        reduction: "mean", "sum" or "none" (per-row losses).
        gather: True or a process group: every rank's keys are candidates under
            torch.distributed.
        backend: "auto", "reference", "chunked" or "fused".
    """

    loss_fn = staticmethod(functional.ressl_loss)

    def __init__(
        self,
        *,
        temperature: HyperParameter = 0.1,
        target_temperature: HyperParameter = 0.04,
        queue: MemoryQueue | None = None,
        include_keys: bool = False,
        symmetric: bool = False,
        normalize: bool = False,
        reduction: str = "mean",
        gather: bool | torch.distributed.ProcessGroup = False,
        backend: str = "auto",
    ) -> None:
        super().__init__(
            queue,
            temperature=temperature,
            target_temperature=target_temperature,
            include_keys=include_keys,
            symmetric=symmetric,
            normalize=normalize,
            reduction=reduction,
            gather=gather,
            backend=backend,
        )


class SCELoss(_QueryKeyLoss):
    """SCE (Similarity Contrastive Estimation) as an ``nn.Module``: it holds the keyword arguments
    of :func:`sce_loss.sce_loss` and calls it.

    Called as ``criterion(query, key=None, queue=None, *, labels=None)``: ``queue`` (M, D) if
    given, else the held queue's keys, else none (in-batch mode); ``key`` omitted (symmetric
    form: ``query`` holds V views) and ``labels`` give several positives per row; returns the
    loss. Every argument is keyword-only and
    becomes an attribute of the same name, checked here, that a scheduler may set
    (``criterion.coeff = 0.3``); an ``nn.Parameter`` (a learnable τ) is registered and saved in
    ``state_dict``.

    Args:
        coeff: λ in [0, 1], the positive's share of the target (1 is InfoNCE).
        temperature: τ ≥ 1e-4 of the online similarities, a float or a 0-d tensor.
        target_temperature: τ_m ≥ 1e-4 of the target's relation (no gradient reaches it).
        queue: a ``MemoryQueue`` to hold (saved in ``state_dict``), read when no queue is passed
            to the call; push the keys to it after the loss.
        include_keys: with a queue, every in-batch key is a candidate too.
        symmetric: the SimCLR form, over two views (N, D) with gradients (no queue).
        normalize: L2-normalise query, key and queue first.
        reduction: "mean", "sum" or "none" (per-row losses).
        gather: True or a process group: every rank's keys are candidates under
            torch.distributed.
        backend: "auto", "reference", "chunked" or "fused".
    """

    loss_fn = staticmethod(functional.sce_loss)

    def __init__(
        self,
        *,
        coeff: HyperParameter = 0.5,
        temperature: HyperParameter = 0.1,
        target_temperature: HyperParameter = 0.05,
        queue: MemoryQueue | None = None,
        include_keys: bool = False,
        symmetric: bool = False,
        normalize: bool = False,
        reduction: str = "mean",
        gather: bool | torch.distributed.ProcessGroup = False,
        backend: str = "auto",
    ) -> None:
        super().__init__(
            queue,
            coeff=coeff,
            temperature=temperature,
            target_temperature=target_temperature,
            include_keys=include_keys,
            symmetric=symmetric,
            normalize=normalize,
            reduction=reduction,
            gather=gather,
            backend=backend,
        )


class CACRLoss(_ContrastiveLoss):
    """CACR as an ``nn.Module``: it holds the keyword arguments of :func:`sce_loss.cacr_loss` and
    calls it.

    Called as ``criterion(query, key=None, queue=None)``: ``key`` (N, D) or (U, N, D), or None for
    the one-encoder form ``criterion(views)``; ``queue`` (M, D) if given, else the held queue's
    keys, else none. Every argument is keyword-only and becomes an attribute of the same name,
    checked here, that a scheduler may set; an ``nn.Parameter`` is registered and saved in
    ``state_dict``.

    Args:
        attraction_temperature: τ⁺ ≥ 0 of the positives' weights (0: equal weights).
        repulsion_temperature: τ⁻ ≥ 0 of the negatives' weights (0: equal weights).
        attraction_weight: α ≥ 0, the attraction term's weight.
        repulsion_weight: β ≥ 0, the repulsion term's weight.
        queue: a ``MemoryQueue`` to hold (saved in ``state_dict``), read when no queue is passed
            to the call; push the keys to it after the loss.
        intra_batch: the other rows of the same query view are negatives too.
        weight_gradients: let gradient flow through the weights where the official code does.
        normalize: L2-normalise query, key and queue first.
        reduction: "mean", "sum" or "none" (per-row losses).
        gather: True or a process group: the intra-batch negatives are every rank's queries.
        backend: "auto" or "reference".
    """

    loss_fn = staticmethod(relational.cacr_loss)
    check_options = staticmethod(relational.check_cacr_options)

    def __init__(
        self,
        *,
        attraction_temperature: HyperParameter = 1.0,
        repulsion_temperature: HyperParameter = 1.0,
        attraction_weight: HyperParameter = 1.0,
        repulsion_weight: HyperParameter = 1.0,
        queue: MemoryQueue | None = None,
        intra_batch: bool = True,
        weight_gradients: bool = False,
        normalize: bool = False,
        reduction: str = "mean",
        gather: bool | torch.distributed.ProcessGroup = False,
        backend: str = "auto",
    ) -> None:
        super().__init__(
            queue,
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

    def forward(
        self, query: Tensor, key: Tensor | None = None, queue: Tensor | None = None
    ) -> Tensor:
        return self.loss_fn(query, key, _keys(queue, self.queue), **self._options())


class ReCoLoss(_ContrastiveLoss):
    """ReCo as an ``nn.Module``: it holds the keyword arguments of :func:`sce_loss.reco_loss` and
    calls it, and may hold both of its queues, each saved in ``state_dict``.

    Called as ``criterion(query, key, queue=None, *, weak_key, weak_queue=None, mixed_query,
    mixed_key)``: a queue not passed is the held one's keys. After the backward, push ``key`` to
    ``criterion.queue`` and ``weak_key`` to ``criterion.weak_queue``. Every other argument is
    keyword-only and becomes an attribute of the same name, checked here, that a scheduler may
    set; an ``nn.Parameter`` is registered and saved in ``state_dict``.

    Args:
        temperature: τ of both InfoNCE terms.
        relation_temperature: τ_s of the online relation (the relation term's prediction).
        target_temperature: τ_t of the weak keys' relation (the relation term's target).
        global_weight: λ₁ ≥ 0, the relation term's weight.
        local_weight: λ₂ ≥ 0, the mixed (CutMix) term's weight.
        queue: a ``MemoryQueue`` of keys to hold: the negatives of both InfoNCE terms.
        weak_queue: a ``MemoryQueue`` of weak-view keys to hold: the relation term's candidates.
        normalize: L2-normalise every embedding and queue first.
        reduction: "mean", "sum" or "none" (per-row losses).
        gather: True or a process group, passed through.
        backend: "auto", "reference", "chunked" or "fused", passed through.
    """

    loss_fn = staticmethod(relational.reco_loss)
    check_options = staticmethod(relational.check_reco_options)

    def __init__(
        self,
        *,
        temperature: HyperParameter = 0.2,
        relation_temperature: HyperParameter = 0.1,
        target_temperature: HyperParameter = 0.04,
        global_weight: HyperParameter = 1.0,
        local_weight: HyperParameter = 1.0,
        queue: MemoryQueue | None = None,
        weak_queue: MemoryQueue | None = None,
        normalize: bool = False,
        reduction: str = "mean",
        gather: bool | torch.distributed.ProcessGroup = False,
        backend: str = "auto",
    ) -> None:
        super().__init__(
            queue,
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
        if weak_queue is not None and not isinstance(weak_queue, MemoryQueue):
            raise TypeError(
                f"weak_queue must be a MemoryQueue or None, got {type(weak_queue).__name__}"
            )
        self.weak_queue = weak_queue

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        queue: Tensor | None = None,
        *,
        weak_key: Tensor,
        weak_queue: Tensor | None = None,
        mixed_query: Tensor,
        mixed_key: Tensor,
    ) -> Tensor:
        return self.loss_fn(
            query,
            key,
            _required("queue", queue, self.queue),
            weak_key=weak_key,
            weak_queue=_required("weak_queue", weak_queue, self.weak_queue),
            mixed_query=mixed_query,
            mixed_key=mixed_key,
            **self._options(),
        )
