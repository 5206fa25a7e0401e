"""nn.Module wrappers: they hold the hyper-parameters (and optionally a queue) and call the
functions of :mod:`sce_loss.functional`.

Hyper-parameters are plain attributes, checked in ``__init__``, so a scheduler may set them
(``criterion.temperature = 0.05``); an ``nn.Parameter`` (a learnable τ) is a registered parameter:
in ``parameters()`` and ``state_dict``, moved by ``.to()``. The keyword arguments of each module are
those of its function (tests/test_drop_in.py checks that they cannot drift).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import functional, relational
from .queue import MemoryQueue


class _ContrastiveLoss(nn.Module):
    """Calls ``loss_fn(query, key, queue, **options)``; the queue is the one passed to ``forward``,
    else the held ``MemoryQueue``'s keys, else none (in-batch mode). A held queue is saved in
    ``state_dict``; push to it (``module.queue.push(key)``) after the loss."""

    loss_fn = staticmethod(functional.info_nce_loss)
    check_options = staticmethod(functional.check_options)

    def __init__(self, queue: MemoryQueue | None, **options):
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

    def forward(
        self, query: Tensor, key: Tensor | None = None, queue: Tensor | None = None
    ) -> Tensor:
        if queue is None and self.queue is not None:
            queue = self.queue.keys
        return self.loss_fn(
            query, key, queue, **{name: getattr(self, name) for name in self._option_names}
        )

    def extra_repr(self) -> str:
        return ", ".join(
            f"{name}={getattr(self, name)}"
            for name in self._option_names
            if not isinstance(getattr(self, name), nn.Parameter)
        )


class InfoNCELoss(_ContrastiveLoss):
    """:func:`sce_loss.info_nce_loss` as a module."""

    loss_fn = staticmethod(functional.info_nce_loss)

    def __init__(
        self,
        *,
        temperature=0.2,
        queue: MemoryQueue | None = None,
        include_keys=False,
        symmetric=False,
        normalize=False,
        reduction="mean",
        gather: bool | torch.distributed.ProcessGroup = False,
        backend="auto",
    ):
        super().__init__(
            queue,
            temperature=temperature,
            include_keys=include_keys,
            symmetric=symmetric,
            normalize=normalize,
            reduction=reduction,
            gather=gather,
            backend=backend,
        )


class ReSSLLoss(_ContrastiveLoss):
    """:func:`sce_loss.ressl_loss` as a module."""

    loss_fn = staticmethod(functional.ressl_loss)

    def __init__(
        self,
        *,
        temperature=0.1,
        target_temperature=0.04,
        queue: MemoryQueue | None = None,
        include_keys=False,
        symmetric=False,
        normalize=False,
        reduction="mean",
        gather: bool | torch.distributed.ProcessGroup = False,
        backend="auto",
    ):
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


class SCELoss(_ContrastiveLoss):
    """:func:`sce_loss.sce_loss` as a module."""

    loss_fn = staticmethod(functional.sce_loss)

    def __init__(
        self,
        *,
        coeff=0.5,
        temperature=0.1,
        target_temperature=0.05,
        queue: MemoryQueue | None = None,
        include_keys=False,
        symmetric=False,
        normalize=False,
        reduction="mean",
        gather: bool | torch.distributed.ProcessGroup = False,
        backend="auto",
    ):
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
    """:func:`sce_loss.cacr_loss` as a module (``key`` may be (N, D) or (U, N, D))."""

    loss_fn = staticmethod(relational.cacr_loss)
    check_options = staticmethod(relational.check_cacr_options)

    def __init__(
        self,
        *,
        attraction_temperature=1.0,
        repulsion_temperature=1.0,
        attraction_weight=1.0,
        repulsion_weight=1.0,
        queue: MemoryQueue | None = None,
        intra_batch=True,
        weight_gradients=False,
        normalize=False,
        reduction="mean",
        gather: bool | torch.distributed.ProcessGroup = False,
        backend="auto",
    ):
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


class ReCoLoss(_ContrastiveLoss):
    """:func:`sce_loss.reco_loss` as a module. It may hold both queues: ``queue`` (keys) and
    ``weak_queue`` (weak-view keys), both saved in ``state_dict``; after the backward push
    ``key`` to ``module.queue`` and ``weak_key`` to ``module.weak_queue``."""

    loss_fn = staticmethod(relational.reco_loss)
    check_options = staticmethod(relational.check_reco_options)

    def __init__(
        self,
        *,
        temperature=0.2,
        relation_temperature=0.1,
        target_temperature=0.04,
        global_weight=1.0,
        local_weight=1.0,
        queue: MemoryQueue | None = None,
        weak_queue: MemoryQueue | None = None,
        normalize=False,
        reduction="mean",
        gather: bool | torch.distributed.ProcessGroup = False,
        backend="auto",
    ):
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
        if queue is None and self.queue is not None:
            queue = self.queue.keys
        if weak_queue is None and self.weak_queue is not None:
            weak_queue = self.weak_queue.keys
        return self.loss_fn(
            query,
            key,
            queue,
            weak_key=weak_key,
            weak_queue=weak_queue,
            mixed_query=mixed_query,
            mixed_key=mixed_key,
            **{name: getattr(self, name) for name in self._option_names},
        )
