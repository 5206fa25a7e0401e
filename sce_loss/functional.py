"""The public loss functions: check the arguments, prepare the inputs, run a backend, reduce.

Every function takes ``query`` (N, D) or (V, N, D), ``key`` (N, D) and an optional ``queue``
(M, D) and returns the loss as float64 for float64 inputs and float32 otherwise.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from . import distributed, fused, reference

Scalar = float | Tensor

_FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
_REDUCTIONS = ("mean", "sum", "none")


def info_nce_loss(query: Tensor, key: Tensor, queue: Tensor | None = None, *,
                  temperature: Scalar = 0.2, include_keys: bool = False, normalize: bool = False,
                  reduction: str = "mean", gather=False, backend: str = "auto") -> Tensor:
    """InfoNCE (MoCo v2): loss_i = −log softmax_k(z¹_i·c_k / τ)[pos].

    Args:
        query: online embeddings z¹, (N, D) or (V, N, D) for V crops; gradients flow through it.
        key: target embeddings z², (N, D); gets gradient only where it is an online candidate.
        queue: optional (M, D) bank of past keys; never gets a gradient.
        temperature: τ > 0, a float or a 0-d tensor (which may require grad).
        include_keys: with a queue, every in-batch key is a candidate too (positive at column i).
        normalize: L2-normalise query, key and queue first.
        reduction: "mean" (default), "sum" or "none" (per-row losses, shape (N,) or (V, N)).
        gather: True or a process group: under torch.distributed, the keys of every rank are
            candidates (in-batch mode and ``include_keys``), as if one process held every batch.
        backend: "auto" (the fused kernels on CUDA when Triton is installed and the case is
            supported, else the reference), "reference" or "fused".
    """
    _check_temperature("temperature", temperature)
    return _run("info_nce", query, key, queue, dict(temperature=temperature), include_keys,
                normalize, reduction, gather, backend)


def ressl_loss(query: Tensor, key: Tensor, queue: Tensor | None = None, *,
               temperature: Scalar = 0.1, target_temperature: Scalar = 0.04,
               include_keys: bool = False, normalize: bool = False, reduction: str = "mean",
               gather=False, backend: str = "auto") -> Tensor:
    """ReSSL: loss_i = −Σ_{k≠pos} s²_ik log s¹_ik, where s¹ = softmax(z¹_i·c_k / τ) and
    s² = softmax(z²_i·c_k / τ_m) both run over the candidates without the positive (s² is a
    constant target). Arguments as :func:`info_nce_loss`; ``target_temperature`` is τ_m > 0."""
    _check_temperature("temperature", temperature)
    _check_temperature("target_temperature", target_temperature)
    return _run("ressl", query, key, queue,
                dict(temperature=temperature, target_temperature=target_temperature), include_keys,
                normalize, reduction, gather, backend)


def sce_loss(query: Tensor, key: Tensor, queue: Tensor | None = None, *, coeff: Scalar = 0.5,
             temperature: Scalar = 0.1, target_temperature: Scalar = 0.05,
             include_keys: bool = False, normalize: bool = False, reduction: str = "mean",
             gather=False, backend: str = "auto") -> Tensor:
    """SCE (Similarity Contrastive Estimation): loss_i = −Σ_k w_ik log p_ik with
    p_i = softmax_k(z¹_i·c_k / τ) over all candidates and the constant target
    w_ik = λ·[k = pos] + (1−λ)·softmax_{k≠pos}(z²_i·c_k / τ_m).

    ``coeff`` is λ in [0, 1] (λ=1 is InfoNCE); λ and τ_m shape the target, which carries no
    gradient. Other arguments as :func:`info_nce_loss`.
    """
    _check_coeff(coeff)
    _check_temperature("temperature", temperature)
    _check_temperature("target_temperature", target_temperature)
    return _run("sce", query, key, queue,
                dict(coeff=coeff, temperature=temperature, target_temperature=target_temperature),
                include_keys, normalize, reduction, gather, backend)


def _run(loss: str, query, key, queue, hyper_parameters: dict, include_keys, normalize, reduction,
         gather, backend) -> Tensor:
    """Check the inputs, prepare them for the chosen backend, compute the per-row losses, reduce."""
    _check_reduction(reduction)
    _check_tensors(query, key, queue)
    if not isinstance(include_keys, bool):
        raise TypeError(f"include_keys must be a bool, got {type(include_keys).__name__}")
    group = distributed.resolve_group(gather)
    implementation = _backend(backend, query)
    # The reference computes in float32 (float64 for float64 inputs); the fused kernels read the
    # inputs as they are and accumulate in float32.
    compute = torch.float64 if query.dtype == torch.float64 else torch.float32
    kernel_dtype = compute if implementation is reference else query.dtype
    query, key = _prepared(query, normalize, kernel_dtype), _prepared(key, normalize, kernel_dtype)
    if queue is not None:  # a constant: never a gradient
        queue = _prepared(queue.detach(), normalize, compute if implementation is reference else queue.dtype)
    key_bank, offset = key, 0
    if queue is None or include_keys:
        key_bank, offset = distributed.gather_keys(key, group)
    _check_has_negatives(key, queue, include_keys, key_bank)
    losses = getattr(implementation, loss)(query, key, queue, include_keys=include_keys,
                                           key_bank=key_bank, offset=offset, **hyper_parameters)
    return _reduce(losses, reduction)


def _prepared(x: Tensor, normalize: bool, dtype: torch.dtype) -> Tensor:
    """``x`` in ``dtype``, L2-normalised (in at least float32) if asked."""
    if normalize:
        x = F.normalize(x.to(torch.promote_types(x.dtype, torch.float32)), dim=-1)
    return x.to(dtype)


def _backend(backend, query: Tensor):
    """The module computing the per-row losses: reference or fused."""
    if backend == "reference":
        return reference
    if backend not in ("auto", "fused"):
        raise ValueError(f"backend must be 'auto', 'reference' or 'fused', got {backend!r}")
    reason = fused.unsupported_reason(query)
    if reason is None and (backend == "fused" or query.device.type == "cuda"):
        return fused
    if backend == "fused":
        raise ValueError(f"backend='fused' cannot run here: {reason}")
    return reference


def _check_tensors(query, key, queue) -> None:
    for name, value in (("query", query), ("key", key), ("queue", queue)):
        if name == "queue" and value is None:
            continue
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if value.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float64, float32, bfloat16 or float16, got {value.dtype}")
    if query.dim() not in (2, 3):
        raise ValueError(f"query must be (N, D) or (V, N, D), got shape {tuple(query.shape)}")
    if key.dim() != 2:
        raise ValueError(f"key must be (N, D), got shape {tuple(key.shape)}")
    if query.shape[-2:] != key.shape:
        raise ValueError(f"query rows and dim {tuple(query.shape[-2:])} must match key's (N, D) "
                         f"{tuple(key.shape)}")
    if key.shape[0] == 0 or key.shape[1] == 0 or query.shape[0] == 0:
        raise ValueError(f"query and key must be non-empty, got shapes {tuple(query.shape)} and "
                         f"{tuple(key.shape)}")
    if key.dtype != query.dtype:
        raise TypeError(f"key must have query's dtype {query.dtype}, got {key.dtype}")
    if key.device != query.device:
        raise ValueError(f"key must be on query's device {query.device}, got {key.device}")
    if queue is not None:
        if queue.dim() != 2 or queue.shape[1] != key.shape[1]:
            raise ValueError(f"queue must be (M, D) with D={key.shape[1]}, got shape {tuple(queue.shape)}")
        if queue.device != query.device:
            raise ValueError(f"queue must be on query's device {query.device}, got {queue.device}")
    # Checking CUDA tensors would synchronise the device, and a compiled graph cannot branch on
    # data: there finiteness is the caller's contract.
    if torch.compiler.is_compiling():
        return
    for name, value in (("query", query), ("key", key), ("queue", queue)):
        if value is not None and value.device.type == "cpu" and not torch.isfinite(value).all():
            raise ValueError(f"{name} must be finite, got NaN or inf")


def _check_has_negatives(key, queue, include_keys, key_bank) -> None:
    negatives = (0 if queue is None else queue.shape[0]) + (
        key_bank.shape[0] - 1 if queue is None or include_keys else 0)
    if negatives < 1:
        raise ValueError("each row needs at least one negative: got a batch of "
                         f"{key_bank.shape[0]} key(s) and a queue of "
                         f"{0 if queue is None else queue.shape[0]} entries")


def _scalar_value(name: str, value) -> float | None:
    """The value of a float or 0-d tensor hyper-parameter; None for a CUDA tensor (no sync)."""
    if isinstance(value, Tensor):
        if value.dim() != 0 or not value.is_floating_point():
            raise TypeError(f"{name} must be a float or a 0-d float tensor, got a {value.dtype} "
                            f"tensor of shape {tuple(value.shape)}")
        return float(value.detach()) if value.device.type == "cpu" else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float or a 0-d float tensor, got {type(value).__name__}")
    return float(value)


def _check_temperature(name: str, value) -> None:
    number = _scalar_value(name, value)
    if number is not None and not (math.isfinite(number) and number > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {number}")


def _check_coeff(value) -> None:
    number = _scalar_value("coeff", value)
    if number is not None and not 0 <= number <= 1:
        raise ValueError(f"coeff must be in [0, 1], got {number}")


def _check_reduction(reduction) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _reduce(losses: Tensor, reduction: str) -> Tensor:
    """Per-row losses, (N,) or (V, N) → their mean or sum over crops and rows, or themselves."""
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    return losses
