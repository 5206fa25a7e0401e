"""The fused streaming backend: Triton kernels that never build the N×M logit matrix.

Same signatures and per-row results as :mod:`sce_loss.reference`. Triton is imported on first use
only, so the package imports and runs without it.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor

MAX_DIM = 256
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None  # found, not imported


def unsupported_reason(query: Tensor) -> str | None:
    """Why the fused backend cannot run these inputs, or None if it can."""
    if not TRITON_AVAILABLE:
        return "Triton is not installed (pip install 'sce-loss[triton]')"
    if query.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"it runs on CUDA tensors (or under TRITON_INTERPRET=1), got {query.device.type}"
    if query.dtype not in DTYPES:
        return f"it supports float32, bfloat16 and float16, got {query.dtype}"
    if query.shape[-1] > MAX_DIM:
        return f"it supports D ≤ {MAX_DIM}, got D={query.shape[-1]}"
    return None


def info_nce(query, key, queue=None, *, temperature, include_keys=False, key_bank=None, offset=0):
    """InfoNCE per row: SCE with λ=1 and no target."""
    return _losses(query, key, queue, include_keys, key_bank, offset, coeff=1.0,
                   temperature=temperature, target_temperature=1.0, online_has_pos=True)


def ressl(query, key, queue=None, *, temperature, target_temperature, include_keys=False,
          key_bank=None, offset=0):
    """ReSSL per row: λ=0 with the positive left out of the online softmax."""
    return _losses(query, key, queue, include_keys, key_bank, offset, coeff=0.0,
                   temperature=temperature, target_temperature=target_temperature,
                   online_has_pos=False)


def sce(query, key, queue=None, *, coeff, temperature, target_temperature, include_keys=False,
        key_bank=None, offset=0):
    """SCE per row."""
    return _losses(query, key, queue, include_keys, key_bank, offset, coeff=coeff,
                   temperature=temperature, target_temperature=target_temperature,
                   online_has_pos=True)


def _losses(query, key, queue, include_keys, key_bank, offset, *, coeff, temperature,
            target_temperature, online_has_pos):
    from .ops import fused_forward

    bank = (key if key_bank is None else key_bank) if queue is None or include_keys else None
    rows = query.reshape(-1, query.shape[-1]).contiguous()
    need_grad = torch.is_grad_enabled() and query.requires_grad
    coeff = _number(coeff)
    need_target = coeff != 1.0 or not online_has_pos
    losses, _, dtau, _, _ = fused_forward(
        rows, key.contiguous(), None if bank is None else bank.contiguous(),
        None if queue is None else queue.contiguous(), offset, coeff, _number(temperature),
        _number(target_temperature), online_has_pos, need_target, need_grad)
    if isinstance(temperature, Tensor) and temperature.requires_grad:
        # Adds exactly zero, and carries dL/dτ = Σ_r g_r dL_r/dτ from the forward pass.
        losses = losses + (temperature - temperature.detach()) * dtau.detach()
    return losses.view(query.shape[:-1])


def _number(value) -> float:
    """A hyper-parameter as a Python float (a CUDA tensor costs one synchronisation)."""
    return float(value.detach()) if isinstance(value, Tensor) else float(value)
