"""Checks and conversions of the public functions' arguments, shared by
:mod:`sce_loss.functional` and :mod:`sce_loss.relational` (and :class:`~sce_loss.MemoryQueue`):
each check raises a ``TypeError`` or ``ValueError`` that names the argument."""

from __future__ import annotations

import contextlib
import sys

import numpy as np
import torch
from torch import Tensor

from . import distributed
from .problem import TORCH_VERSION, tracing

FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "reference", "chunked", "fused")
# Below this τ (or τ_m) logits of unit vectors exceed 1e4 and float32 statistics lose the loss's
# digits (and a learnable τ's gradient, which grows as 1/τ², overflows soon after).
MIN_TEMPERATURE = 1e-4
_MIN_TEMPERATURE_FLOAT32 = float(torch.tensor(MIN_TEMPERATURE, dtype=torch.float32))
# Before torch 2.13, dynamo specialises (recompiles for) every value of a float that enters
# arithmetic other than a tensor product or quotient (1 − λ, log2(e)/τ), so a scheduled float
# would recompile every step.
_FLOATS_SPECIALISE = TORCH_VERSION < (2, 13)


def plain_number(value):
    """A NumPy scalar (``np.float64(0.1)``, ``np.int64(3)``, ``np.bool_(True)``: what indexing a
    NumPy schedule gives) as the Python number it holds; anything else as it is."""
    return value.item() if isinstance(value, np.generic) else value


def traced_numpy_scalar(value) -> bool:
    """Whether ``value`` is a NumPy scalar as torch.compile traces it: a 0-d array (eager callers'
    NumPy scalars are ``np.generic``, which :func:`plain_number` converts)."""
    return torch.compiler.is_compiling() and isinstance(value, np.ndarray) and value.ndim == 0


def traceable_scalar(value, device: torch.device | None):
    """A number as a loss computes with it: a float, or under torch.compile before torch 2.13 a
    float64 0-d tensor (1·value: the only form of it those versions keep symbolic); tensors as
    they are."""
    if traced_numpy_scalar(value):
        return torch.as_tensor(value, dtype=torch.float64)
    value = plain_number(value)
    if isinstance(value, Tensor):
        return value
    if torch.compiler.is_compiling() and _FLOATS_SPECIALISE:
        return torch.ones((), dtype=torch.float64, device=device) * value
    return value if tracing() else float(value)


def autocast_disabled(device_type: str):
    """A context that turns autocast off on ``device_type``. CPU and CUDA always have autocast:
    asking (``torch.amp.is_autocast_available``) cannot be traced by torch.compile before 2.12."""
    if device_type in ("cpu", "cuda") or torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def check_float_tensor(name: str, value) -> None:
    """A TypeError unless ``value`` is a float64, float32, bfloat16 or float16 tensor."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float64, float32, bfloat16 or float16, got {value.dtype}")
    if value.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {value.layout}")


def check_finite(**tensors) -> None:
    """A ValueError for a NaN or inf in a CPU tensor, in eager mode: checking CUDA tensors would
    synchronise the device, and a compiled graph cannot branch on data, so there finiteness is
    the caller's contract; under torch.func transforms too. None values are skipped."""
    if tracing():
        return
    for name, value in tensors.items():
        if value is not None and value.device.type == "cpu" and not all_finite(value):
            raise ValueError(f"{name} must be finite, got NaN or inf")


def all_finite(x: Tensor) -> bool:
    """Whether every value of ``x`` is finite, without a mask the size of ``x`` (a NaN or an inf
    shows in its minimum or maximum)."""
    if x.numel() == 0:
        return True
    low, high = torch.aminmax(x.detach())
    return bool(torch.isfinite(low) and torch.isfinite(high))


LARGEST_FLOAT = sys.float_info.max


def check_temperature(name: str, value) -> None:
    number = scalar_value(name, value)
    # Compared in float32, so that a float32 tensor holding 1e-4 passes as the float 1e-4 does.
    # Comparisons only (NaN fails them): a float traced symbolically by torch.compile takes
    # them as a guard on its range, not on its value, where math.isfinite cannot be traced.
    # Against the largest float, not inf, which the guards' symbolic algebra takes as above
    # every value.
    if number is not None and not _MIN_TEMPERATURE_FLOAT32 <= number <= LARGEST_FLOAT:
        raise ValueError(f"{name} must be a finite number ≥ {MIN_TEMPERATURE}, got {number}")


