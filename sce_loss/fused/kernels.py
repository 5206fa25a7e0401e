"""Triton kernels of the fused losses: one streaming pass over the candidates, flash-attention
style.

Rows r = 0..R−1 are the (crop, row) pairs of the flattened query X; row r's target key is
K[r mod N]. A candidate block C (the key bank or the queue) is split along its columns; for each
(row block, split) ``partial_stats_kernel`` streams its columns once and keeps, per row:

    m_a, l_a = Σ e^{a−m_a}, g_a = Σ e^{a−m_a}·(m_a−a), O_a = Σ e^{a−m_a}·c   (online, a = x·c/τ)
    m_b, l_b = Σ e^{b−m_b}, g_b = Σ e^{b−m_b}·(m_a−a), O_b = Σ e^{b−m_b}·c   (target, b = k·c/τ_m,
                                                                            k ≠ pos)
    a_pos                                                                   (the positive's logit)

The gaps g are sums of terms ≥ 0 measured from the online maximum m_a (moved with it, as the
maxima rescale the sums), so that at small τ, where the logits are large (1e4 at τ = 1e-4) and
round by 1e-3, no large logit is subtracted from another after its rounding.

O_a and O_b are accumulated only when the query needs a gradient (NEED_GRAD).
``finalize_kernel`` merges the partial states of every split (rescaling by the running maxima) and
writes, with λ the target's weight on the positive,

    loss_r  = LSE_a − λ·a_pos − (1−λ)·Σ_k s²_k a_k  =  log l_a + λ·(m_a − a_pos) + (1−λ)·g_b/l_b
    dL/dx_r = (O_a/l_a − λ·c_pos − (1−λ)·O_b/l_b) / τ
    dL/dτ_r = −(λ·(m_a − a_pos) − g_a/l_a + (1−λ)·g_b/l_b) / τ

and, for the key pass, LSE_a and LSE_b as their two terms, the maxima m and log l (their float32
sum rounds to the ulp of m). ``key_gradient_kernel`` is that key pass: column-parallel over a key
bank, dL/dc_k = Σ_r g_r (P_rk − w_rk) x_r / τ with P = e^{(a − m_a) − log l_a} and w recomputed.
No N×M tensor is ever stored. λ, τ and τ_m are read from 0-d float32 tensors (COEFF, TAU, TAU_M),
so a new value never recompiles anything.
"""

import triton
import triton.language as tl

from .plan import STATE_SCALARS

# Partial-state scalars per (split, row), in this order, then O_a and O_b.
M_A, L_A, G_A, M_B, L_B, G_B, A_POS = (tl.constexpr(i) for i in range(STATE_SCALARS))


