"""The fused streaming backend: Triton kernels that never build the N×M logit matrix.

The backend seam (:mod:`sce_loss.problem`): :func:`unsupported_reason`, :func:`losses`, and
:func:`verified`, the first-use check that ``backend="auto"`` asks before trusting the kernels on
a device. Triton is imported on first use only, so the package imports and runs without it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os

import torch
from torch import Tensor

from ..problem import Problem, constant
from . import plan
from .first_use import SKIP_VARIABLE, verified

DTYPES = tuple(dict.fromkeys(plan.DTYPES.values()))  # float32, bfloat16, float16

TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None  # found, not imported


# Its version from the package metadata (Triton itself is not imported), read once: the reading
# cannot be traced by torch.compile.
def _installed_triton_version() -> str | None:
    """The version of the distribution that installed the ``triton`` module (PyTorch's own
    wheels name it pytorch-triton), None if unknown."""
    for distribution in ("triton", "pytorch-triton", "pytorch-triton-rocm", "pytorch-triton-xpu"):
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


TRITON_VERSION = _installed_triton_version() if TRITON_AVAILABLE else None
# The Triton versions whose compile of every kernel at the launch plan's tiles has passed
# (tests/compile_kernels.py: shared memory, no spills, tensor cores; CI's slow tier).
CHECKED_TRITON = ("3.8", "3.9")

__all__ = [
    "DTYPES",
    "SKIP_VARIABLE",
    "losses",
    "triton_reason",
    "unsupported_reason",
    "verified",
]


def triton_reason() -> str | None:
    """Why this installation cannot run the kernels (Triton missing or of an unchecked version),
    or None if it can."""
    if not TRITON_AVAILABLE:
        return (
            'Triton is not installed (the "triton" extra: pip install -e ".[triton]" in a checkout)'
        )
    if TRITON_VERSION is None or ".".join(TRITON_VERSION.split(".")[:2]) not in CHECKED_TRITON:
        return (
            f"Triton {TRITON_VERSION} is not a version its kernels were checked with "
            f"({', '.join(CHECKED_TRITON)})"
        )
    return None


def unsupported_reason(problem: Problem) -> str | None:
    """Why the fused backend cannot run this problem, or None if it can."""
    query = problem.query
    if problem.symmetric:
        return "the symmetric (SimCLR) form runs on the chunked and reference backends"
    reason = triton_reason()
    if reason is not None:
        return reason
    if query.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"it runs on CUDA tensors (or under TRITON_INTERPRET=1), got {query.device.type}"
    if torch.version.hip is not None:
        return "it is built and checked for NVIDIA GPUs, not ROCm"
    if query.dtype not in DTYPES:
        return f"it supports float32, bfloat16 and float16, got {query.dtype}"
    if problem.queue is not None and problem.queue.dtype not in DTYPES:
        return f"it reads float32, bfloat16 and float16 queues, got {problem.queue.dtype}"
    kind, dim, widest = plan.kind_of(query.dtype), query.shape[-1], max(plan.MAX_DIM.values())
    if dim > widest:
        return f"it supports D ≤ {widest}, got D={dim}"
    if dim > plan.MAX_DIM[kind]:
        return (
            f"full-precision float32 products (float32 matmul precision 'highest', or "
            f"torch.backends.cuda.matmul.fp32_precision = 'ieee') support D ≤ "
            f"{plan.MAX_DIM[kind]}, got D={dim}; TF32 products ('high', or 'tf32') or "
            f"bfloat16 inputs support D ≤ {widest}"
        )
    if (
        query.device.type == "cuda"
        and query.dtype == torch.bfloat16
        and torch.cuda.get_device_capability(query.device) < (8, 0)
    ):
        return "bfloat16 products need compute capability 8.0 (Ampere) or newer"
    return None


def losses(problem: Problem, *, fallback: bool = False) -> Tensor:
    """Per-row losses (V, N) of ``problem`` from the fused kernels, float32.

    λ, τ and τ_m reach the kernels as 0-d float32 tensors on the inputs' device; a τ that
    requires grad gets dL/dτ from the forward pass's statistics. With ``fallback`` (what
    ``backend="auto"`` asks), a launch failure computes the same outputs with the chunked
    backend's streaming loop instead of raising.
    """
    from .ops import fused_forward

    query = problem.query
    crops, batch, dim = query.shape
    device = query.device

    def tensor(value) -> Tensor:
        if isinstance(value, Tensor):
            return value.to(device=device, dtype=torch.float32)
        # 1·value rather than torch.as_tensor(value): under torch.compile a float that changes
        # every step becomes symbolic, and as_tensor would guard on (recompile for) its value.
        return torch.ones((), dtype=torch.float32, device=device) * value

    coeff, target_temperature = constant(problem.coeff), constant(problem.target_temperature)
    need_grad = torch.is_grad_enabled() and query.requires_grad
    per_row, *_ = fused_forward(
        query.reshape(crops * batch, dim).contiguous(),
        problem.key.contiguous(),
        None if problem.bank is None else problem.bank.contiguous(),
        None if problem.queue is None else problem.queue.contiguous(),
        tensor(coeff),
        tensor(problem.temperature),
        tensor(target_temperature),
        offset=problem.offset,
        online_has_pos=problem.online_has_positive,
        need_target=problem.needs_target,
        need_grad=need_grad,
        fallback=fallback,
    )
    return per_row.view(crops, batch)
