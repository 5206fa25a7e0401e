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


def float32_error_bar(fn, backend, mode, temperature, *, seed):
    """(‖backend − float64‖, its bar) over the per-row losses of float32 inputs whose positives
    are their rows' largest logits. The bar: 3× the float32 reference's own error against
    float64 (another summation order rounds differently, by as much again), plus 8 float32 ulps
    of each loss (a reference that rounds to exactly 0 leaves that much room)."""
    g = torch.Generator().manual_seed(seed)
    query = unit(48, 16, generator=g)
    key = torch.nn.functional.normalize(query + 0.1 * unit(48, 16, generator=g), dim=-1)
    queue = None if mode == "in-batch" else unit(200, 16, generator=g)
    options = dict(temperature=temperature, reduction="none")
    if fn is not info_nce_loss:
        options["target_temperature"] = 0.05
    options |= dict(symmetric=True) if mode == "symmetric" else {}
    options |= dict(include_keys=True) if mode == "queue+keys" else {}
    queue = None if mode == "symmetric" else queue

    def losses(dtype, backend):
        low = [None if x is None else x.to(dtype) for x in (query, key, queue)]
        return fn(*low, backend=backend, **options).double()

    exact = losses(torch.float64, "reference")
    own = (losses(torch.float32, "reference") - exact).norm()
    slack = 8 * torch.finfo(torch.float32).eps * (exact.abs() + 1).norm()
    return (losses(torch.float32, backend) - exact).norm(), 3 * own + slack


@pytest.mark.parametrize("fn", LOSSES)
@pytest.mark.parametrize("temperature", SMALL_TEMPERATURES)
@pytest.mark.parametrize("mode", ["in-batch", "queue", "queue+keys", "symmetric"])
def test_chunked_float32_errs_no_more_than_the_float32_reference_at_small_temperatures(
    fn, temperature, mode
):
    """At τ = 1e-4 the base-2 logits reach 1.4e4, whose float32 rounding (1e-3) once made chunked
    in-batch InfoNCE negative (−1.4e-3) where the reference gives 0: its positive's logit came
    from another product than the row's maximum."""
    error, bar = float32_error_bar(fn, "chunked", mode, temperature, seed=3)
    assert error <= bar, (error, bar)
    if fn is info_nce_loss:
        got = fn(
            *make_inputs("in-batch", n=8, d=4, dtype=torch.float32)[:2],
            backend="chunked",
            temperature=temperature,
            reduction="none",
        )
        assert (got >= 0).all()


@needs_fused
@pytest.mark.parametrize("fn", [info_nce_loss, sce_loss])
@pytest.mark.parametrize(
    "temperature", [1e-4] + [pytest.param(t, marks=pytest.mark.slow) for t in (1e-3, 1e-2, 0.1)]
)
@pytest.mark.parametrize("mode", ["in-batch", "queue", "queue+keys"])
def test_fused_float32_errs_no_more_than_the_float32_reference_at_small_temperatures(
    fn, temperature, mode
):
    error, bar = float32_error_bar(fn, "fused", mode, temperature, seed=3)
    assert error <= bar, (error, bar)
