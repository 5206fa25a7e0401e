"""W gloo processes must give exactly the loss and gradients of one process holding every batch."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import HAS_FUSED, MODES, make_inputs, needs_fused

from sce_loss import MemoryQueue, info_nce_loss, ressl_loss, sce_loss

LOSSES = {
    "infonce": (info_nce_loss, dict(temperature=0.2)),
    "ressl": (ressl_loss, dict(temperature=0.1, target_temperature=0.04)),
    "sce": (sce_loss, dict(coeff=0.3, temperature=0.1, target_temperature=0.05)),
}
N_PER_RANK = 3
CASES = [(name, mode, crops) for name in LOSSES for mode in MODES for crops in (None, 2)]
# The fused kernels (through Triton's interpreter without a GPU), float32, where keys are gathered.
FUSED_CASES = [(name, mode, None) for name in LOSSES for mode in ("in-batch", "queue+keys")]


def full_batch(mode, world, crops, dtype=torch.float64):
    return make_inputs(mode, n=N_PER_RANK * world, d=6, m=5, crops=crops, seed=world, dtype=dtype)


def loss_and_gradients(name, query, key, queue, include_keys, gather, backend="reference"):
    fn, hyper = LOSSES[name]
    query, key = query.clone().requires_grad_(), key.clone().requires_grad_()
    loss = fn(query, key, queue, include_keys=include_keys, gather=gather, backend=backend, **hyper)
    loss.backward()
    return loss.detach(), query.grad, key.grad


SYMMETRIC_CASES = [(name, backend) for name in LOSSES for backend in ("reference", "chunked")]


def symmetric_batch(world):
    """Two views (z1, z2) of every rank's samples, float64."""
    query, key, _, _ = make_inputs("in-batch", n=N_PER_RANK * world, d=6, seed=20 + world)
    return query, key


def symmetric_loss_and_gradients(name, z1, z2, gather, backend):
    fn, hyper = LOSSES[name]
    z1, z2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    loss = fn(z1, z2, symmetric=True, gather=gather, backend=backend, **hyper)
    loss.backward()
    return loss.detach(), z1.grad, z2.grad


def _worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        rows = slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK)
        results = {}
        for name, mode, crops in CASES:
            query, key, queue, include_keys = full_batch(mode, world, crops)
            results[name, mode, crops] = loss_and_gradients(
                name, query[..., rows, :], key[rows], queue, include_keys, gather=True
            )
        for name, mode, crops in FUSED_CASES if HAS_FUSED else ():
            query, key, queue, include_keys = full_batch(mode, world, crops, torch.float32)
            results["fused", name, mode] = loss_and_gradients(
                name, query[rows], key[rows], queue, include_keys, gather=True, backend="fused"
            )
        for name, backend in SYMMETRIC_CASES:
            z1, z2 = symmetric_batch(world)
            results["symmetric", name, backend] = symmetric_loss_and_gradients(
                name, z1[rows], z2[rows], gather=True, backend=backend
            )
        results["positives"] = _positives_gathered(rank, world)
        results["labelled queue"] = _labelled_queue_gathered(rank, world)
        results["compiled"] = _compiled_gather(rank, world)
        results["host reads"] = _host_reads_of_a_gathered_step(rank, world)
        queue = MemoryQueue(7, 2, dtype=torch.float64)
        torch.manual_seed(rank)
        for step in range(5):
            queue.push(torch.randn(N_PER_RANK, 2, dtype=torch.float64) + 10 * step + rank)
        results["queue"] = queue.keys.clone(), queue.pointer.clone()
        torch.manual_seed(100 + rank)  # ranks' global RNGs differ, as in real training
        partly_filled = MemoryQueue(100, 2, dtype=torch.float64)
        partly_filled.push(torch.full((N_PER_RANK, 2), float(rank), dtype=torch.float64))
        results["partly filled"] = partly_filled.keys.clone()
        results["uneven"] = _uneven_batches(rank)
        # Every rank past its last collective before any tears the group down: a rank that
        # destroys it while another still talks to it can abort the process (gloo).
        dist.barrier()
        torch.save(results, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


POSITIVES_CASES = [
    (positives, labelled) for positives in ("mean", "pooled", "pairs") for labelled in (0, 1)
] + [("dclw", 0)]


def positives_batch(world):
    """Three views of every rank's samples and their labels (several per class), float64."""
    n = N_PER_RANK * world
    views = torch.nn.functional.normalize(
        torch.randn(3, n, 6, generator=torch.Generator().manual_seed(40), dtype=torch.float64),
        dim=-1,
    )
    return views, torch.arange(n) % 2


def positives_sum_and_gradient(views, labels, positives, labelled, gather):
    """Σ of the per-row losses and the views' gradient; ``positives`` "dclw": DCLW over the first
    two views (its weights over the gathered batch)."""
    options = dict(positives=positives)
    if positives == "dclw":
        views, options = views[:2], dict(decoupled=True, weight_sigma=0.5)
    views = views.clone().requires_grad_()
    loss = info_nce_loss(
        views,
        symmetric=True,
        labels=labels if labelled else None,
        reduction="sum",
        gather=gather,
        **options,
    )
    loss.backward()
    return loss.detach(), views.grad


def _positives_gathered(rank, world):
    """Several positives per row, gathered: each rank's summed losses and its views' gradients;
    and the mean reduction where ranks hold different numbers of terms."""
    views, labels = positives_batch(world)
    rows = slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK)
    results = {
        case: positives_sum_and_gradient(views[:, rows], labels[rows], *case, gather=True)
        for case in POSITIVES_CASES
    }
    uneven = uneven_labels(world)
    for name, call in UNEVEN_MEANS.items():
        x = views.clone()[:, rows].requires_grad_()
        loss = call(x, uneven[rows], True)
        loss.backward()
        results["mean", name] = loss.detach(), x.grad
    return results


