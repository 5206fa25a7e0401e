"""Low-precision inputs, extreme temperatures and degenerate embeddings."""

import pytest
import torch
from conftest import make_inputs, needs_fused, unit

from sce_loss import info_nce_loss, ressl_loss, sce_loss

LOSSES = [info_nce_loss, ressl_loss, sce_loss]


@pytest.mark.parametrize("fn", LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_inputs_give_float32_losses_close_to_float64(fn, dtype, mode):
    query, key, queue, include_keys = make_inputs(mode, n=16, d=32, m=64, crops=2, seed=8)
    low = [None if x is None else x.to(dtype).requires_grad_() for x in (query, key, queue)]
    loss = fn(*low, include_keys=include_keys)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert low[0].grad.dtype == dtype and torch.isfinite(low[0].grad).all()
    # Statistics are float32: on the rounded inputs, float64 agrees to float32 precision ...
    rounded = [None if x is None else x.detach().double() for x in low]
    torch.testing.assert_close(
        loss.double(), fn(*rounded, include_keys=include_keys), rtol=1e-5, atol=1e-6
    )
    # ... and the rounding of the inputs themselves moves the loss by about their precision.
    torch.testing.assert_close(
        loss.double(), fn(query, key, queue, include_keys=include_keys), rtol=2e-2, atol=1e-3
    )


def test_float64_inputs_are_computed_in_float64():
    query, key, queue, _ = make_inputs("queue", seed=9)
    loss = sce_loss(query, key, queue)
    assert loss.dtype == torch.float64
    assert loss.item() != sce_loss(query.float(), key.float(), queue.float()).item()


@pytest.mark.parametrize("fn", LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_temperatures_and_duplicated_embeddings_stay_finite(fn, dtype, mode):
    """τ = τ_m = 0.01 and every embedding identical: logits of ±100, ties everywhere."""
    hyper = dict(temperature=0.01) | ({} if fn is info_nce_loss else dict(target_temperature=0.01))
    one = unit(1, 16).to(dtype)
    for query, key, queue in [
        (one.expand(8, 16).clone(), one.expand(8, 16).clone(), one.expand(32, 16).clone()),
        (unit(8, 16).to(dtype), -unit(8, 16).to(dtype), unit(32, 16).to(dtype)),
    ]:
        queue = None if mode == "in-batch" else queue
        query.requires_grad_()
        key.requires_grad_()
        loss = fn(query, key, queue, include_keys=mode == "queue+keys", **hyper)
        loss.backward()
        assert torch.isfinite(loss)
        assert torch.isfinite(query.grad).all() and torch.isfinite(key.grad).all()


def test_duplicated_embeddings_give_the_uniform_answer():
    """All candidates identical: p is uniform over K, so InfoNCE = log K exactly."""
    one = unit(1, 4)
    query, key, queue = one.expand(3, 4), one.expand(3, 4), one.expand(6, 4)
    torch.testing.assert_close(
        info_nce_loss(query, key, queue), torch.log(torch.tensor(7.0)).double()
    )


SMALL_TEMPERATURES = [1e-4, 3e-4, 1e-3, 1e-2, 0.1]
EPS32 = torch.finfo(torch.float32).eps


def float32_errors_and_bars(fn, backend, mode, temperature, *, seed, same=False, copies=None):
    """{output: (‖backend − float64‖, its bar)} for the per-row losses and the query's and key's
    gradients (of a weighted sum of the losses, both inputs online) of float32 inputs whose
    positives are their rows' largest logits; with ``same``, the key is the query itself. With
    ``copies`` the queue also holds copies of the keys, as when keys are pushed before their
    loss, or an image's key of the epoch before comes back: "exact" or "near" (1e-4 away) copies
    of half of them, or exact copies of "every" key.
    The bar: 3× the float32 reference's own error against float64 (another summation order
    rounds differently, by as much again), plus 8 float32 ulps of each output (a reference that
    rounds to exactly 0 leaves that much room)."""
    g = torch.Generator().manual_seed(seed)
    query = unit(48, 16, generator=g)
    noise = unit(48, 16, generator=g)
    key = query.clone() if same else torch.nn.functional.normalize(query + 0.1 * noise, dim=-1)
    queue = None if mode in ("in-batch", "symmetric") else unit(200, 16, generator=g)
    if copies is not None:
        copied = {"exact": key[:24], "every": key}.get(copies)
        copied = key[:24] + 1e-4 * unit(24, 16, generator=g) if copied is None else copied
        queue = torch.cat([queue[:100], torch.nn.functional.normalize(copied, dim=-1), queue[100:]])
    options = dict(temperature=temperature, reduction="none")
    if fn is not info_nce_loss:
        options["target_temperature"] = 0.05
    options |= dict(symmetric=True) if mode == "symmetric" else {}
    options |= dict(include_keys=True) if mode == "queue+keys" else {}

    def outputs(dtype, backend):
        q, k = (x.to(dtype).requires_grad_() for x in (query, key))
        losses = fn(q, k, None if queue is None else queue.to(dtype), backend=backend, **options)
        weights = torch.linspace(0.5, 1.5, losses.numel(), dtype=losses.dtype).view_as(losses)
        grads = torch.autograd.grad((losses * weights).sum(), (q, k), allow_unused=True)
        grads = [torch.zeros_like(x) if d is None else d for x, d in zip((q, k), grads)]
        return dict(zip(("losses", "query", "key"), (t.double() for t in (losses, *grads))))

    exact, own, got = (
        outputs(*args)
        for args in (
            (torch.float64, "reference"),
            (torch.float32, "reference"),
            (torch.float32, backend),
        )
    )
    return {
        name: (
            (got[name] - exact[name]).norm(),
            3 * (own[name] - exact[name]).norm()
            + 8 * EPS32 * ((exact[name].abs() + 1) if name == "losses" else exact[name]).norm(),
        )
        for name in exact
    }


@pytest.mark.parametrize("fn", LOSSES)
@pytest.mark.parametrize("temperature", SMALL_TEMPERATURES)
@pytest.mark.parametrize("mode", ["in-batch", "queue", "queue+keys", "symmetric"])
@pytest.mark.parametrize("same", [False, True], ids=["key-near-query", "key-is-query"])
def test_chunked_float32_errs_no_more_than_the_float32_reference_at_small_temperatures(
    fn, temperature, mode, same
):
    """At τ = 1e-4 the base-2 logits reach 1.4e4, whose float32 rounding (1e-3) once made chunked
    in-batch InfoNCE negative (−1.4e-3) where the reference gives 0: its positive's logit came
    from another product than the row's maximum. The key's gradient once summed P·x/τ and −x/τ
    at the positive after their products (their roundings, of x/τ, left over), and recomputed P
    from LSE = m + log l rounded to the ulp of m; ReSSL's loss once cancelled a_pos against
    U_b/l_b."""
    for name, (error, bar) in float32_errors_and_bars(
        fn, "chunked", mode, temperature, seed=3, same=same
    ).items():
        assert error <= bar, (name, error, bar)
    if fn is info_nce_loss:
        got = fn(
            *make_inputs("in-batch", n=8, d=4, dtype=torch.float32)[:2],
            backend="chunked",
            temperature=temperature,
            reduction="none",
        )
        assert (got >= 0).all()


@pytest.mark.parametrize("fn", LOSSES)
@pytest.mark.parametrize(
    "temperature",
    [1e-4, 1e-2] + [pytest.param(t, marks=pytest.mark.slow) for t in (3e-4, 1e-3, 0.1)],
)
@pytest.mark.parametrize("mode", ["queue", "queue+keys"])
@pytest.mark.parametrize("copies", ["exact", "near", "every"])
def test_chunked_float32_errs_no_more_than_the_float32_reference_with_copies_in_the_queue(
    fn, temperature, mode, copies
):
    """Copies of the keys in the queue once broke the bar three ways: the queue-mode positive's
    logit came from a row dot and its copy's from a chunk's GEMM, which round differently (SCE's
    loss 56× the bar with every key copied); a product of fewer than 64 columns also rounds
    differently; and the means O/l of distributions sharp on one candidate kept that
    candidate's rounding, which dL/dx = (O_a/l_a − c_pos)/τ (1e-3 at τ = 1e-4 where it is 0)
    and ReSSL's x·(c_max − O_b/l_b)/τ multiply by 1/τ."""
    for name, (error, bar) in float32_errors_and_bars(
        fn, "chunked", mode, temperature, seed=3, copies=copies
    ).items():
        assert error <= bar, (name, error, bar)


@pytest.mark.parametrize("mode", ["queue", "queue+keys"])
def test_chunked_ressl_loss_errs_as_the_reference_on_rows_whose_key_has_a_near_copy(mode):
    """Rows whose key has a copy 1e-4 away in the queue: both distributions are sharp on it, and
    ReSSL's loss Σ_k s²_k (m_a − a_k) is small terms only. The reference's float32 error on
    these rows is 5e-5 at τ = 1e-4; chunked's was 5e-3 while the target's mean O_b/l_b kept the
    rounding of its dominant candidate (the norm over every row hid it)."""
    g = torch.Generator().manual_seed(3)
    query = unit(48, 16, generator=g)
    key = torch.nn.functional.normalize(query + 0.1 * unit(48, 16, generator=g), dim=-1)
    queue = unit(200, 16, generator=g)
    copies = torch.nn.functional.normalize(key[:24] + 1e-4 * unit(24, 16, generator=g), dim=-1)
    queue = torch.cat([queue[:100], copies, queue[100:]])
    options = dict(temperature=1e-4, target_temperature=0.05, reduction="none")
    options |= dict(include_keys=mode == "queue+keys")
    exact = ressl_loss(query, key, queue, **options)[:24]
    own, got = (
        ressl_loss(query.float(), key.float(), queue.float(), backend=backend, **options)[:24]
        for backend in ("reference", "chunked")
    )
    assert (got.double() - exact).norm() <= 3 * (own.double() - exact).norm()


@pytest.mark.parametrize("backend", ["chunked", pytest.param("fused", marks=needs_fused)])
@pytest.mark.parametrize("temperature", [1e-4, pytest.param(1e-3, marks=pytest.mark.slow)])
@pytest.mark.parametrize(
    "fn, copies_per_key, copied_keys", [(sce_loss, 1, 24), (ressl_loss, 2, 48)]
)
def test_the_target_term_errs_as_the_reference_on_rows_whose_key_has_near_copies(
    fn, copies_per_key, copied_keys, temperature, backend
):
    """Near copies (1e-5 to 1e-4 away) of the keys in the queue: the positive is the online
    row's maximum and the target is sharp on the copies. The reference's rounding cancels in
    Σ_k (p_k − w_k)·a_k; chunked once summed the target term from candidate vectors, x·(c_max −
    O_b/l_b)/τ, beside log l_a from rounded logits, and erred 7× the bar on these rows (SCE, one
    copy of half the keys) and 18× (ReSSL, two copies of every key). The gap Σ_k w_k (m_a − a_k)
    is now summed from the same logits, as the fused kernels sum it."""
    g = torch.Generator().manual_seed(0)
    query = unit(48, 16, generator=g)
    key = torch.nn.functional.normalize(query + 0.1 * unit(48, 16, generator=g), dim=-1)
    copied = key[:copied_keys].repeat(copies_per_key, 1)
    scale = 1e-4 if copies_per_key == 1 else 1e-5
    noise = scale * unit(len(copied), 16, generator=g)
    queue = unit(200, 16, generator=g)
    queue = torch.cat(
        [queue[:100], torch.nn.functional.normalize(copied + noise, dim=-1), queue[100:]]
    )
    options = dict(temperature=temperature, target_temperature=0.05, reduction="none")
    exact = fn(query, key, queue, **options)[:copied_keys]
    own, got = (
        fn(query.float(), key.float(), queue.float(), backend=name, **options)[:copied_keys]
        for name in ("reference", backend)
    )
    ulps = 8 * torch.finfo(torch.float32).eps * (exact.abs() + 1).norm()
    assert (got.double() - exact).norm() <= 3 * (own.double() - exact).norm() + ulps


@pytest.mark.parametrize("fn", LOSSES)
@pytest.mark.parametrize("mode", ["in-batch", "queue", "symmetric"])
def test_chunked_losses_are_never_negative_at_the_smallest_temperatures(fn, mode):
    """Every loss here is a cross-entropy, ≥ 0: rounding at τ = τ_m = 1e-4 must not push it
    below (the target term Σ_k w_k (m − a_k) once rounded to −7e-4)."""
    g = torch.Generator().manual_seed(5)
    query = unit(64, 8, generator=g, dtype=torch.float32)
    queue = None if mode != "queue" else unit(256, 8, generator=g, dtype=torch.float32)
    options = {} if fn is info_nce_loss else dict(target_temperature=1e-4)
    options |= dict(symmetric=True) if mode == "symmetric" else {}
    for key in (
        query,
        torch.nn.functional.normalize(query + 1e-3 * torch.randn_like(query), dim=-1),
    ):
        losses = fn(
            query, key, queue, temperature=1e-4, reduction="none", backend="chunked", **options
        )
        assert (losses >= 0).all(), losses.min()


@pytest.mark.matrix
@needs_fused
# An overflow in the interpreter is an infinity on a GPU, even where a mask then drops it.
@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("fn", LOSSES)
@pytest.mark.parametrize(
    "temperature",
    [1e-3] + [pytest.param(t, marks=pytest.mark.slow) for t in (1e-4, 3e-4, 1e-2, 0.1)],
)
@pytest.mark.parametrize("mode", ["in-batch", "queue", "queue+keys"])
@pytest.mark.parametrize("same", [False, True], ids=["key-near-query", "key-is-query"])
def test_fused_float32_errs_no_more_than_the_float32_reference_at_small_temperatures(
    fn, temperature, mode, same
):
    """The key pass once recomputed P from LSE = m + log l, rounded to the ulp of m: ReSSL's key
    gradient erred 3.3× the float32 reference's own error at τ = 1e-3."""
    for name, (error, bar) in float32_errors_and_bars(
        fn, "fused", mode, temperature, seed=3, same=same
    ).items():
        assert error <= bar, (name, error, bar)


@pytest.mark.matrix
@needs_fused
# An overflow in the interpreter is an infinity on a GPU, even where a mask then drops it.
@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("fn", LOSSES)
@pytest.mark.parametrize(
    "temperature",
    [1e-4] + [pytest.param(t, marks=pytest.mark.slow) for t in (3e-4, 1e-3, 1e-2, 0.1)],
)
@pytest.mark.parametrize("mode", ["queue", "queue+keys"])
@pytest.mark.parametrize("copies", ["exact", "near", "every"])
def test_fused_float32_errs_no_more_than_the_float32_reference_with_copies_in_the_queue(
    fn, temperature, mode, copies
):
    """The finalize kernel once added the queue-mode positive to O_a before the other columns,
    so that an exact copy of it left the rounding of c_pos/τ in dL/dx (1.4e-3 at τ = 1e-4, where
    the exact value is 0); and the loss was LSE_a − λ·a_pos − (1−λ)·u_b/l_b, large logits
    subtracted after their rounding (SCE with every key copied: 56× the bar, InfoNCE with
    ``include_keys`` 113×), where it is now summed from gaps to the online maximum."""
    for name, (error, bar) in float32_errors_and_bars(
        fn, "fused", mode, temperature, seed=3, copies=copies
    ).items():
        assert error <= bar, (name, error, bar)
