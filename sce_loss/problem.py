"""The seam between the public functions and the backends: one checked loss evaluation.

:mod:`sce_loss.functional` checks the arguments, normalises, gathers keys and builds a
:class:`Problem`; a backend (:mod:`~sce_loss.reference`, :mod:`~sce_loss.chunked`,
:mod:`~sce_loss.fused`) implements two functions over it::

    unsupported_reason(problem) -> str | None   # why it cannot serve this problem, or None
    losses(problem) -> Tensor                    # per-row losses, shape (V, N)

Row i's candidates and positive (docs/mathematics.md): ``bank`` (the in-batch keys, every
rank's when gathered; positive at ``offset + i``) followed by ``queue``; with no ``bank``
(plain queue mode) the candidates are [z²_i, queue] and the positive is the row's own key, column 0.

The symmetric (SimCLR) form is in-batch mode over the 2N embeddings of two online views: ``query``
is (1, 2N, D) = [z1; z2], ``key`` (2N, D) = [z2; z1] (each row's positive, the same sample's other
view), ``bank`` every rank's ``key`` (positive of row r at ``offset + r``), and each row's own
embedding, at column ``offset + (r + N) mod 2N``, is no candidate of any distribution.

All three losses are one family: SCE with target weight λ = ``coeff`` on the positive, InfoNCE is
λ = 1 (no target needed), ReSSL is λ = 0 with the positive left out of the online softmax.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

# A hyper-parameter as the backends take it, once checked: a Python number or a 0-d tensor.
Scalar = float | Tensor
# A hyper-parameter as a user may pass it: a Python or NumPy number, or a 0-d tensor.
HyperParameter = float | np.floating | np.integer | Tensor
# Each loss's default hyper-parameters as a Problem takes them (the public functions' defaults),
# for the problems the library builds itself (the first-use check, sce-loss-check).
DEFAULT_HYPER_PARAMETERS: dict[str, dict[str, Any]] = {
    "info_nce": dict(temperature=0.2),
    "ressl": dict(temperature=0.1, target_temperature=0.04, coeff=0.0),
    "sce": dict(coeff=0.5, temperature=0.1, target_temperature=0.05),
}
# (major, minor) of the installed torch, for the few behaviours that differ across versions.
TORCH_VERSION = tuple(int(part) for part in torch.__version__.split(".")[:2])


def online_has_positive(loss: str) -> bool:
    """False for ReSSL, whose online softmax leaves the positive out."""
    return loss != "ressl"


def needs_target(loss: str) -> bool:
    """Whether the target distribution s² (temperature τ_m) enters the loss: not InfoNCE's."""
    return loss != "info_nce"


def own_columns(rows: int, offset: int, device) -> Tensor:
    """The symmetric form's rows are [z1; z2] (2N = ``rows``) and its key bank [z2; z1] from
    column ``offset``: row i's own embedding is column offset + (i + N) mod 2N."""
    return offset + (torch.arange(rows, device=device) + rows // 2) % rows


POSITIVES = ("mean", "pooled", "pairs")


def constant_while_tracing(fn):
    """Mark ``fn`` as torch.compiler.assume_constant_result does (torch 2.6 to 2.13 set this
    attribute, which tests/test_backend_choice.py checks): torch.compile calls it once while
    tracing and takes its result as a constant, with no guard. The decorator itself would import
    torch._dynamo, and with it Triton, when the package is imported."""
    fn._dynamo_marked_constant = True
    return fn


def compute_dtype_of(dtype: torch.dtype) -> torch.dtype:
    """The dtype the losses compute in: float64 for float64 inputs, float32 for every other."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True, kw_only=True)
class Problem:
    """One loss evaluation, arguments checked.

    ``query`` is (V, N, D), ``key`` (N, D), ``bank`` (B, D) or None, ``queue`` (M, D) or None
    (detached, in its stored dtype). ``query``, ``key`` and ``bank`` share ``dtype``, the dtype the
    caller passed. Hyper-parameters are Python floats (possibly symbolic under torch.compile) or 0-d
    tensors; ``temperature`` may require grad. Backends return float64 losses for float64 inputs,
    float32 otherwise, and gradients in the inputs' dtypes.
    """

    loss: str  # one of DEFAULT_HYPER_PARAMETERS' keys
    query: Tensor
    key: Tensor
    bank: Tensor | None
    queue: Tensor | None
    offset: int
    temperature: Scalar
    target_temperature: Scalar | None = None  # None for InfoNCE
    coeff: Scalar = 1.0  # λ; 1 for InfoNCE, 0 for ReSSL
    symmetric: bool = False  # the SimCLR form (module docstring)

    @property
    def dtype(self) -> torch.dtype:
        return self.query.dtype

    @property
    def compute_dtype(self) -> torch.dtype:
        return compute_dtype_of(self.query.dtype)

    @property
    def online_has_positive(self) -> bool:
        return online_has_positive(self.loss)

    def own_columns(self) -> Tensor | None:
        """Symmetric form: each row's own embedding's column of the bank, (2N,); else None."""
        if not self.symmetric:
            return None
        return own_columns(self.key.shape[0], self.offset, self.key.device)

    @property
    def needs_target(self) -> bool:
        return needs_target(self.loss)


def constant(value):
    """A hyper-parameter that shapes constant weights (λ, τ_m): a tensor's value without its
    gradient, a float as it is, and 1.0 for None (a τ_m with no role, InfoNCE's)."""
    if value is None:
        return 1.0
    return value.detach() if isinstance(value, Tensor) else value


def transformed() -> bool:
    """Whether a torch.func transform (grad, vjp, jacrev, vmap, ...) or forward-mode AD (dual
    tensors) is running: there values cannot be read on the host and the streaming backends' own
    autograd cannot be transformed. (torch.compile traces through functorch's machinery too;
    that is not a transform here.)"""
    if torch.compiler.is_compiling():
        return False
    forward_mode = torch.autograd.forward_ad._current_level >= 0  # dual tensors (jvp)
    return forward_mode or torch._C._functorch.peek_interpreter_stack() is not None


def tracing() -> bool:
    """Whether values cannot be read on the host: torch.compile traces or a torch.func transform
    runs. Value checks are skipped there (the caller's contract)."""
    return torch.compiler.is_compiling() or transformed()


def differentiating_backward() -> bool:
    """Inside a backward: whether it is itself being differentiated (create_graph=True, e.g. a
    gradient penalty, or torch.func.grad). A compiled graph's backward is traced with grad mode
    on but never differentiated (torch.compile does not support double backward)."""
    return torch.is_grad_enabled() and not torch.compiler.is_compiling()


def queue_version(queue: Tensor | None) -> int | None:
    """The queue's version counter (it counts in-place updates), where it can be read: kept by a
    backend whose backward may recompute the losses (create_graph=True)."""
    if queue is None or torch.compiler.is_compiling():
        return None
    return queue._version


def check_queue_unchanged(queue: Tensor | None, version: int | None, backend: str) -> None:
    """An error if ``queue`` was updated in place since its ``version`` was read: the losses
    cannot be recomputed as the forward saw them."""
    if queue is not None and version not in (None, queue._version):
        raise RuntimeError(
            f"backend='{backend}' cannot differentiate its backward (create_graph=True) after "
            "the queue was updated in place: push to the queue after the backward, or use "
            "backend='reference'"
        )