def uneven_labels(world):
    """Labels whose rows with a positive (and pairs) differ from rank to rank: rank 0's samples
    share two classes, the others' are mostly singletons."""
    return torch.tensor([0, 0, 1] + [2 + i for i in range(N_PER_RANK * (world - 1))])


UNEVEN_MEANS = {
    "sce, one view": lambda x, labels, gather: sce_loss(
        x[0], symmetric=True, labels=labels, gather=gather
    ),
    "info_nce pairs": lambda x, labels, gather: info_nce_loss(
        x, symmetric=True, labels=labels, positives="pairs", gather=gather
    ),
}


LABELLED_QUEUE_CASES = [(name, include_keys) for name in LOSSES for include_keys in (0, 1)]


def labelled_queue_batch(world):
    """Every rank's queries, keys and labels, and a labelled queue, float64."""
    query, key, queue, _ = make_inputs("queue", n=N_PER_RANK * world, d=6, m=5, seed=50 + world)
    return query, key, queue, torch.arange(len(key)) % 2, torch.tensor([1, 0, -1, 1, 0])


def labelled_queue_loss(name, query, key, queue, labels, queue_labels, include_keys, gather):
    fn, hyper = LOSSES[name]
    query, key = query.clone().requires_grad_(), key.clone().requires_grad_()
    loss = fn(query, key, queue, labels=labels, queue_labels=queue_labels, reduction="sum",
              include_keys=bool(include_keys), gather=gather, **hyper)  # fmt: skip
    loss.backward()
    return loss.detach(), query.grad, key.grad


def _labelled_queue_gathered(rank, world):
    """Labels with a queue, gathered: each rank's summed losses and gradients; and a labelled
    MemoryQueue after every rank's pushes."""
    query, key, queue, labels, queue_labels = labelled_queue_batch(world)
    rows = slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK)
    results = {
        case: labelled_queue_loss(
            case[0], query[rows], key[rows], queue, labels[rows], queue_labels, case[1], True
        )
        for case in LABELLED_QUEUE_CASES
    }
    bank = MemoryQueue(4, 6, dtype=torch.float64, labels=True)
    bank.push(key[rows], labels[rows] + 10 * rank)
    results["bank"] = bank.keys.clone(), bank.labels.clone()
    return results


def _uneven_batches(rank):
    """{mismatch: {call: error}}: the error of each gathering call when rank r holds N + r
    samples, or D = 2 + r dimensions, or (rank 1) float32 among float64, or (symmetric form)
    2 + r views, with CPU tensors (checked without TORCH_DISTRIBUTED_DEBUG); None where a call
    raised none."""

    def unit(n, d, dtype=torch.float64):
        return torch.nn.functional.normalize(torch.randn(n, d, dtype=dtype), dim=1)

    batches = {
        "samples": unit(N_PER_RANK + rank, 2),
        "dim": unit(N_PER_RANK, 2 + rank),
        "dtype": unit(N_PER_RANK, 2, torch.float32 if rank == 1 else torch.float64),
    }
    errors = {
        mismatch: {name: _error_of(call) for name, call in _gathering_calls(x).items()}
        for mismatch, x in batches.items()
    }
    views = torch.stack([unit(N_PER_RANK, 2) for _ in range(2 + rank)])
    errors["views"] = {
        "symmetric, V views": _error_of(lambda: info_nce_loss(views, symmetric=True, gather=True))
    }
    return errors


