"""The exact relations between the losses, as hypothesis properties (float64 throughout)."""

import math

import literal
import torch
from conftest import MODES, unit
from hypothesis import given
from hypothesis import strategies as st

from sce_loss import info_nce_loss, ressl_loss, sce_loss

TIGHT = dict(rtol=1e-10, atol=1e-12)


@st.composite
def problems(draw, modes=MODES):
    """Random unit-vector inputs for one mode, and random temperatures."""
    mode = draw(st.sampled_from(modes))
    n = draw(st.integers(2, 6))
    d = draw(st.integers(1, 6))
    m = draw(st.integers(1, 8))
    crops = draw(st.sampled_from([None, 2]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    query = unit(*((crops,) if crops else ()), n, d, generator=g).requires_grad_()
    key = unit(n, d, generator=g).requires_grad_()
    queue = None if mode == "in-batch" else unit(m, d, generator=g)
    options = dict(
        include_keys=mode == "queue+keys",
        temperature=draw(st.floats(0.05, 1.0)),
        target_temperature=draw(st.floats(0.02, 1.0)),
    )
    return query, key, queue, options


def values_and_gradients(fn, query, key, queue, **options):
    losses = fn(query, key, queue, reduction="none", **options)
    grads = torch.autograd.grad(losses.sum(), (query, key))
    return (losses, *grads)


def assert_all_close(got, want, **tolerance):
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **(tolerance or TIGHT))


def infonce_options(options):
    return {k: v for k, v in options.items() if k != "target_temperature"}


@given(problems())
def test_sce_at_coeff_one_is_infonce(problem):
    query, key, queue, options = problem
    assert_all_close(
        values_and_gradients(sce_loss, query, key, queue, coeff=1.0, **options),
        values_and_gradients(info_nce_loss, query, key, queue, **infonce_options(options)),
    )


def log_one_minus_positive_share(query, key, queue, include_keys, temperature):
    """log(1 − p_i,pos) = LSE_{k≠pos}(a_ik) − LSE_k(a_ik), written out per mode (well-conditioned
    even when p_pos is within rounding of 1, unlike log(1 − exp(−InfoNCE)))."""
    n = key.shape[0]
    if queue is None:
        logits, pos = query @ key.T, torch.arange(n)
    elif include_keys:
        logits, pos = query @ torch.cat([key, queue]).T, torch.arange(n)
    else:
        logits = torch.cat([(query * key).sum(-1, keepdim=True), query @ queue.T], -1)
        pos = torch.zeros(n, dtype=torch.long)
    logits = logits / temperature
    is_positive = torch.nn.functional.one_hot(pos, logits.shape[-1]).bool()
    return logits.masked_fill(is_positive, float("-inf")).logsumexp(-1) - logits.logsumexp(-1)


@given(problems())
def test_sce_at_coeff_zero_is_ressl_minus_log_one_minus_positive_share(problem):
    """SCE(0)_i = ReSSL_i − log(1 − p_i,pos)."""
    query, key, queue, options = problem
    sce0 = values_and_gradients(sce_loss, query, key, queue, coeff=0.0, **options)

    def ressl_minus_correction(
        query, key, queue, reduction, include_keys, temperature, target_temperature
    ):
        ressl = ressl_loss(
            query,
            key,
            queue,
            reduction=reduction,
            include_keys=include_keys,
            temperature=temperature,
            target_temperature=target_temperature,
        )
        return ressl - log_one_minus_positive_share(query, key, queue, include_keys, temperature)

    assert_all_close(
        sce0, values_and_gradients(ressl_minus_correction, query, key, queue, **options)
    )


@given(problems(modes=("queue", "queue+keys")), st.floats(1e3, 1e5))
def test_sce_at_coeff_zero_is_ressl_when_the_positive_logit_is_minus_infinity(problem, scale):
    """Keys pointing away from their queries with a huge norm make the positive's share 0."""
    query, _, queue, options = problem
    query = query.detach()[0] if query.dim() == 3 else query.detach()
    key = -scale * query
    positive_share = torch.exp(
        -info_nce_loss(query, key, queue, reduction="none", **infonce_options(options))
    )
    assert (positive_share == 0).all()
    torch.testing.assert_close(
        sce_loss(query, key, queue, coeff=0.0, reduction="none", **options),
        ressl_loss(query, key, queue, reduction="none", **options),
        **TIGHT,
    )


@given(problems(), st.floats(0.0, 1.0))
def test_sce_is_linear_in_coeff(problem, coeff):
    query, key, queue, options = problem
    at = {
        c: values_and_gradients(sce_loss, query, key, queue, coeff=c, **options)
        for c in (coeff, 0.0, 1.0)
    }
    assert_all_close(
        at[coeff], [coeff * one + (1 - coeff) * zero for one, zero in zip(at[1.0], at[0.0])]
    )


@given(problems(), st.floats(0.0, 1.0), st.integers(0, 2**31 - 1))
def test_per_row_losses_are_equivariant_under_a_batch_permutation(problem, coeff, seed):
    query, key, queue, options = problem
    perm = torch.randperm(key.shape[0], generator=torch.Generator().manual_seed(seed))
    for fn, extra in ((sce_loss, dict(coeff=coeff)), (ressl_loss, {}), (info_nce_loss, None)):
        opts = infonce_options(options) if extra is None else {**options, **extra}
        losses, grad_query, grad_key = values_and_gradients(fn, query, key, queue, **opts)
        permuted = values_and_gradients(fn, query[..., perm, :], key[perm], queue, **opts)
        assert_all_close(permuted, (losses[..., perm], grad_query[..., perm, :], grad_key[perm]))


@given(problems(modes=("queue", "queue+keys")), st.floats(0.0, 1.0), st.integers(0, 2**31 - 1))
def test_per_row_losses_are_invariant_under_a_queue_permutation(problem, coeff, seed):
    query, key, queue, options = problem
    perm = torch.randperm(queue.shape[0], generator=torch.Generator().manual_seed(seed))
    for fn, extra in ((sce_loss, dict(coeff=coeff)), (ressl_loss, {}), (info_nce_loss, None)):
        opts = infonce_options(options) if extra is None else {**options, **extra}
        assert_all_close(
            values_and_gradients(fn, query, key, queue[perm], **opts),
            values_and_gradients(fn, query, key, queue, **opts),
        )


@given(problems(), st.floats(0.0, 1.0))
def test_loss_is_target_entropy_plus_kl_so_at_least_the_entropy(problem, coeff):
    """Gibbs: loss_i = H(w_i) + KL(w_i ‖ p_i) ≥ H(w_i), with equality iff p_i = w_i."""
    query, key, queue, options = problem
    query, key = query.detach(), key.detach()
    losses = sce_loss(query, key, queue, coeff=coeff, reduction="none", **options).flatten()
    table = literal.rows("sce", query, key, queue, coeff=coeff, **options)
    for loss, (*_, online, target, _) in zip(losses.tolist(), table, strict=True):
        entropy = -sum(w * math.log(w) for w in target.values() if w > 0)
        kl = sum(w * math.log(w / online[k]) for k, w in target.items() if w > 0)
        assert loss >= entropy - 1e-12
        assert math.isclose(loss, entropy + kl, rel_tol=1e-9, abs_tol=1e-12)


def test_loss_equals_target_entropy_when_the_online_distribution_is_the_target():
    """The equality case of Gibbs: a query that reproduces the target distribution exactly.

    In queue mode with λ=1 the target is one-hot; an online distribution with the positive taking
    all the mass (p_pos = 1 in float64) makes the loss 0 = H(w)."""
    query = unit(3, 4)
    queue = unit(5, 4)
    key = 1e3 * query
    loss = info_nce_loss(query, key, queue, temperature=0.01, reduction="none")
    assert (loss == 0).all()
    assert (sce_loss(query, key, queue, coeff=1.0, temperature=0.01, reduction="none") == 0).all()
