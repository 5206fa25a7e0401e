"""MemoryQueue (ring buffer, persistence, MoCo order) and the nn.Module wrappers."""

import pytest
import torch
from conftest import make_inputs, unit

from sce_loss import (
    CACRLoss,
    InfoNCELoss,
    MemoryQueue,
    ReCoLoss,
    ReSSLLoss,
    SCELoss,
    cacr_loss,
    info_nce_loss,
    reco_loss,
    ressl_loss,
    sce_loss,
)


def test_queue_starts_as_unit_vectors_and_is_saved_in_state_dict():
    queue = MemoryQueue(10, 4)
    torch.testing.assert_close(queue.keys.norm(dim=1), torch.ones(10))
    assert set(queue.state_dict()) == {"keys", "pointer"}


def test_initial_keys_depend_on_the_seed_only_so_ranks_agree():
    torch.manual_seed(1)
    first = MemoryQueue(10, 4)
    torch.manual_seed(2)
    assert torch.equal(MemoryQueue(10, 4).keys, first.keys)
    assert not torch.equal(MemoryQueue(10, 4, seed=1).keys, first.keys)


def test_push_wraps_around_with_a_batch_that_does_not_divide_the_size():
    queue = MemoryQueue(7, 2)
    pushed = []
    for step in range(6):
        batch = torch.full((3, 2), float(step)) + torch.arange(3.0)[:, None] / 10
        queue.push(batch)
        pushed.extend(batch)
    # 18 keys pushed one by one into 7 slots: slot s holds the last key t with t % 7 == s.
    want = torch.stack([pushed[max(t for t in range(18) if t % 7 == s)] for s in range(7)])
    torch.testing.assert_close(queue.keys, want)
    assert int(queue.pointer) == 18 % 7


def test_push_of_more_keys_than_the_size_keeps_the_newest():
    queue = MemoryQueue(4, 1)
    queue.push(torch.zeros(2, 1))
    queue.push(torch.arange(9.0)[:, None])
    assert int(queue.pointer) == 11 % 4
    # key t of the second push lands at (2 + t) % 4; the last four, 5..8, at slots 3, 0, 1, 2.
    torch.testing.assert_close(queue.keys.squeeze(1), torch.tensor([6.0, 7.0, 8.0, 5.0]))


def test_state_dict_round_trip_restores_keys_and_pointer():
    queue = MemoryQueue(5, 3)
    queue.push(unit(3, 3, dtype=torch.float32))
    restored = MemoryQueue(5, 3)
    restored.load_state_dict(queue.state_dict())
    assert torch.equal(restored.keys, queue.keys) and int(restored.pointer) == 3
    batch = unit(4, 3, dtype=torch.float32)
    queue.push(batch)
    restored.push(batch)
    assert torch.equal(restored.keys, queue.keys)


def test_bfloat16_storage_and_a_float32_loss():
    queue = MemoryQueue(16, 8, dtype=torch.bfloat16)
    keys = unit(4, 8, dtype=torch.float32)
    queue.push(keys)
    assert queue.keys.dtype == torch.bfloat16
    torch.testing.assert_close(queue.keys[:4].float(), keys, rtol=1e-2, atol=1e-2)
    loss = sce_loss(unit(4, 8, dtype=torch.float32), keys, queue.keys)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_read_before_push_moco_order():
    """The loss reads the queue as it was before this step's keys; push then enqueues them."""
    torch.manual_seed(0)
    queue = MemoryQueue(6, 4, dtype=torch.float64)
    query, key, _, _ = make_inputs("queue", n=3, d=4, seed=11)
    old = queue.keys.clone()
    query.requires_grad_()
    loss = sce_loss(query, key, queue.keys)
    loss.backward()
    torch.testing.assert_close(loss, sce_loss(query, key, old))
    queue.push(key)
    torch.testing.assert_close(queue.keys[:3], key)
    torch.testing.assert_close(queue.keys[3:], old[3:])