def _gathering_calls(x):
    """Every gathering call on the batch x, by name."""
    from sce_loss import cacr_loss

    queue = MemoryQueue(7, x.shape[1], dtype=x.dtype)
    return {
        "push": lambda: queue.push(x),
        "in-batch": lambda: sce_loss(x, x, gather=True),
        "include_keys": lambda: sce_loss(x, x, queue.keys, include_keys=True, gather=True),
        "symmetric": lambda: info_nce_loss(x, x, symmetric=True, gather=True),
        "cacr": lambda: cacr_loss(x, x, gather=True),
        "cacr one encoder": lambda: cacr_loss(torch.stack([x, x]), gather=True),
    }


def _error_of(call):
    try:
        call()
    except ValueError as error:
        return str(error)
    return None


def _compiled_gather(rank, world):
    """A step with a gathered in-batch loss compiles fullgraph and gives the eager numbers."""
    query, key, _, _ = full_batch("in-batch", world, None, torch.float32)
    rows = slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK)

    def step(query, key):
        return sce_loss(query, key, gather=True, backend="reference")

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    outputs = []
    for fn in (step, compiled):
        q, k = query[rows].clone().requires_grad_(), key[rows].clone().requires_grad_()
        loss = fn(q, k)
        loss.backward()
        outputs.append((loss.detach(), q.grad, k.grad))
    return outputs


def _host_reads_of_a_gathered_step(rank, world):
    """The number of host-side collectives (dist.all_gather of sizes) a gathered step makes: one,
    the sizes' check, for CPU tensors (module docstring of sce_loss.distributed); none on a GPU
    unless TORCH_DISTRIBUTED_DEBUG=DETAIL."""
    calls = []
    original = dist.all_gather
    dist.all_gather = lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs)
    try:
        query, key, _, _ = full_batch("in-batch", world, None)
        rows = slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK)
        sce_loss(query[rows], key[rows].requires_grad_(), gather=True).backward()
    finally:
        dist.all_gather = original
    return len(calls)


@pytest.fixture(scope="module", params=[2, pytest.param(3, marks=pytest.mark.slow)])
def ranks(request):
    world = request.param
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(world, os.path.join(out_dir, "init"), out_dir), nprocs=world)
        yield world, [torch.load(os.path.join(out_dir, f"{r}.pt")) for r in range(world)]


