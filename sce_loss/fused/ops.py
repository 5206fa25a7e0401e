"""Launch the fused kernels, registered as PyTorch custom ops (so torch.compile and CUDA graphs
see one opaque op) with their autograd: the forward already holds dL/dquery, the backward scales it."""

from __future__ import annotations

import math
import os

import torch
import triton
from torch import Tensor

from . import kernels

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Workspace of the split states is at most this many bytes; more splits only buy parallelism.
_WORKSPACE_BYTES = 4 << 20


def blocks(rows: int, dim: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, BLOCK_D); tl.dot needs every block ≥ 16. The interpreter gets the
    smallest, so small test shapes still cover several row, column and split blocks. Full-precision
    float32 products run without tensor cores and stage more in shared memory: smaller tiles keep
    every kernel within a Hopper block's 227 KiB (tests/test_fused_compile.py checks)."""
    block_d = max(16, triton.next_power_of_2(dim))
    if INTERPRET:
        return 16, 16, block_d
    wide = block_d > 128 or (dtype == torch.float32 and _precision(dtype) == "ieee")
    tall = 32 if dtype == torch.float32 and block_d > 128 else 64
    return (tall if rows > 32 else 16), (32 if wide else 64), block_d


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _precision(dtype: torch.dtype):
    """Follow torch's float32 matmul precision for float32 inputs; 16-bit inputs use their own."""
    if dtype != torch.float32:
        return None
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _split(columns: int, rows: int, dim: int, device, block_r: int, block_c: int, budget: int) -> int:
    """Columns per split: enough splits to fill the device, within the workspace budget."""
    row_blocks = triton.cdiv(rows, block_r)
    splits = max(1, min(triton.cdiv(_target_programs(device), row_blocks), budget,
                        triton.cdiv(columns, block_c)))
    return triton.cdiv(triton.cdiv(columns, splits), block_c) * block_c


