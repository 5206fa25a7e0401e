"""The vectorised losses against the literal per-row transcription of the equations."""

import literal
import pytest
import torch
from conftest import make_inputs

from sce_loss import info_nce_loss, ressl_loss, sce_loss

LOSSES = {
    "infonce": (info_nce_loss, dict(temperature=0.2)),
    "ressl": (ressl_loss, dict(temperature=0.1, target_temperature=0.04)),
    "sce": (sce_loss, dict(coeff=0.3, temperature=0.1, target_temperature=0.05)),
}


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("crops", [None, 3])
def test_per_row_losses_match_the_literal_transcription(name, mode, crops):
    fn, hyper = LOSSES[name]
    query, key, queue, include_keys = make_inputs(mode, crops=crops, seed=1)
    got = fn(query, key, queue, include_keys=include_keys, reduction="none", **hyper)
    table = literal.rows(name, query, key, queue, include_keys=include_keys, **hyper)
    want = torch.tensor([row[2] for row in table], dtype=torch.float64).view(got.shape)
    assert got.shape == ((crops, 5) if crops else (5,))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        fn(query, key, queue, include_keys=include_keys, **hyper),
        want.mean(),
        rtol=1e-12,
        atol=1e-12,
    )
    torch.testing.assert_close(
        fn(query, key, queue, include_keys=include_keys, reduction="sum", **hyper),
        want.sum(),
        rtol=1e-12,
        atol=1e-12,
    )


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("crops", [None, 2])
def test_gradients_match_the_literal_transcription(name, mode, crops):
    """Gradient through every online use of query and key; none through the target or the queue."""
    fn, hyper = LOSSES[name]
    query, key, queue, include_keys = make_inputs(mode, crops=crops, seed=2)
    query.requires_grad_()
    key.requires_grad_()
    queue = None if queue is None else queue.requires_grad_()
    fn(query, key, queue, include_keys=include_keys, **hyper).backward()
    want_query, want_key = literal.key_and_query_gradients(
        name,
        query.detach(),
        key.detach(),
        None if queue is None else queue.detach(),
        include_keys=include_keys,
        **hyper,
    )
    torch.testing.assert_close(
        query.grad, torch.tensor(want_query, dtype=torch.float64), rtol=1e-10, atol=1e-12
    )
    torch.testing.assert_close(
        key.grad, torch.tensor(want_key, dtype=torch.float64), rtol=1e-10, atol=1e-12
    )
    assert queue is None or queue.grad is None


def test_queue_mode_ressl_gives_the_key_no_gradient():
    """ReSSL's online softmax excludes the positive, so in queue mode the key is no candidate."""
    query, key, queue, _ = make_inputs("queue")
    key.requires_grad_()
    ressl_loss(query.requires_grad_(), key, queue).backward()
    assert key.grad is None or not key.grad.any()


def test_normalize_equals_normalising_first():
    g = torch.Generator().manual_seed(3)
    query, key, queue = (torch.randn(s, 6, generator=g, dtype=torch.float64) * 3 for s in (4, 4, 9))
    unit = lambda x: torch.nn.functional.normalize(x, dim=-1)  # noqa: E731
    got = sce_loss(query, key, queue, normalize=True)
    torch.testing.assert_close(
        got, sce_loss(unit(query), unit(key), unit(queue)), rtol=1e-14, atol=0
    )
    assert not torch.allclose(got, sce_loss(query, key, queue))


def test_default_hyper_parameters_are_the_papers():
    query, key, queue, _ = make_inputs("queue", seed=4)
    torch.testing.assert_close(
        sce_loss(query, key, queue),
        sce_loss(query, key, queue, coeff=0.5, temperature=0.1, target_temperature=0.05),
        rtol=0,
        atol=0,
    )
    torch.testing.assert_close(
        info_nce_loss(query, key, queue),
        info_nce_loss(query, key, queue, temperature=0.2),
        rtol=0,
        atol=0,
    )
    torch.testing.assert_close(
        ressl_loss(query, key, queue),
        ressl_loss(query, key, queue, temperature=0.1, target_temperature=0.04),
        rtol=0,
        atol=0,
    )
