"""Low-precision inputs, extreme temperatures and degenerate embeddings."""

import pytest
import torch
from conftest import make_inputs, unit

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