@triton.jit
def _dot(x, y, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # UPCAST: Triton's interpreter has no bfloat16 tl.dot (triton-lang/triton#11584); bfloat16
    # values are exact in float32, so the product is the same.
    if UPCAST:
        return tl.dot(x.to(tl.float32), y.to(tl.float32), input_precision=PRECISION)
    return tl.dot(x, y, input_precision=PRECISION)


@triton.jit
def _empty_state(BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """A running (max, Σe, gap, Σe·c) state over no column yet."""
    zero = tl.zeros((BLOCK_R,), tl.float32)
    vector = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    return tl.full((BLOCK_R,), float("-inf"), tl.float32), zero, zero, vector


@triton.jit
def _gap_shift(l, ref, new_ref):
    """What a gap Σe·(ref − a) over a sum l gains when its reference grows to new_ref (0 where
    there is no term yet, and ref may be −inf: no infinity enters the arithmetic)."""
    has_terms = l > 0.0
    return (tl.where(has_terms, new_ref, 0.0) - tl.where(has_terms, ref, 0.0)) * l


@triton.jit
def _online_update(
    m,
    l,
    g,
    o,
    masked,
    new_m,
    valid,
    a,
    ref,
    new_ref,
    c,
    ACCUMULATE: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """One block of columns into a running (max, Σe, gap, Σe·c) state: ``masked``, its logits
    with −inf where not ``valid``, and ``new_m``, the maximum after them (the caller's, who
    needs it too). The gap Σe·(ref − a) is measured from the online maximum ``ref``, which
    becomes ``new_ref``. Σe·c (a D-vector per row) is accumulated only if ACCUMULATE."""
    safe_m = tl.where(new_m == float("-inf"), 0.0, new_m)
    alpha = tl.exp(m - safe_m)
    p = tl.exp(masked - safe_m[:, None])
    g = (g + _gap_shift(l, ref, new_ref)) * alpha
    g += tl.sum(p * tl.where(valid, new_ref[:, None] - a, 0.0), 1)
    l = l * alpha + tl.sum(p, 1)
    if ACCUMULATE:
        o = o * alpha[:, None] + _dot(p.to(c.dtype), c, PRECISION, UPCAST)
    return new_m, l, g, o


@triton.jit
def partial_stats_kernel(
    X,
    K,
    C,
    STATS,
    VECS,
    TAU,
    TAU_M,
    R,
    N,
    NUM_C,
    D,
    COLS_PER_SPLIT,
    SPLIT_BASE,
    TOTAL_SPLITS,
    POS_OFFSET,
    HAS_POS: tl.constexpr,
    ONLINE_HAS_POS: tl.constexpr,
    NEED_TARGET: tl.constexpr,
    NEED_GRAD: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """The running states of one row block over one split of the columns of C."""
    pid_r = tl.program_id(0)
    split = tl.program_id(1)
    inv_tau = 1.0 / tl.load(TAU)
    inv_tau_m = 1.0 / tl.load(TAU_M)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < R
    dim_ok = dims < D
    row_tile_ok = row_ok[:, None] & dim_ok[None, :]
    key_rows = rows % N
    x = tl.load(X + rows[:, None] * D + dims[None, :], mask=row_tile_ok, other=0.0)
    if NEED_TARGET:
        k = tl.load(K + key_rows[:, None] * D + dims[None, :], mask=row_tile_ok, other=0.0).to(
            x.dtype
        )
    if HAS_POS:
        pos = key_rows + POS_OFFSET
    else:
        pos = key_rows * 0 - 1

    m_a, l_a, g_a, o_a = _empty_state(BLOCK_R, BLOCK_D)
    m_b, l_b, g_b, o_b = _empty_state(BLOCK_R, BLOCK_D)
    a_pos = tl.zeros((BLOCK_R,), tl.float32)

    start = split * COLS_PER_SPLIT
    for step in range(0, COLS_PER_SPLIT, BLOCK_C):
        cols = start + step + tl.arange(0, BLOCK_C)
        col_ok = cols < NUM_C
        # 64-bit offsets: a queue of millions of entries passes 2³¹ elements.
        c = tl.load(
            C + cols.to(tl.int64)[:, None] * D + dims[None, :],
            mask=col_ok[:, None] & dim_ok[None, :],
            other=0.0,
        ).to(x.dtype)
        ct = tl.trans(c)
        a = _dot(x, ct, PRECISION, UPCAST) * inv_tau
        is_pos = cols[None, :] == pos[:, None]
        valid = col_ok[None, :] & row_ok[:, None]
        a_pos += tl.sum(tl.where(is_pos & valid, a, 0.0), 1)
        online_ok = valid if ONLINE_HAS_POS else valid & ~is_pos
        masked_a = tl.where(online_ok, a, float("-inf"))
        new_m_a = tl.maximum(m_a, tl.max(masked_a, 1))
        if NEED_TARGET:
            target_ok = valid & ~is_pos
            masked_b = tl.where(
                target_ok, _dot(k, ct, PRECISION, UPCAST) * inv_tau_m, float("-inf")
            )
            m_b, l_b, g_b, o_b = _online_update(
                m_b,
                l_b,
                g_b,
                o_b,
                masked_b,
                tl.maximum(m_b, tl.max(masked_b, 1)),
                target_ok,
                a,
                m_a,
                new_m_a,
                c,
                NEED_GRAD,
                PRECISION,
                UPCAST,
            )
        m_a, l_a, g_a, o_a = _online_update(
            m_a,
            l_a,
            g_a,
            o_a,
            masked_a,
            new_m_a,
            online_ok,
            a,
            m_a,
            new_m_a,
            c,
            NEED_GRAD,
            PRECISION,
            UPCAST,
        )

    slot = SPLIT_BASE + split
    base = STATS + slot * R + rows
    stride = TOTAL_SPLITS * R
    tl.store(base + M_A * stride, m_a, mask=row_ok)
    tl.store(base + L_A * stride, l_a, mask=row_ok)
    tl.store(base + G_A * stride, g_a, mask=row_ok)
    tl.store(base + M_B * stride, m_b, mask=row_ok)
    tl.store(base + L_B * stride, l_b, mask=row_ok)
    tl.store(base + G_B * stride, g_b, mask=row_ok)
    tl.store(base + A_POS * stride, a_pos, mask=row_ok)
    if NEED_GRAD:
        vec = VECS + (slot * R + rows[:, None]) * D + dims[None, :]
        tl.store(vec, o_a, mask=row_tile_ok)
        tl.store(vec + TOTAL_SPLITS * R * D, o_b, mask=row_tile_ok)


@triton.jit
def _merge(m, l, g, o, m_s, l_s, g_s, o_s, ref, ref_s, new_ref):
    """Two running states of the same row into one (rescaled to the larger maximum), their gaps
    measured from the online maxima ``ref`` and ``ref_s``, and then from ``new_ref``."""
    new_m = tl.maximum(m, m_s)
    safe_m = tl.where(new_m == float("-inf"), 0.0, new_m)
    alpha, beta = tl.exp(m - safe_m), tl.exp(m_s - safe_m)
    return (
        new_m,
        l * alpha + l_s * beta,
        (g + _gap_shift(l, ref, new_ref)) * alpha + (g_s + _gap_shift(l_s, ref_s, new_ref)) * beta,
        o * alpha[:, None] + o_s * beta[:, None],
    )


@triton.jit
def finalize_kernel(
    STATS,
    VECS,
    K,
    A_POS_EXTRA,
    LOSS,
    GRAD,
    DTAU,
    MAX_A,
    LOG_SUM_A,
    MAX_B,
    LOG_SUM_B,
    COEFF,
    TAU,
    R,
    N,
    D,
    TOTAL_SPLITS,
    EXTRA_POS: tl.constexpr,
    NEED_TARGET: tl.constexpr,
    NEED_GRAD: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Merge the splits' states; EXTRA_POS adds the queue-mode positive (c = K[r mod N]) to the
    online state as one more column, with logit A_POS_EXTRA[r], after the others."""
    coeff = tl.load(COEFF)
    inv_tau = 1.0 / tl.load(TAU)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < R
    vec_ok = row_ok[:, None] & (dims < D)[None, :]

    m_a, l_a, g_a, o_a = _empty_state(BLOCK_R, BLOCK_D)
    m_b, l_b, g_b, o_b = _empty_state(BLOCK_R, BLOCK_D)
    a_pos = tl.zeros((BLOCK_R,), tl.float32)
    if NEED_GRAD:
        key = tl.load(K + (rows % N)[:, None] * D + dims[None, :], mask=vec_ok, other=0.0).to(
            tl.float32
        )
    if EXTRA_POS:  # the maximum starts at the positive; its term joins l_a and g_a at the end
        a_pos = tl.load(A_POS_EXTRA + rows, mask=row_ok, other=0.0)
        m_a = a_pos

    stride = TOTAL_SPLITS * R
    for slot in range(0, TOTAL_SPLITS):
        base = STATS + slot * R + rows
        vec = VECS + (slot * R + rows[:, None]) * D + dims[None, :]
        o_s = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
        if NEED_GRAD:
            o_s = tl.load(vec, mask=vec_ok, other=0.0)
        m_a_s = tl.load(base + M_A * stride, mask=row_ok, other=float("-inf"))
        new_m_a = tl.maximum(m_a, m_a_s)
        a_pos += tl.load(base + A_POS * stride, mask=row_ok, other=0.0)
        if NEED_TARGET:
            o_t = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
            if NEED_GRAD:
                o_t = tl.load(vec + stride * D, mask=vec_ok, other=0.0)
            m_b, l_b, g_b, o_b = _merge(
                m_b,
                l_b,
                g_b,
                o_b,
                tl.load(base + M_B * stride, mask=row_ok, other=float("-inf")),
                tl.load(base + L_B * stride, mask=row_ok, other=0.0),
                tl.load(base + G_B * stride, mask=row_ok, other=0.0),
                o_t,
                m_a,
                m_a_s,
                new_m_a,
            )
        m_a, l_a, g_a, o_a = _merge(
            m_a,
            l_a,
            g_a,
            o_a,
            m_a_s,
            tl.load(base + L_A * stride, mask=row_ok, other=0.0),
            tl.load(base + G_A * stride, mask=row_ok, other=0.0),
            o_s,
            m_a,
            m_a_s,
            new_m_a,
        )

    others = l_a  # Σe over the columns other than EXTRA_POS's positive
    if EXTRA_POS:
        first = tl.exp(a_pos - m_a)
        l_a += first
        g_a += first * (m_a - a_pos)
    l_a = tl.where(row_ok, l_a, 1.0)  # rows past R: keep their (unstored) arithmetic finite
    l_b = tl.where(row_ok, l_b, 1.0)
    target_gap = a_pos * 0.0
    if NEED_TARGET:
        target_gap = g_b / l_b
        tl.store(MAX_B + rows, m_b, mask=row_ok)
        tl.store(LOG_SUM_B + rows, tl.log(l_b), mask=row_ok)
    # LSE as its two terms (m, log l): their float32 sum is rounded to the ulp of m (1e-4 at
    # τ = 1e-3), and a probability e^{a − LSE} recomputed from it by as much.
    tl.store(MAX_A + rows, m_a, mask=row_ok)
    tl.store(LOG_SUM_A + rows, tl.log(l_a), mask=row_ok)
    # λ·(m_a − a_pos): 0 where λ = 0 (ReSSL, whose a_pos is 0); rows past R have m_a = −inf.
    positive_gap = coeff * tl.where(row_ok, m_a - a_pos, 0.0)
    tl.store(LOSS + rows, tl.log(l_a) + positive_gap + (1.0 - coeff) * target_gap, mask=row_ok)
    dtau = -(positive_gap - g_a / l_a + (1.0 - coeff) * target_gap) * inv_tau
    tl.store(DTAU + rows, dtau, mask=row_ok)
    if NEED_GRAD:
        if EXTRA_POS:
            # O_a/l_a − c_pos as (O_others − l_others·c_pos)/l_a, in which an exact copy of the
            # positive among the candidates cancels exactly; then − (1−λ)·(O_b/l_b − c_pos).
            grad = (o_a - others[:, None] * key) / l_a[:, None]
            if NEED_TARGET:
                grad -= (1.0 - coeff) * (o_b / l_b[:, None] - key)
        else:
            grad = o_a / l_a[:, None] - coeff * key
            if NEED_TARGET:
                grad -= (1.0 - coeff) * o_b / l_b[:, None]
        tl.store(GRAD + rows[:, None] * D + dims[None, :], grad * inv_tau, mask=vec_ok)


@triton.jit
def key_gradient_kernel(
    X,
    K,
    BANK,
    UPSTREAM,
    MAX_A,
    LOG_SUM_A,
    MAX_B,
    LOG_SUM_B,
    GRAD_BANK,
    COEFF,
    TAU,
    TAU_M,
    R,
    N,
    NUM_BANK,
    D,
    POS_OFFSET,
    ROWS_PER_SPLIT,
    ONLINE_HAS_POS: tl.constexpr,
    NEED_TARGET: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """dL/dc_k = Σ_r g_r (P_rk − w_rk) x_r / τ for one block of bank columns, over one split of
    the rows (program_id(1)); each split writes its own (NUM_BANK, D) slice of GRAD_BANK."""
    coeff = tl.load(COEFF)
    inv_tau = 1.0 / tl.load(TAU)
    inv_tau_m = 1.0 / tl.load(TAU_M)
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    split = tl.program_id(1)
    dims = tl.arange(0, BLOCK_D)
    col_ok = cols < NUM_BANK
    dim_ok = dims < D
    x_dtype = X.dtype.element_ty
    c = tl.load(
        BANK + cols[:, None] * D + dims[None, :], mask=col_ok[:, None] & dim_ok[None, :], other=0.0
    ).to(x_dtype)
    ct = tl.trans(c)
    grad = tl.zeros((BLOCK_C, BLOCK_D), tl.float32)
    first_row = split * ROWS_PER_SPLIT
    for step in range(0, ROWS_PER_SPLIT, BLOCK_R):
        rows = first_row + step + tl.arange(0, BLOCK_R)
        row_ok = rows < R
        key_rows = rows % N
        row_tile_ok = row_ok[:, None] & dim_ok[None, :]
        x = tl.load(X + rows[:, None] * D + dims[None, :], mask=row_tile_ok, other=0.0)
        g = tl.load(UPSTREAM + rows, mask=row_ok, other=0.0)
        is_pos = cols[None, :] == (key_rows + POS_OFFSET)[:, None]
        valid = row_ok[:, None] & col_ok[None, :]
        max_a = tl.load(MAX_A + rows, mask=row_ok, other=0.0)
        log_sum_a = tl.load(LOG_SUM_A + rows, mask=row_ok, other=0.0)
        a = _dot(x, ct, PRECISION, UPCAST) * inv_tau - max_a[:, None]  # a − m_a
        online_ok = valid if ONLINE_HAS_POS else valid & ~is_pos
        # A probability is at most 1: clamped before the exponential, ReSSL's left-out positive
        # (which may exceed m_a by far) and the padding cannot overflow (a clamp, not a −inf mask,
        # keeps sm_86's tiles within the registers).
        weight = tl.where(online_ok, tl.exp(tl.minimum(a - log_sum_a[:, None], 0.0)), 0.0)
        weight -= tl.where(is_pos & valid, coeff, 0.0)
        if NEED_TARGET:
            k = tl.load(K + key_rows[:, None] * D + dims[None, :], mask=row_tile_ok, other=0.0).to(
                x_dtype
            )
            max_b = tl.load(MAX_B + rows, mask=row_ok, other=0.0)
            log_sum_b = tl.load(LOG_SUM_B + rows, mask=row_ok, other=0.0)
            b = _dot(k, ct, PRECISION, UPCAST) * inv_tau_m - max_b[:, None]  # b − m_b
            target_ok = valid & ~is_pos
            target = tl.exp(tl.minimum(b - log_sum_b[:, None], 0.0))
            weight -= (1.0 - coeff) * tl.where(target_ok, target, 0.0)
        weight *= g[:, None] * inv_tau
        grad += _dot(tl.trans(weight).to(x.dtype), x, PRECISION, UPCAST)
    out = GRAD_BANK + (split * NUM_BANK + cols[:, None]) * D + dims[None, :]
    tl.store(out, grad, mask=col_ok[:, None] & dim_ok[None, :])
