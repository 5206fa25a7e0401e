"""The public API as a user's type checker sees it: mypy checks this file in CI (pyproject's
[tool.mypy] ``files``); pytest does not collect it, and running it runs each call once on the CPU.

Every call below must type-check, and each wrong call must be an error of the code in its
``# type: ignore[...]``: with ``warn_unused_ignores``, an ignore that mypy no longer needs is an
error itself, so an annotation lost to ``Any`` (or a wrong one) fails the check. A module's call
goes through ``nn.Module.__call__``, which torch types ``Callable[..., Any]``: what is checked of a
module is its construction (and ``MemoryQueue.push``), not the arguments of ``criterion(...)``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from sce_loss import (
    CACRLoss,
    InfoNCELoss,
    MemoryQueue,
    ReCoLoss,
    ReSSLLoss,
    SCELoss,
    cacr_loss,
    info_nce_loss,
    interpolated_key,
    reco_loss,
    ressl_loss,
    sce_loss,
)


def unit(*shape: int) -> Tensor:
    return F.normalize(torch.randn(*shape), dim=-1)


def the_functions() -> list[Tensor]:
    query, key, queue = unit(8, 16).requires_grad_(), unit(8, 16), unit(32, 16)
    tau = torch.nn.Parameter(torch.tensor(0.1))
    mixed_key = interpolated_key(query, key, torch.randperm(8), 0.6)
    losses = [
        sce_loss(query, key, queue),
        sce_loss(query, key, queue, coeff=0.5, temperature=tau, target_temperature=0.05),
        info_nce_loss(query, key, temperature=0.2, symmetric=True, reduction="sum"),
        sce_loss(query, key, coeff=np.float64(0.5), temperature=np.float32(0.1)),  # NumPy numbers
        sce_loss(torch.stack([query, key]), symmetric=True, labels=torch.arange(8) % 2),
        info_nce_loss(
            query, key, queue, labels=torch.arange(8), queue_labels=torch.zeros(32).long()
        ),
        ressl_loss(query, key, queue, include_keys=True, backend="chunked"),
        cacr_loss(unit(3, 8, 16)),
        reco_loss(
            query,
            key,
            queue,
            weak_key=unit(8, 16),
            weak_queue=unit(32, 16),
            mixed_query=unit(8, 16),
            mixed_key=mixed_key,
        ),
    ]
    return losses


def the_modules() -> list[Tensor]:
    query, key = unit(8, 16).requires_grad_(), unit(8, 16)
    queue = MemoryQueue(32, 16, torch.float32, seed=1)
    MemoryQueue(32, 16, labels=True).push(key, torch.arange(8))
    criterion = SCELoss(coeff=0.5, temperature=0.1, queue=queue)
    losses = [
        criterion(query, key),
        InfoNCELoss(temperature=0.5, symmetric=True, normalize=True)(query, key),
        ReSSLLoss(target_temperature=0.04)(query, key, unit(32, 16)),
        CACRLoss(repulsion_weight=0.5)(unit(2, 8, 16)),
        ReCoLoss(queue=MemoryQueue(32, 16), weak_queue=MemoryQueue(32, 16))(
            query, key, weak_key=unit(8, 16), mixed_query=unit(8, 16), mixed_key=unit(8, 16)
        ),
    ]
    queue.push(key)
    return losses


def wrong_calls(query: Tensor, key: Tensor, queue: Tensor, bank: MemoryQueue) -> None:
    """Calls a user's type checker must refuse (never run: each would raise)."""
    sce_loss(query, key, queue, temperature="0.1")  # type: ignore[arg-type]
    info_nce_loss(query, [0.0], queue)  # type: ignore[arg-type]
    ressl_loss(query, key, queue, normalize="yes")  # type: ignore[arg-type]
    cacr_loss(query, key, queue, intra_batch=None)  # type: ignore[arg-type]
    reco_loss(query, key, queue, weak_key=key)  # type: ignore[call-arg]
    SCELoss(temperature="hot")  # type: ignore[arg-type]
    SCELoss(queue=queue)  # type: ignore[arg-type]
    SCELoss(0.5)  # type: ignore[call-arg]
    CACRLoss(intra_batch=None)  # type: ignore[arg-type]
    MemoryQueue("32", 16)  # type: ignore[arg-type]
    MemoryQueue(32, 16, gather="yes")  # type: ignore[arg-type]
    bank.push([0.0] * 16)  # type: ignore[arg-type]


if __name__ == "__main__":
    for loss in the_functions() + the_modules():
        assert loss.dim() == 0 and torch.isfinite(loss)
    print("the typed calls run")