@pytest.mark.parametrize("name, mode, crops", CASES)
def test_ranks_match_one_process_on_the_concatenated_batch(ranks, name, mode, crops):
    """mean_r L_r = L, and each rank's gradients are W × the one-process gradients (DDP divides)."""
    world, results = ranks
    query, key, queue, include_keys = full_batch(mode, world, crops)
    loss, grad_query, grad_key = loss_and_gradients(
        name, query, key, queue, include_keys, gather=False
    )
    per_rank = [r[name, mode, crops] for r in results]
    torch.testing.assert_close(
        torch.stack([r[0] for r in per_rank]).mean(), loss, rtol=1e-12, atol=1e-14
    )
    for rank, (_, rank_grad_query, rank_grad_key) in enumerate(per_rank):
        rows = slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK)
        torch.testing.assert_close(
            rank_grad_query, world * grad_query[..., rows, :], rtol=1e-10, atol=1e-13
        )
        torch.testing.assert_close(rank_grad_key, world * grad_key[rows], rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("name, backend", SYMMETRIC_CASES)
def test_symmetric_ranks_match_one_process_holding_both_views_of_every_batch(ranks, name, backend):
    """SimCLR form, gathered (lightly's gather_distributed): every rank's z1 and z2 are
    candidates; mean_r L_r = L and each rank's gradients are W × its rows' one-process ones."""
    world, results = ranks
    z1, z2 = symmetric_batch(world)
    loss, grad_z1, grad_z2 = symmetric_loss_and_gradients(
        name, z1, z2, gather=False, backend="reference"
    )
    per_rank = [r["symmetric", name, backend] for r in results]
    torch.testing.assert_close(
        torch.stack([r[0] for r in per_rank]).mean(), loss, rtol=1e-12, atol=1e-14
    )
    for rank, (_, rank_grad_z1, rank_grad_z2) in enumerate(per_rank):
        rows = slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK)
        torch.testing.assert_close(rank_grad_z1, world * grad_z1[rows], rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(rank_grad_z2, world * grad_z2[rows], rtol=1e-10, atol=1e-13)


@needs_fused
@pytest.mark.parametrize("name, mode, crops", FUSED_CASES)
def test_fused_ranks_match_one_fused_process(ranks, name, mode, crops):
    world, results = ranks
    query, key, queue, include_keys = full_batch(mode, world, crops, torch.float32)
    loss, grad_query, grad_key = loss_and_gradients(
        name, query, key, queue, include_keys, gather=False, backend="fused"
    )
    per_rank = [r["fused", name, mode] for r in results]
    torch.testing.assert_close(
        torch.stack([r[0] for r in per_rank]).mean(), loss, rtol=1e-5, atol=1e-6
    )
    for rank, (_, rank_grad_query, rank_grad_key) in enumerate(per_rank):
        rows = slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK)
        torch.testing.assert_close(rank_grad_query, world * grad_query[rows], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rank_grad_key, world * grad_key[rows], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("positives, labelled", POSITIVES_CASES)
def test_several_positives_gathered_equal_one_process(ranks, positives, labelled):
    """V = 3 views with or without labels, and DCLW (its weights over the gathered batch): Σ_r L_r
    is the one process's summed loss, and each rank's gradients are the one process's for its
    rows (labels gathered with the views)."""
    world, results = ranks
    views, labels = positives_batch(world)
    loss, grad = positives_sum_and_gradient(views, labels, positives, labelled, gather=False)
    per_rank = [r["positives"][positives, labelled] for r in results]
    torch.testing.assert_close(sum(r[0] for r in per_rank), loss, rtol=1e-12, atol=1e-13)
    for rank, (_, rank_grad) in enumerate(per_rank):
        rows = slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK)
        torch.testing.assert_close(rank_grad, grad[:, rows], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name, include_keys", LABELLED_QUEUE_CASES)
def test_labels_with_a_queue_gathered_equal_one_process(ranks, name, include_keys):
    """With include_keys every rank's keys and labels are candidates; in plain queue mode a row
    sees its own key only, so each rank's loss is its rows' share of the one process's."""
    world, results = ranks
    query, key, queue, labels, queue_labels = labelled_queue_batch(world)
    loss, grad_query, grad_key = labelled_queue_loss(
        name, query, key, queue, labels, queue_labels, include_keys, gather=False
    )
    per_rank = [r["labelled queue"][name, include_keys] for r in results]
    torch.testing.assert_close(sum(r[0] for r in per_rank), loss, rtol=1e-12, atol=1e-13)
    for rank, (_, rank_grad_query, rank_grad_key) in enumerate(per_rank):
        rows = slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK)
        torch.testing.assert_close(rank_grad_query, grad_query[rows], rtol=1e-10, atol=1e-12)
        if not include_keys:  # gathered keys' gradients are summed by the training step
            torch.testing.assert_close(rank_grad_key, grad_key[rows], rtol=1e-10, atol=1e-12)


def test_a_labelled_queue_holds_every_ranks_keys_and_labels(ranks):
    world, results = ranks
    _, key, _, labels, _ = labelled_queue_batch(world)
    expected = MemoryQueue(4, 6, dtype=torch.float64, labels=True)
    expected.push(key, labels + 10 * torch.arange(world).repeat_interleave(N_PER_RANK))
    for r in results:
        keys, queue_labels = r["labelled queue"]["bank"]
        assert torch.equal(keys, expected.keys) and torch.equal(queue_labels, expected.labels)


@pytest.mark.parametrize("name", UNEVEN_MEANS)
def test_the_mean_of_the_ranks_losses_is_one_process_even_with_uneven_terms(ranks, name):
    """Each rank divides by every rank's number of terms (rows with a positive, or pairs), so
    the ranks' mean loss and their mean gradients (DDP's) are one process's."""
    world, results = ranks
    views, _ = positives_batch(world)
    x = views.clone().requires_grad_()
    loss = UNEVEN_MEANS[name](x, uneven_labels(world), False)
    loss.backward()
    per_rank = [r["positives"]["mean", name] for r in results]
    torch.testing.assert_close(sum(r[0] for r in per_rank) / world, loss, rtol=1e-12, atol=1e-13)
    for rank, (_, grad) in enumerate(per_rank):
        rows = slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK)
        torch.testing.assert_close(grad / world, x.grad[:, rows], rtol=1e-10, atol=1e-12)