@torch.library.custom_op("sce_loss::fused_forward", mutates_args=())
def fused_forward(query: Tensor, key: Tensor, bank: Tensor | None, queue: Tensor | None, offset: int,
                  coeff: float, temperature: float, target_temperature: float, online_has_pos: bool,
                  need_target: bool, need_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-row loss, dL/dquery (R×D, if need_grad), dL/dτ per row, LSE_a and LSE_b.

    ``query`` is (R, D), row r's key is ``key[r % N]``; the candidates are ``bank`` (positive at
    offset + r % N) then ``queue``; with no bank the positive is the row's own key (queue mode).
    """
    rows, dim = query.shape
    device = query.device
    block_r, block_c, block_d = blocks(rows, dim, query.dtype)
    per_split = 4 * rows * ((2 * dim if need_grad else 0) + kernels.SCALARS)
    budget = max(1, _WORKSPACE_BYTES // per_split)
    segments = [(c, has_pos) for c, has_pos in ((bank, True), (queue, False))
                if c is not None and c.shape[0] > 0]
    layout = []
    for candidates, has_pos in segments:
        cols_per_split = _split(candidates.shape[0], rows, dim, device, block_r, block_c,
                                max(1, budget // len(segments)))
        layout.append((candidates, has_pos, cols_per_split, triton.cdiv(candidates.shape[0], cols_per_split)))
    total = sum(splits for *_, splits in layout)
    stats = torch.empty(kernels.SCALARS, total, rows, device=device, dtype=torch.float32)
    vecs = torch.empty((2, total, rows, dim) if need_grad else (0,), device=device, dtype=torch.float32)
    upcast = INTERPRET and query.dtype == torch.bfloat16
    precision = _precision(query.dtype)
    base = 0
    for candidates, has_pos, cols_per_split, splits in layout:
        kernels.partial_stats_kernel[(triton.cdiv(rows, block_r), splits)](
            query, key, candidates, stats, vecs,
            rows, key.shape[0], candidates.shape[0], dim, cols_per_split, base, total, offset,
            1.0 / temperature, 1.0 / target_temperature,
            HAS_POS=has_pos, ONLINE_HAS_POS=online_has_pos, NEED_TARGET=need_target,
            NEED_GRAD=need_grad, PRECISION=precision, UPCAST=upcast,
            BLOCK_R=block_r, BLOCK_C=block_c, BLOCK_D=block_d)
        base += splits

    extra_pos = bank is None and online_has_pos
    a_pos = (_queue_mode_positive_logits(query, key, temperature) if extra_pos
             else torch.empty(0, device=device))
    loss, dtau, lse_a, lse_b = (torch.empty(rows, device=device, dtype=torch.float32) for _ in range(4))
    grad = torch.empty((rows, dim) if need_grad else (0, dim), device=device, dtype=torch.float32)
    kernels.finalize_kernel[(triton.cdiv(rows, block_r),)](
        stats, vecs, key, a_pos, loss, grad, dtau, lse_a, lse_b,
        rows, key.shape[0], dim, total, coeff, 1.0 / temperature,
        EXTRA_POS=extra_pos, NEED_TARGET=need_target, NEED_GRAD=need_grad,
        BLOCK_R=block_r, BLOCK_D=block_d)
    return loss, grad, dtau, lse_a, lse_b


@fused_forward.register_fake
def _(query, key, bank, queue, offset, coeff, temperature, target_temperature, online_has_pos,
      need_target, need_grad):
    rows, dim = query.shape
    row = query.new_empty(rows, dtype=torch.float32)
    grad = query.new_empty((rows, dim) if need_grad else (0, dim), dtype=torch.float32)
    return row, grad, torch.empty_like(row), torch.empty_like(row), torch.empty_like(row)


def _queue_mode_positive_logits(query: Tensor, key: Tensor, temperature: float) -> Tensor:
    """a_r,pos = x_r·k_(r mod N) / τ, float32."""
    keys = key.float().repeat(query.shape[0] // key.shape[0], 1)
    return (query.float() * keys).sum(-1) / temperature


@torch.library.custom_op("sce_loss::fused_bank_gradient", mutates_args=())
def fused_bank_gradient(query: Tensor, key: Tensor, bank: Tensor, upstream: Tensor, lse_a: Tensor,
                        lse_b: Tensor, offset: int, coeff: float, temperature: float,
                        target_temperature: float, online_has_pos: bool, need_target: bool) -> Tensor:
    """dL/dbank_k = Σ_r g_r (P_rk − w_rk) query_r / τ, one column-parallel pass over the rows."""
    rows, dim = query.shape
    block_r, block_c, block_d = blocks(rows, dim, query.dtype)
    grad = torch.empty(bank.shape, device=bank.device, dtype=torch.float32)
    kernels.key_gradient_kernel[(triton.cdiv(bank.shape[0], block_c),)](
        query, key, bank, upstream.float().contiguous(), lse_a, lse_b, grad,
        rows, key.shape[0], bank.shape[0], dim, offset, coeff, 1.0 / temperature,
        1.0 / target_temperature,
        ONLINE_HAS_POS=online_has_pos, NEED_TARGET=need_target, PRECISION=_precision(query.dtype),
        UPCAST=INTERPRET and query.dtype == torch.bfloat16,
        BLOCK_R=block_r, BLOCK_C=block_c, BLOCK_D=block_d)
    return grad.to(bank.dtype)


@fused_bank_gradient.register_fake
def _(query, key, bank, upstream, lse_a, lse_b, offset, coeff, temperature, target_temperature,
      online_has_pos, need_target):
    return torch.empty_like(bank)


def _setup_context(ctx, inputs, output):
    query, key, bank, queue, offset, coeff, temperature, target_temperature, online_has_pos, need_target, _ = inputs
    _, grad, _, lse_a, lse_b = output
    ctx.save_for_backward(query, key, bank, grad, lse_a, lse_b)
    ctx.options = (offset, coeff, temperature, target_temperature, online_has_pos, need_target)


def _backward(ctx, upstream, *_):
    query, key, bank, grad, lse_a, lse_b = ctx.saved_tensors
    offset, coeff, temperature, target_temperature, online_has_pos, need_target = ctx.options
    grad_query = grad_key = grad_bank = None
    if ctx.needs_input_grad[0]:
        grad_query = (upstream[:, None] * grad).to(query.dtype)
    if ctx.needs_input_grad[1] and bank is None and online_has_pos:
        # Queue mode: the key is a candidate only as its own row's positive: (p_pos − λ) x / τ.
        p_pos = torch.exp(_queue_mode_positive_logits(query, key, temperature) - lse_a)
        per_row = (upstream * (p_pos - coeff) / temperature)[:, None] * query.float()
        grad_key = per_row.view(-1, *key.shape).sum(0).to(key.dtype)
    if bank is not None and ctx.needs_input_grad[2]:
        grad_bank = fused_bank_gradient(query, key, bank, upstream, lse_a, lse_b, offset, coeff,
                                        temperature, target_temperature, online_has_pos, need_target)
    return grad_query, grad_key, grad_bank, None, None, None, None, None, None, None, None


fused_forward.register_autograd(_backward, setup_context=_setup_context)
