"""Launch the fused kernels, registered as PyTorch custom ops (so torch.compile and CUDA graphs
see one opaque op) with their autograd: the forward already holds dL/dquery, the backward scales it.

λ, τ and τ_m arrive as 0-d float32 tensors on the inputs' device and the kernels read them from
memory: a new value (a schedule, a learned τ) never recompiles a kernel or a graph, and never
synchronises the device.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor

from ..problem import check_queue_unchanged, differentiating_backward, queue_version
from . import kernels, plan
from .plan import STATE_SCALARS

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def launch_plan(
    query: Tensor,
    key: Tensor,
    bank: Tensor | None,
    queue: Tensor | None,
    *,
    need_grad: bool,
    key_grad: bool,
) -> plan.Plan:
    """The plan of this call on the query's device (the interpreter's for CPU tensors)."""
    rows, dim = query.shape
    return plan.plan(
        plan.device_of(query.device),
        rows=rows,
        dim=dim,
        bank=0 if bank is None else bank.shape[0],
        queue=0 if queue is None else queue.shape[0],
        kind=plan.kind_of(query.dtype),
        need_grad=need_grad,
        key_grad=key_grad,
        keys=key.shape[0],
    )


def _options(query: Tensor) -> dict:
    """Compile-time flags shared by the kernels that multiply."""
    kind = plan.kind_of(query.dtype)
    return dict(PRECISION=plan.PRECISIONS[kind], UPCAST=INTERPRET and query.dtype == torch.bfloat16)


def _launch_options(tiles: plan.Tiles) -> dict:
    return dict(num_warps=tiles.num_warps, num_stages=tiles.num_stages)


@torch.library.custom_op("sce_loss::fused_forward", mutates_args=())
def fused_forward(
    query: Tensor,
    key: Tensor,
    bank: Tensor | None,
    queue: Tensor | None,
    coeff: Tensor,
    temperature: Tensor,
    target_temperature: Tensor,
    *,
    offset: int,
    online_has_pos: bool,
    need_target: bool,
    need_grad: bool,
    fallback: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-row loss, dL/dquery (R×D, if need_grad), dL/dτ per row, LSE_a and LSE_b (2×R: each
    row's LSE as its two terms, the maximum m and log Σ e^{logit − m}, whose sum rounds).

    ``query`` is (R, D), row r's key is ``key[r % N]``; the candidates are ``bank`` (positive at
    offset + r % N) then ``queue`` (read in its own dtype, rounded to the query's for the
    products); with no bank the positive is the row's own key (queue mode). ``coeff`` (λ),
    ``temperature`` (τ) and ``target_temperature`` (τ_m) are 0-d float32 tensors. With
    ``fallback``, a launch failure (out of resources, a compiler error) computes the same
    outputs with the chunked backend's streaming loop instead of raising (``backend="auto"``
    trusts a kind of call it could not check inside a compiled graph).
    """
    tensors = (query, key, bank, queue, coeff, temperature, target_temperature)
    flags = dict(
        offset=offset, online_has_pos=online_has_pos, need_target=need_target, need_grad=need_grad
    )
    try:
        return _launch_forward(*tensors, **flags)
    except Exception as error:
        if not fallback:
            raise
        _note_fallback(error)
        from .fallback import streaming_forward

        return streaming_forward(*tensors, **flags)


