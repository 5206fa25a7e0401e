"""torch.autograd.gradcheck in float64, including a learnable temperature."""

import pytest
import torch
from conftest import make_inputs

from sce_loss import info_nce_loss, ressl_loss, sce_loss

# A finite-difference step on ``key`` also moves the target, which is a constant by definition, so
# gradcheck differentiates through ``query`` and τ; test_equations checks the key's gradient. For
# InfoNCE the target does not depend on the key, so gradcheck covers the key too.
CASES = {
    "infonce": (info_nce_loss, {}, True),
    "ressl": (ressl_loss, dict(target_temperature=0.07), False),
    "sce": (sce_loss, dict(coeff=0.4, target_temperature=0.07), False),
}


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("crops", [None, 2])
def test_gradcheck_query_key_and_learnable_temperature(name, mode, crops):
    fn, hyper, key_too = CASES[name]
    query, key, queue, include_keys = make_inputs(mode, n=4, d=3, m=5, crops=crops, seed=5)
    temperature = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    query.requires_grad_()
    key.requires_grad_(key_too)

    def loss(query, key, temperature):
        return fn(
            query,
            key,
            queue,
            temperature=temperature,
            include_keys=include_keys,
            reduction="none",
            **hyper,
        )

    assert torch.autograd.gradcheck(loss, (query, key, temperature))


def test_learnable_temperature_receives_a_gradient():
    query, key, queue, _ = make_inputs("queue", seed=6)
    temperature = torch.tensor(0.1, requires_grad=True)
    sce_loss(query.float(), key.float(), queue.float(), temperature=temperature).backward()
    assert temperature.grad is not None and temperature.grad.item() != 0


def test_coeff_and_target_temperature_get_no_gradient():
    """They shape the target, a constant: no gradient flows into them."""
    query, key, queue, _ = make_inputs("in-batch", seed=7)
    coeff = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    target_temperature = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    loss = sce_loss(
        query.requires_grad_(), key, queue, coeff=coeff, target_temperature=target_temperature
    )
    loss.backward()
    assert coeff.grad is None and target_temperature.grad is None
    assert query.grad is not None