def test_push_does_not_mutate_its_argument_and_rejects_bad_keys():
    queue = MemoryQueue(6, 4)
    keys = unit(3, 4, dtype=torch.float32)
    before = keys.clone()
    queue.push(keys)
    assert torch.equal(keys, before)
    stored = queue.keys.clone()
    with pytest.raises(ValueError, match=r"keys must be \(B, 4\)"):
        queue.push(unit(3, 5, dtype=torch.float32))
    with pytest.raises(TypeError, match="keys must be a torch.Tensor"):
        queue.push([[0.0] * 4])
    with pytest.raises(ValueError, match="size must be an int ≥ 1, got 0"):
        MemoryQueue(0, 4)
    with pytest.raises(TypeError, match="dtype must be one of .* got 'float16'"):
        MemoryQueue(8, 4, dtype="float16")
    for dtype in (torch.int64, torch.float8_e4m3fn):
        with pytest.raises(TypeError, match="dtype must be one of"):
            MemoryQueue(8, 4, dtype=dtype)
    for seed in ("a", 1.5):
        with pytest.raises(TypeError, match="seed must be an int"):
            MemoryQueue(8, 4, seed=seed)
    with pytest.raises(TypeError, match="gather must be a bool or a torch.distributed"):
        MemoryQueue(8, 4, gather="yes")
    with pytest.raises(TypeError, match="keys must be float64, float32, bfloat16 or float16"):
        queue.push(torch.ones(2, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="keys must be finite"):
        queue.push(torch.full((2, 4), float("nan")))
    with pytest.raises(ValueError, match="keys must be on the queue's device cpu, got meta"):
        queue.push(torch.ones(2, 4, device="meta"))
    assert (
        torch.equal(queue.keys, stored) and int(queue.pointer) == 3
    )  # refused pushes changed nothing


@pytest.mark.parametrize(
    "module, fn, hyper",
    [
        (SCELoss, sce_loss, dict(coeff=0.7, temperature=0.2, target_temperature=0.03)),
        (InfoNCELoss, info_nce_loss, dict(temperature=0.3)),
        (ReSSLLoss, ressl_loss, dict(temperature=0.2, target_temperature=0.03)),
    ],
)
def test_modules_call_the_functions_with_their_hyper_parameters(module, fn, hyper, mode):
    query, key, queue, include_keys = make_inputs(mode, seed=13)
    torch.testing.assert_close(
        module(**hyper, include_keys=include_keys)(query, key, queue),
        fn(query, key, queue, include_keys=include_keys, **hyper),
        rtol=0,
        atol=0,
    )
    held = MemoryQueue(7, 8, dtype=torch.float64)
    torch.testing.assert_close(
        module(**hyper, include_keys=include_keys, queue=held)(query, key),
        fn(query, key, held.keys, include_keys=include_keys, **hyper),
        rtol=0,
        atol=0,
    )


def test_module_with_a_queue_saves_it_in_its_state_dict():
    loss_fn = SCELoss(queue=MemoryQueue(8, 4))
    assert {"queue.keys", "queue.pointer"} <= set(loss_fn.state_dict())
    assert "coeff=0.5" in repr(loss_fn)


def test_relational_modules_equal_their_functions():
    query, key, queue = (unit(*s) for s in ((2, 5, 4), (2, 5, 4), (7, 4)))
    assert torch.equal(
        CACRLoss(repulsion_temperature=0.5)(query, key, queue),
        cacr_loss(query, key, queue, repulsion_temperature=0.5),
    )
    extra = dict(
        weak_key=unit(5, 4), weak_queue=unit(6, 4), mixed_query=unit(5, 4), mixed_key=unit(5, 4)
    )
    assert torch.equal(
        ReCoLoss(local_weight=1.0)(query[0], key[0], queue, **extra),
        reco_loss(query[0], key[0], queue, local_weight=1.0, **extra),
    )
    held = ReCoLoss(
        queue=MemoryQueue(7, 4, dtype=torch.float64),
        weak_queue=MemoryQueue(6, 4, dtype=torch.float64, seed=1),
    )
    extra["weak_queue"] = held.weak_queue.keys
    assert torch.equal(
        held(query[0], key[0], **{k: v for k, v in extra.items() if k != "weak_queue"}),
        reco_loss(query[0], key[0], held.queue.keys, **extra),
    )
    assert {"queue.keys", "weak_queue.keys"} <= set(held.state_dict())


def test_relational_modules_check_their_hyper_parameters_in_init():
    with pytest.raises(ValueError, match="repulsion_weight must be a finite number ≥ 0"):
        CACRLoss(repulsion_weight=-1.0)
    with pytest.raises(ValueError, match="relation_temperature must be a finite number"):
        ReCoLoss(relation_temperature=0.0)
    with pytest.raises(TypeError, match="weak_queue must be a MemoryQueue or None"):
        ReCoLoss(weak_queue=torch.zeros(3, 4))


def test_cacr_module_keywords_are_the_functions_keywords():
    import inspect

    function = {
        n: p.default
        for n, p in inspect.signature(cacr_loss).parameters.items()
        if p.kind == p.KEYWORD_ONLY
    }
    init = {n: p.default for n, p in inspect.signature(CACRLoss).parameters.items() if n != "queue"}
    assert init == function