def _launch_forward(
    query,
    key,
    bank,
    queue,
    coeff,
    temperature,
    target_temperature,
    *,
    offset,
    online_has_pos,
    need_target,
    need_grad,
):
    rows, dim = query.shape
    device = query.device
    launches = launch_plan(query, key, bank, queue, need_grad=need_grad, key_grad=False)
    # One workspace for every row group (they run one after the other on the stream).
    states = launches.partial_states
    stats_space = torch.empty(STATE_SCALARS * states, device=device, dtype=torch.float32)
    vecs_space = torch.empty(
        2 * states * dim if need_grad else 0, device=device, dtype=torch.float32
    )
    segments = [(c, c is bank) for c in (bank, queue) if c is not None and c.shape[0] > 0]
    extra_pos = bank is None and online_has_pos
    a_pos = (
        _queue_mode_positive_logits(query, key, temperature)
        if extra_pos
        else torch.empty(0, device=device)
    )
    loss, dtau = (torch.empty(rows, device=device, dtype=torch.float32) for _ in range(2))
    lse_a, lse_b = (torch.empty(2, rows, device=device, dtype=torch.float32) for _ in range(2))
    grad = torch.empty((rows, dim) if need_grad else (0, dim), device=device, dtype=torch.float32)
    for group in launches.groups:
        start, stop, group_rows, total = group.start, group.stop, group.rows, group.total_splits
        # Row r of the group is row start + r; its key, key_start + r mod keys: in-batch
        # positives at offset + key_start + r mod keys.
        x = query[start:stop]
        k = key[group.key_start : group.key_start + group.keys]
        stats = stats_space[: STATE_SCALARS * total * group_rows].view(
            STATE_SCALARS, total, group_rows
        )
        vecs = (
            vecs_space[: 2 * total * group_rows * dim].view(2, total, group_rows, dim)
            if need_grad
            else vecs_space
        )
        base = 0
        for (candidates, has_pos), launch in zip(segments, group.partial):
            t = launch.tiles
            kernels.partial_stats_kernel[launch.grid](
                x,
                k,
                candidates,
                stats,
                vecs,
                temperature,
                target_temperature,
                group_rows,
                group.keys,
                candidates.shape[0],
                dim,
                launch.span,
                base,
                total,
                offset + group.key_start,
                HAS_POS=has_pos,
                ONLINE_HAS_POS=online_has_pos,
                NEED_TARGET=need_target,
                NEED_GRAD=need_grad,
                BLOCK_R=t.block_r,
                BLOCK_C=t.block_c,
                BLOCK_D=t.block_d,
                **_options(query),
                **_launch_options(t),
            )
            base += launch.grid[1]
        t = group.finalize.tiles
        kernels.finalize_kernel[group.finalize.grid](
            stats,
            vecs,
            k,
            a_pos[start:stop] if extra_pos else a_pos,
            loss[start:stop],
            grad[start:stop],
            dtau[start:stop],
            lse_a[0, start:stop],
            lse_a[1, start:stop],
            lse_b[0, start:stop],
            lse_b[1, start:stop],
            coeff,
            temperature,
            group_rows,
            group.keys,
            dim,
            total,
            EXTRA_POS=extra_pos,
            NEED_TARGET=need_target,
            NEED_GRAD=need_grad,
            BLOCK_R=t.block_r,
            BLOCK_D=t.block_d,
            **_launch_options(t),
        )
    return loss, grad, dtau, lse_a, lse_b


@fused_forward.register_fake
def _(query, key, bank, queue, coeff, temperature, target_temperature, *, need_grad, **_):
    rows, dim = query.shape
    row = query.new_empty(rows, dtype=torch.float32)
    grad = query.new_empty((rows, dim) if need_grad else (0, dim), dtype=torch.float32)
    lse = query.new_empty((2, rows), dtype=torch.float32)
    return row, grad, torch.empty_like(row), lse, torch.empty_like(lse)


_NOTED: set[str] = set()


def _note_fallback(error: Exception) -> None:
    """Warn once per kind of launch failure that the streaming loop computed the call."""
    reason = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"
    if reason not in _NOTED:
        _NOTED.add(reason)
        warnings.warn(
            f"sce_loss: the fused kernels failed to launch ({reason}); this call and others like "
            "it are computed with the chunked backend's streaming loop (the same outputs)",
            RuntimeWarning,
            stacklevel=2,
        )


