"""The seam between the public functions and the backends: one checked loss evaluation.

:mod:`sce_loss.functional` checks the arguments, normalises, gathers keys and builds a
:class:`Problem`; a backend (:mod:`~sce_loss.reference`, :mod:`~sce_loss.chunked`,
:mod:`~sce_loss.fused`) implements two functions over it::

    unsupported_reason(problem) -> str | None   # why it cannot serve this problem, or None
    losses(problem) -> Tensor                    # per-row losses, shape (V, N)

Row i's candidates and positive (README, "The mathematics"): ``bank`` (the in-batch keys, every
rank's when gathered; positive at ``offset + i``) followed by ``queue``; with no ``bank``
(plain queue mode) the candidates are [z²_i, queue] and the positive is the row's own key, column 0.

All three losses are one family: SCE with target weight λ = ``coeff`` on the positive, InfoNCE is
λ = 1 (no target needed), ReSSL is λ = 0 with the positive left out of the online softmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

Scalar = float | Tensor
LOSSES = ("info_nce", "ressl", "sce")


@dataclass(frozen=True)
class Problem:
    """One loss evaluation, arguments checked.

    ``query`` is (V, N, D), ``key`` (N, D), ``bank`` (B, D) or None, ``queue`` (M, D) or None
    (detached, in its stored dtype). ``query``, ``key`` and ``bank`` share ``dtype``, the dtype the
    caller passed. Hyper-parameters are Python floats (possibly symbolic under torch.compile) or 0-d
    tensors; ``temperature`` may require grad. Backends return float64 losses for float64 inputs,
    float32 otherwise, and gradients in the inputs' dtypes.
    """

    loss: str  # one of LOSSES
    query: Tensor
    key: Tensor
    bank: Tensor | None
    queue: Tensor | None
    offset: int
    temperature: Scalar
    target_temperature: Scalar | None = None  # None for InfoNCE
    coeff: Scalar = 1.0  # λ; 1 for InfoNCE, 0 for ReSSL

    @property
    def dtype(self) -> torch.dtype:
        return self.query.dtype

    @property
    def compute_dtype(self) -> torch.dtype:
        """float64 for float64 inputs; float32 statistics for every other dtype."""
        return torch.float64 if self.query.dtype == torch.float64 else torch.float32

    @property
    def online_has_positive(self) -> bool:
        """False for ReSSL, whose online softmax leaves the positive out."""
        return self.loss != "ressl"

    @property
    def needs_target(self) -> bool:
        """Whether the target distribution s² (temperature τ_m) enters the loss."""
        return self.loss != "info_nce"
