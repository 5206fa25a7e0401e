"""Labels with a queue (``queue_labels``, ``MemoryQueue(labels=True)``): same-label queue entries
are positives beside the row's own key (every same-label key with ``include_keys``), for InfoNCE,
SCE and ReSSL, against a row-by-row transcription, today's queue-mode losses, and the streaming
backend against the reference."""

import pytest
import torch
from conftest import unit
from test_soft_positives import transcribed

from sce_loss import MemoryQueue, SCELoss, info_nce_loss, ressl_loss, sce_loss

TAU, TAU_M = 0.2, 0.1
LOSSES = {"info_nce": info_nce_loss, "sce": sce_loss, "ressl": ressl_loss}
LABELS = torch.tensor([0, 1, 0, 2, 1])
QUEUE_LABELS = torch.tensor([1, -1, 0, 3, 2, 0, 0, -1, 4, 1, 2])


def inputs(seed=0, crops=1):
    g = torch.Generator().manual_seed(seed)
    query = unit(crops, 5, 8, generator=g)
    return (query if crops > 1 else query[0]), unit(5, 8, generator=g), unit(11, 8, generator=g)


def row_candidates(key, queue, include_keys):
    """Each row's candidates and their labels, as the row sees them (``own`` None)."""
    for i in range(len(key)):
        keys, key_labels = (key, LABELS) if include_keys else (key[i : i + 1], LABELS[i : i + 1])
        yield torch.cat([keys, queue]), torch.cat([key_labels, QUEUE_LABELS])


def info_nce_row(row, candidates, label, labels, positives):
    a = candidates @ row / TAU
    p = labels == label
    lse = torch.logsumexp(a, 0)
    if positives == "mean":
        return lse - a[p].mean()
    if positives == "pooled":
        return lse - torch.logsumexp(a[p], 0)
    return torch.nn.functional.softplus(torch.logsumexp(a[~p], 0) - a[p]).sum()


def transcription(loss, query, key, queue, include_keys, positives="mean"):
    views = query if query.dim() == 3 else query[None]
    out = []
    for view in views:
        for i, (candidates, labels) in enumerate(row_candidates(key, queue, include_keys)):
            if loss == "info_nce":
                out.append(info_nce_row(view[i], candidates, LABELS[i], labels, positives))
            else:
                row, label = view[i : i + 1], LABELS[i : i + 1]
                out.append(transcribed(loss, row, candidates, label, labels, None)[0])
    return torch.stack(out).view(views.shape[:2] if query.dim() == 3 else (-1,))


def call(loss, query, key, queue, backend, **options):
    extra = dict(target_temperature=TAU_M) if loss != "info_nce" else {}
    return LOSSES[loss](
        query, key, queue, labels=LABELS, queue_labels=QUEUE_LABELS, temperature=TAU,
        reduction="none", backend=backend, **extra, **options,
    )  # fmt: skip


CASES = [
    (loss, include_keys, crops, positives)
    for loss in LOSSES
    for include_keys in (False, True)
    for crops in (1, 2)
    for positives in (["mean", "pooled", "pairs"] if loss == "info_nce" else ["mean"])
]


@pytest.mark.parametrize("loss, include_keys, crops, positives", CASES)
@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_a_labelled_queue_is_the_transcription(loss, include_keys, crops, positives, backend):
    query, key, queue = inputs(1, crops)
    options = dict(include_keys=include_keys)
    if loss == "info_nce":
        options["positives"] = positives
    got = call(loss, query, key, queue, backend, **options)
    want = transcription(loss, query, key, queue, include_keys, positives)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("include_keys", [False, True])