def _queue_mode_positive_logits(query: Tensor, key: Tensor, temperature: Tensor) -> Tensor:
    """a_r,pos = x_r·k_(r mod N) / τ, float32."""
    keys = key.float().repeat(query.shape[0] // key.shape[0], 1)
    return (query.float() * keys).sum(-1) / temperature


@torch.library.custom_op("sce_loss::fused_bank_gradient", mutates_args=())
def fused_bank_gradient(
    query: Tensor,
    key: Tensor,
    bank: Tensor,
    upstream: Tensor,
    lse_a: Tensor,
    lse_b: Tensor,
    coeff: Tensor,
    temperature: Tensor,
    target_temperature: Tensor,
    *,
    offset: int,
    online_has_pos: bool,
    need_target: bool,
    fallback: bool,
) -> Tensor:
    """dL/dbank_k = Σ_r g_r (P_rk − w_rk) query_r / τ: one pass over the rows per column block,
    the rows split across programs when the bank alone cannot fill the device. With
    ``fallback``, a launch failure computes it with the chunked backend's loop instead."""
    tensors = (query, key, bank, upstream, lse_a, lse_b, coeff, temperature, target_temperature)
    flags = dict(offset=offset, online_has_pos=online_has_pos, need_target=need_target)
    try:
        return _launch_bank_gradient(*tensors, **flags)
    except Exception as error:
        if not fallback:
            raise
        _note_fallback(error)
        from .fallback import streaming_bank_gradient

        return streaming_bank_gradient(*tensors, **flags)


def _launch_bank_gradient(
    query,
    key,
    bank,
    upstream,
    lse_a,
    lse_b,
    coeff,
    temperature,
    target_temperature,
    *,
    offset,
    online_has_pos,
    need_target,
):
    rows, dim = query.shape
    launch = launch_plan(query, key, bank, None, need_grad=False, key_grad=True).key_gradient
    t = launch.tiles
    row_splits = launch.grid[1]
    grad = torch.empty((row_splits, *bank.shape), device=bank.device, dtype=torch.float32)
    kernels.key_gradient_kernel[launch.grid](
        query,
        key,
        bank,
        upstream.float().contiguous(),
        lse_a[0],
        lse_a[1],
        lse_b[0],
        lse_b[1],
        grad,
        coeff,
        temperature,
        target_temperature,
        rows,
        key.shape[0],
        bank.shape[0],
        dim,
        offset,
        launch.span,
        ONLINE_HAS_POS=online_has_pos,
        NEED_TARGET=need_target,
        BLOCK_R=t.block_r,
        BLOCK_C=t.block_c,
        BLOCK_D=t.block_d,
        **_options(query),
        **_launch_options(t),
    )
    return grad.sum(0).to(bank.dtype)


@fused_bank_gradient.register_fake
def _(query, key, bank, *_, **__):
    return torch.empty_like(bank)


def _setup_context(ctx, inputs, keyword_only_inputs, output):
    query, key, bank, queue, coeff, temperature, target_temperature = inputs
    _, grad, dtau, lse_a, lse_b = output
    # The queue is not saved: it may be updated in place before the backward. It is kept for a
    # recomputation (create_graph=True), which refuses a queue updated since.
    ctx.save_for_backward(
        query, key, bank, grad, dtau, lse_a, lse_b, coeff, temperature, target_temperature
    )
    # offset, online_has_pos, need_target and fallback: the bank gradient's keyword arguments.
    ctx.options = {k: v for k, v in keyword_only_inputs.items() if k != "need_grad"}
    ctx.queue = queue
    ctx.queue_version = queue_version(queue)


def _differentiable_backward(ctx, upstream):
    """The gradients as a differentiable graph (create_graph=True: the backward itself is being
    differentiated): the reference's losses recomputed from the saved inputs."""
    from .. import reference
    from ..problem import Problem

    query, key, bank, *_, coeff, temperature, target_temperature = ctx.saved_tensors
    options = ctx.options
    online_has_pos, need_target = options["online_has_pos"], options["need_target"]
    queue = ctx.queue
    check_queue_unchanged(queue, ctx.queue_version, "fused")
    loss = "info_nce" if not need_target else ("sce" if online_has_pos else "ressl")
    problem = Problem(
        loss=loss,
        query=query.view(-1, *key.shape),
        key=key,
        bank=bank,
        queue=queue,
        offset=options["offset"],
        temperature=temperature,
        target_temperature=target_temperature if need_target else None,
        coeff=coeff,
    )
    # With a bank, the key is one of its rows (often the very same tensor): it gets its gradient
    # through the bank only, as in the first-order backward.
    inputs = (query, None if bank is not None else key, bank, None, None, temperature, None)
    return reference.recomputed_gradients(problem, inputs, ctx.needs_input_grad, upstream)


def _backward(ctx, upstream, *_):
    if differentiating_backward():
        return _differentiable_backward(ctx, upstream)
    (query, key, bank, grad, dtau, lse_a, lse_b, coeff, temperature, target_temperature) = (
        ctx.saved_tensors
    )
    online_has_pos = ctx.options["online_has_pos"]
    grad_query = grad_key = grad_bank = grad_temperature = None
    if ctx.needs_input_grad[0]:
        grad_query = (upstream[:, None] * grad).to(query.dtype)
    if ctx.needs_input_grad[1] and bank is None:
        # Queue mode: the key is a candidate only as its own row's positive, (p_pos − λ) x / τ;
        # ReSSL leaves the positive out of the online softmax, so its key gradient is zero.
        if online_has_pos:
            a_pos = _queue_mode_positive_logits(query, key, temperature)
            p_pos = torch.exp((a_pos - lse_a[0]) - lse_a[1])
            per_row = (upstream * (p_pos - coeff) / temperature)[:, None] * query.float()
            grad_key = per_row.view(-1, *key.shape).sum(0).to(key.dtype)
        else:
            grad_key = torch.zeros_like(key)
    if bank is not None and ctx.needs_input_grad[2]:
        grad_bank = fused_bank_gradient(
            query,
            key,
            bank,
            upstream,
            lse_a,
            lse_b,
            coeff,
            temperature,
            target_temperature,
            **ctx.options,
        )
    if ctx.needs_input_grad[5]:
        grad_temperature = (upstream * dtau).sum()
    return grad_query, grad_key, grad_bank, None, None, grad_temperature, None


fused_forward.register_autograd(_backward, setup_context=_setup_context)