def check_coeff(name: str, value) -> None:
    number = scalar_value(name, value)
    if number is not None and not 0 <= number <= 1:
        raise ValueError(f"{name} must be in [0, 1], got {number}")


def scalar_value(name: str, value) -> float | None:
    """The value of a real number or 0-d float tensor, None when it cannot be read for free (a
    device tensor, a tensor or a NumPy number while compiling, a tensor under a torch.func
    transform); a TypeError for anything else, in every mode (types and shapes are known without
    reading a value). A Python number is always read: under torch.compile a comparison of it is
    a guard on its range, so a schedule does not recompile for it."""
    if isinstance(value, Tensor):
        if value.dim() != 0 or not value.is_floating_point():
            raise TypeError(
                f"{name} must be a float or a 0-d float tensor, got a {value.dtype} "
                f"tensor of shape {tuple(value.shape)}"
            )
        return None if tracing() or value.device.type != "cpu" else float(value.detach())
    if traced_numpy_scalar(value):
        return None
    value = plain_number(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float or a 0-d float tensor, got {type(value).__name__}")
    return float(value)


def check_bool(name: str, value) -> None:
    """A TypeError unless ``value`` is a bool (Python's or NumPy's; a Python bool while
    compiling, where a NumPy one is traced as an array)."""
    if traced_numpy_scalar(value):
        raise TypeError(f"{name} must be a Python bool under torch.compile, got a NumPy bool")
    if not isinstance(plain_number(value), bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def check_count(name: str, value, *, low: int) -> int:
    """``value`` as a Python int ≥ ``low`` (Python's or NumPy's ints; not a bool): a TypeError
    for another type, a ValueError below ``low``."""
    number = plain_number(value)
    if isinstance(number, bool) or not isinstance(number, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if number < low:
        raise ValueError(f"{name} must be an int ≥ {low}, got {number}")
    return number


def check_reduction(name: str, value) -> None:
    if not isinstance(value, str) or value not in REDUCTIONS:
        raise ValueError(f"{name} must be one of {REDUCTIONS}, got {value!r}")


def check_backend(name: str, value) -> None:
    if not isinstance(value, str) or value not in BACKENDS:
        raise ValueError(f"{name} must be one of {BACKENDS}, got {value!r}")


def check_gather(name: str, value) -> None:
    distributed.resolve_group(value)  # a TypeError naming gather unless a bool or a group


# The checks every loss shares, by keyword; each loss adds its own (``check_by_name``).
SHARED_CHECKS = {"normalize": check_bool, "reduction": check_reduction, "gather": check_gather}


def check_by_name(checks: dict, **options) -> None:
    """Check keyword arguments by name with ``checks`` (name → check(name, value)): values of
    hyper-parameters where they are free to read (Python numbers always; CPU tensors and NumPy
    numbers in eager mode)."""
    for name, value in options.items():
        checks[name](name, value)


def reduce_losses(losses: Tensor, reduction: str) -> Tensor:
    """Per-row losses, (N,) or (V, N) → their mean or sum over crops and rows, or themselves."""
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    return losses


def check_labels(
    labels, n: int, device: torch.device, *, name: str = "labels", low: int | None = 0
) -> None:
    """An integer tensor (n,) on ``device``, each ≥ ``low`` (None: any)."""
    if (
        not isinstance(labels, Tensor)
        or labels.is_floating_point()
        or labels.is_complex()
        or (labels.dtype == torch.bool)
    ):
        kind = f"a {labels.dtype} tensor" if isinstance(labels, Tensor) else type(labels).__name__
        raise TypeError(f"{name} must be an integer tensor, got {kind}")
    if labels.shape != (n,) or labels.device != device:
        what = "one per sample" if name == "labels" else "one per queue entry"
        raise ValueError(
            f"{name} must be ({n},) ({what}) on {device}, got shape "
            f"{tuple(labels.shape)} on {labels.device}"
        )
    if low is not None and not tracing() and labels.device.type == "cpu" and n:
        if int(labels.min()) < low:
            raise ValueError(f"{name} must be ≥ {low}, got {int(labels.min())}")