@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_a_queue_labelled_minus_1_is_todays_queue_mode(loss, include_keys, backend):
    query, key, queue = inputs(2)
    fn = LOSSES[loss]
    want = fn(query, key, queue, include_keys=include_keys, reduction="none")
    got = fn(query, key, queue, labels=torch.arange(5), queue_labels=torch.full((11,), -1),
             include_keys=include_keys, reduction="none", backend=backend)  # fmt: skip
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("include_keys", [False, True])
def test_chunked_values_and_gradients_are_the_references(loss, include_keys):
    query, key, queue = inputs(3, crops=2)
    outputs = []
    for backend in ("reference", "chunked"):
        q, k = query.clone().requires_grad_(), key.clone().requires_grad_()
        tau = torch.tensor(TAU, dtype=torch.float64, requires_grad=True)
        extra = dict(target_temperature=TAU_M) if loss != "info_nce" else {}
        per_row = LOSSES[loss](q, k, queue, labels=LABELS, queue_labels=QUEUE_LABELS,
                               temperature=tau, include_keys=include_keys, reduction="none",
                               backend=backend, **extra)  # fmt: skip
        weights = torch.linspace(0.5, 1.5, per_row.numel(), dtype=per_row.dtype).view_as(per_row)
        outputs.append((per_row, *torch.autograd.grad((per_row * weights).sum(), (q, k, tau))))
    for got, want in zip(*outputs[::-1]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_the_queue_is_read_at_the_call():
    """A push between the loss and its backward changes nothing, as for today's queue mode."""
    query, key, queue = inputs(4)
    grads = []
    for push in (False, True):
        q, held = query.clone().requires_grad_(), queue.clone()
        value = sce_loss(q, key, held, labels=LABELS, queue_labels=QUEUE_LABELS, backend="chunked")
        if push:
            held.mul_(-1)
        grads.append(torch.autograd.grad(value, q)[0])
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


def test_a_labelled_memory_queue_keeps_each_keys_label_through_the_ring():
    queue = MemoryQueue(4, 3, labels=True)
    assert queue.labels.tolist() == [-1, -1, -1, -1] and "labels" in queue.state_dict()
    keys = torch.nn.functional.normalize(torch.randn(3, 3), dim=1)
    queue.push(keys, torch.tensor([5, 6, 7]))
    queue.push(keys[:2], torch.tensor([8, 9]))  # wraps: entries 3 and 0
    assert queue.labels.tolist() == [9, 6, 7, 8]
    assert torch.equal(queue.keys[0], keys[1]) and torch.equal(queue.keys[3], keys[0])
    restored = MemoryQueue(4, 3, labels=True)
    restored.load_state_dict(queue.state_dict())
    assert torch.equal(restored.labels, queue.labels)
    assert "labels" not in MemoryQueue(4, 3).state_dict() and MemoryQueue(4, 3).labels is None


def test_a_module_reads_its_held_queues_labels():
    query, key, _ = inputs(5)
    held = MemoryQueue(11, 8, dtype=torch.float64, labels=True)
    held.push(inputs(6)[2], QUEUE_LABELS.clamp(min=0))
    criterion = SCELoss(queue=held)
    want = sce_loss(query, key, held.keys, labels=LABELS, queue_labels=held.labels)
    torch.testing.assert_close(criterion(query, key, labels=LABELS), want)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda q, k, Q: sce_loss(q, k, Q, labels=LABELS), ValueError,
         r"labels with a queue need queue_labels \(M,\)"),
        (lambda q, k, Q: info_nce_loss(q, k, Q, queue_labels=QUEUE_LABELS), ValueError,
         r"queue_labels label the queue's entries for labels: pass labels \(N,\) too"),
        (lambda q, k, Q: ressl_loss(q, k, labels=LABELS, queue_labels=QUEUE_LABELS), ValueError,
         "pass the queue too"),
        (lambda q, k, Q: sce_loss(q, k, Q, labels=LABELS, queue_labels=QUEUE_LABELS[:4]),
         ValueError, r"queue_labels must be \(11,\) \(one per queue entry\)"),
        (lambda q, k, Q: sce_loss(q, k, Q, labels=LABELS, queue_labels=QUEUE_LABELS.float()),
         TypeError, "queue_labels must be an integer tensor, got a torch.float32 tensor"),
        (lambda q, k, Q: info_nce_loss(q, k, Q, labels=LABELS, queue_labels=QUEUE_LABELS,
                                       decoupled=True), ValueError,
         "decoupled=True compares in-batch embeddings only"),
        (lambda q, k, Q: MemoryQueue(4, 8, labels=True).push(k), ValueError,
         r"this queue keeps a label per key: push\(keys, labels\)"),
        (lambda q, k, Q: MemoryQueue(4, 8).push(k, LABELS), ValueError,
         r"labels: this queue keeps none; build it with MemoryQueue\(..., labels=True\)"),
        (lambda q, k, Q: MemoryQueue(4, 8, labels=True).push(k, -LABELS - 1), ValueError,
         "labels must be ≥ 0, got -3"),
        (lambda q, k, Q: MemoryQueue(4, 8, labels="yes"), TypeError,
         "labels must be a bool, got str"),
    ],
)  # fmt: skip
def test_bad_input_names_the_argument(call, error, message):
    query, key, queue = inputs(7)
    with pytest.raises(error, match=message):
        call(query.float(), key.float(), queue.float())