def test_queues_are_identical_across_ranks_and_equal_one_process_pushing_every_batch(ranks):
    world, results = ranks
    for r in results[1:]:
        assert torch.equal(r["queue"][0], results[0]["queue"][0])
        assert torch.equal(r["queue"][1], results[0]["queue"][1])
    # 5 pushes of W·3 keys overwrite every random initial entry, so the whole queue is determined.
    expected = MemoryQueue(7, 2, dtype=torch.float64)
    for step in range(5):
        batches = []
        for rank in range(world):
            torch.manual_seed(rank)
            draws = [torch.randn(N_PER_RANK, 2, dtype=torch.float64) for _ in range(step + 1)]
            batches.append(draws[-1] + 10 * step + rank)
        expected.push(torch.cat(batches))
    pushed = 5 * world * N_PER_RANK
    assert int(results[0]["queue"][1]) == pushed % 7
    torch.testing.assert_close(results[0]["queue"][0], expected.keys, rtol=0, atol=0)


def test_a_partly_filled_queue_is_identical_across_ranks(ranks):
    """The initial random entries still in the queue must agree too."""
    _, results = ranks
    for r in results[1:]:
        assert torch.equal(r["partly filled"], results[0]["partly filled"])


def test_uneven_batches_are_refused_on_every_rank_naming_each_ranks_samples(ranks):
    """A Python error on every rank, not gloo's abort, naming what each rank holds: samples
    (not the 2N rows of the symmetric form, nor the V·N of V views), D and dtype."""
    world, results = ranks

    def held(rank, samples=N_PER_RANK, views=None, dim=2, dtype="float64"):
        return f"{samples} samples{f' × {views} views' if views else ''} of D = {dim}, {dtype}"

    wanted = {
        "samples": [held(r, samples=N_PER_RANK + r) for r in range(world)],
        "dim": [held(r, dim=2 + r) for r in range(world)],
        "dtype": [held(r, dtype="float32" if r == 1 else "float64") for r in range(world)],
        "views": [held(r, views=2 + r) for r in range(world)],
    }
    for r in results:
        for mismatch, errors in r["uneven"].items():
            for name, error in errors.items():
                # The symmetric form and one-encoder CACR gather both views of each sample.
                ranks_held = [
                    text.replace(" samples of", " samples × 2 views of")
                    if name in ("symmetric", "cacr one encoder")
                    else text
                    for text in wanted[mismatch]
                ]
                assert error == (
                    "every rank must hold the same number of samples, views, dimensions and "
                    "dtype to gather them, got "
                    + "; ".join(f"{text} on rank {rank}" for rank, text in enumerate(ranks_held))
                ), (mismatch, name)


def test_a_gathered_step_compiles_and_reads_only_the_cpu_sizes_on_the_host(ranks):
    _, results = ranks
    for r in results:
        eager, compiled = r["compiled"]
        for got, want in zip(compiled, eager):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        assert r["host reads"] == 1  # the forward's gather; its backward reads nothing


def test_the_sizes_are_read_on_the_host_only_for_cpu_tensors_or_in_detail_mode(monkeypatch):
    """A GPU's keys are not checked (the check would synchronise the device every step) unless
    TORCH_DISTRIBUTED_DEBUG=DETAIL; CPU keys always are. Simulated with a stand-in for the
    collective, which records whether the check called it."""
    from sce_loss import distributed

    calls = []
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 1)
    monkeypatch.setattr(dist, "all_gather", lambda sizes, size, group=None: calls.append(1))
    for device, level, checked in (
        ("cpu", dist.DebugLevel.OFF, True),
        ("meta", dist.DebugLevel.OFF, False),
        ("meta", dist.DebugLevel.DETAIL, True),
    ):
        monkeypatch.setattr(dist, "get_debug_level", lambda level=level: level)
        calls.clear()
        try:
            distributed._check_equal_batches(torch.empty(3, 2, device=device), None)
        except (RuntimeError, NotImplementedError):  # reading a meta tensor's sizes
            pass
        assert bool(calls) == checked, (device, level)


def test_gather_without_a_process_group_is_one_process():
    query, key, queue, _ = make_inputs("in-batch", seed=14)
    assert not dist.is_initialized()
    torch.testing.assert_close(
        sce_loss(query, key, gather=True), sce_loss(query, key), rtol=0, atol=0
    )
