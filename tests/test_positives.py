"""Several positives per row: V views in the symmetric form and labels (SupCon), against
transcriptions of the peers' losses: the official SupContrast SupConLoss, solo-learn's
simclr_loss_func with indexes, pytorch-metric-learning's NTXentLoss and SupConLoss with labels;
and decoupled InfoNCE (DCL, DCLW) against the paper's equation and lightly's DCLLoss."""

import pytest
import torch
import torch.nn.functional as F
from conftest import unit
from hypothesis import given, settings
from hypothesis import strategies as st
from test_symmetric import metric_learning_ntxent, solo_learn_simclr

from sce_loss import InfoNCELoss, info_nce_loss

TAU = 0.1


def supcontrast_supcon(features, labels=None, temperature=TAU, base_temperature=TAU):
    """HobbitLong/SupContrast losses.py SupConLoss(contrast_mode="all"): features (bsz, n_views,
    D) normalised; labels (bsz,) or None (SimCLR mode, mask = eye). Rows with no positive get 0
    (mask_pos_pairs < 1e-6 → 1) and count in the mean."""
    bsz, n_views = features.shape[:2]
    if labels is None:
        mask = torch.eye(bsz, dtype=features.dtype)
    else:
        mask = torch.eq(labels[:, None], labels[None, :]).to(features.dtype)
    contrast = torch.cat(torch.unbind(features, dim=1), dim=0)
    logits = contrast @ contrast.T / temperature
    logits = logits - logits.max(dim=1, keepdim=True)[0].detach()
    mask = mask.repeat(n_views, n_views)
    logits_mask = torch.scatter(
        torch.ones_like(mask), 1, torch.arange(bsz * n_views).view(-1, 1), 0
    )
    mask = mask * logits_mask
    exp_logits = torch.exp(logits) * logits_mask
    log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))
    mask_pos_pairs = mask.sum(1)
    mask_pos_pairs = torch.where(mask_pos_pairs < 1e-6, 1, mask_pos_pairs)
    mean_log_prob_pos = (mask * log_prob).sum(1) / mask_pos_pairs
    loss = -(temperature / base_temperature) * mean_log_prob_pos
    return loss.view(n_views, bsz).mean()


def metric_learning_supcon(embeddings, labels, temperature=TAU):
    """pytorch_metric_learning.losses.SupConLoss: cosine similarities / τ; per anchor the mean
    over its positives (same label, not itself) of log softmax over the others; AvgNonZero."""
    sims = F.normalize(embeddings, dim=-1) @ F.normalize(embeddings, dim=-1).T / temperature
    eye = torch.eye(len(labels), dtype=torch.bool)
    positive = (labels[:, None] == labels[None]) & ~eye
    log_prob = sims - torch.logsumexp(sims.masked_fill(eye, float("-inf")), 1, keepdim=True)
    losses = -(positive * log_prob).sum(1) / (positive.sum(1) + torch.finfo(sims.dtype).tiny)
    nonzero = losses > 0
    return losses[nonzero].mean() if nonzero.any() else losses.sum() * 0


def views_of(v, n, d=8, seed=0):
    return unit(v, n, d, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("v", [2, 3, 4])
@pytest.mark.parametrize("with_labels", [False, True])
def test_mean_is_supcontrasts_supcon(v, with_labels):
    views = views_of(v, 6, seed=v).requires_grad_()
    labels = torch.tensor([0, 1, 0, 2, 1, 0]) if with_labels else None
    got = info_nce_loss(views, symmetric=True, labels=labels, temperature=TAU)
    want = supcontrast_supcon(views.transpose(0, 1), labels)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)
    (g,) = torch.autograd.grad(got, views)
    (w,) = torch.autograd.grad(want, views)
    torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("v", [2, 3])
@pytest.mark.parametrize("class_indexes", [False, True])
def test_pooled_is_solo_learns_simclr_with_indexes(v, class_indexes):
    """solo-learn's multi-crop SimCLR (indexes repeated per crop) and SupCon-style class
    indexes: z = [z_1; ...; z_V], normalised inside."""
    views = (3 * views_of(v, 5, seed=10 + v)).requires_grad_()  # not unit: normalize=True
    indexes = torch.tensor([4, 1, 4, 0, 1]) if class_indexes else torch.arange(5)
    got = info_nce_loss(
        views,
        symmetric=True,
        labels=indexes if class_indexes else None,
        positives="pooled",
        normalize=True,
        temperature=TAU,
    )
    want = solo_learn_simclr(views.reshape(-1, 8), indexes.repeat(v), TAU)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)
    (g,) = torch.autograd.grad(got, views)
    (w,) = torch.autograd.grad(want, views)
    torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_pairs_and_mean_are_metric_learnings_ntxent_and_supcon_with_labels():
    embeddings = (2 * unit(9, 8)).requires_grad_()
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 2])
    for positives, peer in (("pairs", metric_learning_ntxent), ("mean", metric_learning_supcon)):
        got = info_nce_loss(
            embeddings,
            symmetric=True,
            labels=labels,
            positives=positives,
            normalize=True,
            temperature=TAU,
        )
        want = peer(embeddings, labels, TAU)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)
        (g,) = torch.autograd.grad(got, embeddings)
        (w,) = torch.autograd.grad(want, embeddings)
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("positives", ["mean", "pooled", "pairs"])
def test_one_positive_per_row_is_todays_loss(positives):
    z1, z2 = views_of(2, 7, seed=3)
    distinct = torch.arange(7) * 3
    for today, options in (
        (info_nce_loss(z1, z2, symmetric=True), dict(symmetric=True)),  # NT-Xent
        (info_nce_loss(z1, z2), {}),  # in-batch
    ):
        got = info_nce_loss(z1, z2, labels=distinct, positives=positives, **options)
        torch.testing.assert_close(got, today, rtol=1e-13, atol=1e-14)
    views = torch.stack([z1, z2])
    got = info_nce_loss(views, symmetric=True, positives=positives, reduction="none")
    today = info_nce_loss(z1, z2, symmetric=True, reduction="none")
    torch.testing.assert_close(got, today, rtol=0, atol=0)  # routed to the one-positive form


def test_in_batch_labels_make_every_same_label_key_a_positive():
    query, key = views_of(2, 6, seed=4)
    crops = torch.stack([query, query.flip(1)])
    labels = torch.tensor([0, 1, 0, 1, 2, 2])
    got = info_nce_loss(crops, key, labels=labels, temperature=TAU, reduction="none")
    logits = crops @ key.T / TAU
    positive = labels[:, None] == labels[None]
    want = torch.logsumexp(logits, -1) - (logits * positive).sum(-1) / positive.sum(-1)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("positives", ["mean", "pooled", "pairs"])
def test_rows_with_no_positive_count_for_nothing_and_never_give_nan(positives):
    """One view and singleton labels: those rows give 0 and leave the mean; a batch with none
    gives 0 with zero gradients (SupContrast#141 was a NaN here)."""
    embeddings = unit(5, 8).requires_grad_()
    labels = torch.tensor([0, 1, 0, 2, 3])  # rows 1, 3, 4 have no positive
    per_row = info_nce_loss(
        embeddings, symmetric=True, labels=labels, positives=positives, reduction="none"
    )
    assert per_row.shape == (5,) and torch.equal(per_row[[1, 3, 4]], torch.zeros(3))
    mean = info_nce_loss(embeddings, symmetric=True, labels=labels, positives=positives)
    torch.testing.assert_close(mean, per_row[[0, 2]].mean())
    (grad,) = torch.autograd.grad(mean, embeddings)
    assert torch.isfinite(grad).all()
    none = info_nce_loss(embeddings, symmetric=True, labels=torch.arange(5), positives=positives)
    (grad,) = torch.autograd.grad(none, embeddings)
    assert none == 0 and torch.equal(grad, torch.zeros_like(grad))


def test_a_row_with_no_negative():
    """One class: "pairs" gives 0 (as PML), "mean" and "pooled" follow their formulas."""
    views = views_of(2, 4, seed=5).requires_grad_()
    labels = torch.zeros(4, dtype=torch.long)
    pairs = info_nce_loss(views, symmetric=True, labels=labels, positives="pairs")
    pooled = info_nce_loss(views, symmetric=True, labels=labels, positives="pooled")
    (grad,) = torch.autograd.grad(pairs + pooled, views)
    assert pairs == 0 and torch.isfinite(grad).all()
    torch.testing.assert_close(pooled, torch.zeros(()).double(), rtol=0, atol=1e-15)
    mean = info_nce_loss(views, symmetric=True, labels=labels, positives="mean", temperature=TAU)
    torch.testing.assert_close(mean, supcontrast_supcon(views.transpose(0, 1), labels))


@settings(max_examples=30, deadline=None)
@given(
    v=st.integers(1, 3),
    labels=st.lists(st.integers(0, 3), min_size=2, max_size=6),
    positives=st.sampled_from(["mean", "pooled", "pairs"]),
    seed=st.integers(0, 1000),
)
def test_gradcheck_and_permutation_equivariance(v, labels, positives, seed):
    labels = torch.tensor(labels)
    views = views_of(v, len(labels), d=4, seed=seed).requires_grad_()

    def per_row(x):
        return info_nce_loss(
            x, symmetric=True, labels=labels, positives=positives, reduction="none"
        )

    torch.autograd.gradcheck(per_row, (views,))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    permuted = info_nce_loss(
        views[:, order],
        symmetric=True,
        labels=labels[order],
        positives=positives,
        reduction="none",
    )
    torch.testing.assert_close(permuted, per_row(views).view(v, -1)[:, order].view(permuted.shape))


def test_compiles_fullgraph_with_labels_and_a_learnable_temperature():
    views = views_of(3, 6, seed=6).float()
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    temperature = torch.nn.Parameter(torch.tensor(TAU))
    criterion = InfoNCELoss(temperature=temperature, symmetric=True, positives="pooled")
    compiled = torch.compile(criterion, backend="aot_eager", fullgraph=True)
    for fn in (compiled, criterion):
        x = views.clone().requires_grad_()
        loss = fn(x, labels=labels)
        loss.backward()
    torch.testing.assert_close(compiled(views, labels=labels), criterion(views, labels=labels))
    assert temperature.grad is not None


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda v: info_nce_loss(v[0], symmetric=True), ValueError, "one view has no positive"),
        (lambda v: info_nce_loss(v), ValueError, "key may be omitted only in the symmetric"),
        (
            lambda v: info_nce_loss(v, symmetric=True, labels=torch.zeros(4)),
            TypeError,
            "labels must be an integer tensor, got a torch.float32 tensor",
        ),
        (
            lambda v: info_nce_loss(v, symmetric=True, labels=torch.zeros(3, dtype=torch.long)),
            ValueError,
            r"labels must be \(4,\) \(one per sample\)",
        ),
        (
            lambda v: info_nce_loss(v, symmetric=True, labels=torch.tensor([0, -1, 0, 1])),
            ValueError,
            "labels must be ≥ 0, got -1",
        ),
        (
            lambda v: info_nce_loss(v, symmetric=True, positives="all"),
            ValueError,
            r"positives must be one of \('mean', 'pooled', 'pairs'\), got 'all'",
        ),
        (
            lambda v: info_nce_loss(v[0], v[1], v[2], labels=torch.arange(4)),
            ValueError,
            r"labels with a queue need queue_labels \(M,\)",
        ),
        (
            lambda v: info_nce_loss(v, symmetric=True, labels=torch.arange(4), include_keys=True),
            ValueError,
            "compare in-batch embeddings only: pass no queue",
        ),
        (
            lambda v: info_nce_loss(v, symmetric=True, backend="fused"),
            ValueError,
            "backend='fused' does not compute several positives per row",
        ),
        (
            lambda v: info_nce_loss(v[0], v[1], decoupled=True, backend="fused"),
            ValueError,
            "backend='fused' does not compute decoupled=True",
        ),
        (
            lambda v: info_nce_loss(v[0], v[1], v[2], decoupled=True),
            ValueError,
            "decoupled=True compares in-batch embeddings only: pass no queue",
        ),
        (
            lambda v: info_nce_loss(v, symmetric=True, decoupled=True, positives="pooled"),
            ValueError,
            "decoupled=True averages a row's positives: positives must be 'mean', got 'pooled'",
        ),
        (
            lambda v: info_nce_loss(v, symmetric=True, decoupled=1),
            TypeError,
            "decoupled must be a bool, got int",
        ),
        (
            lambda v: info_nce_loss(v[0], v[1], weight_sigma=0.5),
            ValueError,
            "weight_sigma weighs DCL's positive term: pass decoupled=True too",
        ),
        (
            lambda v: info_nce_loss(v[0], v[1], decoupled=True, weight_sigma=0.0),
            ValueError,
            "weight_sigma must be a finite number ≥ 0.0001, got 0.0",
        ),
        (
            lambda v: info_nce_loss(v, symmetric=True, decoupled=True, weight_sigma=0.5),
            ValueError,
            r"weight_sigma \(DCLW\) weighs each row's one positive: .* \(got 3 views\)",
        ),
        (
            lambda v: info_nce_loss(
                v[0], v[1], decoupled=True, weight_sigma=0.5, labels=torch.arange(4)
            ),
            ValueError,
            r"weight_sigma \(DCLW\) weighs each row's one positive: .* \(got labels\)",
        ),
    ],
)
def test_bad_input_names_the_argument(call, error, message):
    with pytest.raises(error, match=message):
        call(views_of(3, 4))


# -- decoupled InfoNCE (DCL, DCLW) -----------------------------------------------------------------


def dcl_paper(z1, z2, temperature=TAU, sigma=None):
    """Yeh et al.'s DCL (Eq. 6), as its official code computes it (one log-sum-exp over both
    views' negatives; −inf masks where it adds log 1e-45), DCLW's weight as lightly's
    2 − N·softmax, each direction's mean, symmetrised as 0.5·(mean₁ + mean₂)."""
    z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)

    def one_way(a, b):
        eye = torch.eye(len(a), dtype=torch.bool)
        positive = -(a * b).sum(1) / temperature
        if sigma is not None:
            positive = positive * (2 - len(a) * F.softmax((a * b).sum(1).detach() / sigma, 0))
        negatives = torch.cat([a @ a.T, a @ b.T], 1) / temperature
        negatives = negatives.masked_fill(eye.repeat(1, 2), float("-inf"))
        return (positive + torch.logsumexp(negatives, 1)).mean()

    return 0.5 * (one_way(z1, z2) + one_way(z2, z1))


def lightly_dcl(out0, out1, temperature=TAU, sigma=None):
    """lightly's DCLLoss(temperature) (DCLWLoss(temperature, sigma) with ``sigma``), one process:
    a log-sum-exp over each view's negatives, summed."""
    out0, out1 = F.normalize(out0, dim=1), F.normalize(out1, dim=1)

    def one_way(a, b):
        eye = torch.eye(len(a), dtype=torch.bool)
        sim_00, sim_01 = a @ a.T / temperature, a @ b.T / temperature
        positive = -sim_01[eye]
        if sigma is not None:
            positive = positive * (2 - len(a) * F.softmax((a * b).sum(1).detach() / sigma, 0))
        rest_00 = sim_00[~eye].view(len(a), -1)
        rest_01 = sim_01[~eye].view(len(a), -1)
        return (positive + torch.logsumexp(rest_00, 1) + torch.logsumexp(rest_01, 1)).mean()

    return 0.5 * (one_way(out0, out1) + one_way(out1, out0))


@pytest.mark.parametrize("sigma", [None, 0.5])
@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_decoupled_is_the_papers_dcl_and_dclw(sigma, backend):
    z1, z2 = (x.requires_grad_() for x in views_of(2, 6, d=5, seed=50).unbind())
    options = dict(symmetric=True, decoupled=True, weight_sigma=sigma, normalize=True)
    ours = info_nce_loss(z1, z2, temperature=TAU, backend=backend, **options)
    want = dcl_paper(z1, z2, sigma=sigma)
    torch.testing.assert_close(ours, want, rtol=1e-13, atol=1e-14)
    for g, w in zip(torch.autograd.grad(ours, (z1, z2)), torch.autograd.grad(want, (z1, z2))):
        torch.testing.assert_close(g, w, rtol=1e-11, atol=1e-13)
    views = torch.stack([z1, z2])  # the (V, N, D) form is the same loss
    torch.testing.assert_close(info_nce_loss(views, temperature=TAU, **options), want)
    module = InfoNCELoss(
        temperature=TAU, symmetric=True, decoupled=True, weight_sigma=sigma, normalize=True
    )
    torch.testing.assert_close(module(z1, z2), want)


@pytest.mark.parametrize("sigma", [None, 0.5])
def test_lightlys_dcl_is_two_in_batch_decoupled_calls_per_view(sigma):
    """lightly sums a log-sum-exp over each view's negatives where the paper takes one over
    their union: its DCLLoss is, per view v, DCL(z_v against z_other) + DCL(z_v against
    itself) + 1/τ (the latter's positive, a row with itself, is 1/τ for unit vectors)."""
    z1, z2 = views_of(2, 6, d=5, seed=51).unbind()
    options = dict(decoupled=True, normalize=True, temperature=TAU)
    ours = 0.5 * sum(
        info_nce_loss(a, b, weight_sigma=sigma, **options) + info_nce_loss(a, a, **options)
        for a, b in ((z1, z2), (z2, z1))
    )
    torch.testing.assert_close(ours + 1 / TAU, lightly_dcl(z1, z2, sigma=sigma), rtol=1e-13, atol=0)


def test_decoupled_with_labels_averages_the_positives_and_a_row_without_negatives_gives_0():
    views, labels = views_of(2, 5, seed=52), torch.tensor([0, 1, 0, 1, 2])
    x = views.reshape(-1, views.shape[-1])
    logits = (x @ x.T / TAU).fill_diagonal_(float("-inf"))
    positive = (labels.repeat(2)[:, None] == labels.repeat(2)[None, :]).fill_diagonal_(False)
    want = torch.logsumexp(logits.masked_fill(positive, float("-inf")), 1) - (
        logits.masked_fill(~positive, 0).sum(1) / positive.sum(1)
    )
    got = info_nce_loss(
        views, symmetric=True, labels=labels, decoupled=True, temperature=TAU, reduction="none"
    )
    torch.testing.assert_close(got.view(-1), want)
    one_class = views.clone().requires_grad_()
    loss = info_nce_loss(
        one_class, symmetric=True, labels=torch.zeros(5, dtype=torch.long), decoupled=True
    )
    (grad,) = torch.autograd.grad(loss, one_class)
    assert loss == 0 and (grad == 0).all()


def test_decoupled_compiles_fullgraph_with_a_learnable_temperature():
    from torch._dynamo.testing import CompileCounterWithBackend

    z1, z2 = views_of(2, 6, seed=53).unbind()
    tau = torch.tensor(TAU, dtype=torch.float64, requires_grad=True)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")

    def step(a, b, t):
        return info_nce_loss(
            a, b, symmetric=True, decoupled=True, weight_sigma=0.5, temperature=t, backend="chunked"
        )

    compiled = torch.compile(step, backend=counter, fullgraph=True)
    got = compiled(z1, z2, tau)
    torch.testing.assert_close(got, step(z1, z2, tau))
    torch.testing.assert_close(
        torch.autograd.grad(got, tau)[0], torch.autograd.grad(step(z1, z2, tau), tau)[0]
    )
    compiles = counter.frame_count
    compiled(z2, z1, tau)  # another batch: no recompile
    assert counter.frame_count == compiles


# -- the streaming backend -------------------------------------------------------------------------


def all_outputs(
    backend, views, labels, positives, temperature, dtype=torch.float64, key=None, **options
):
    """Per-row losses and the gradients of their weighted sum w.r.t. the views (and key) and τ;
    ``positives`` "decoupled" is ``decoupled=True``."""
    if positives == "decoupled":
        positives, options = "mean", options | dict(decoupled=True)
    x = views.detach().to(dtype).requires_grad_()
    k = None if key is None else key.detach().to(dtype).requires_grad_()
    tau = torch.tensor(temperature, dtype=torch.float64, requires_grad=True)
    per_row = info_nce_loss(
        x,
        k,
        symmetric=key is None,
        labels=labels,
        positives=positives,
        temperature=tau,
        reduction="none",
        backend=backend,
        **options,
    )
    weights = torch.linspace(0.5, 1.5, per_row.numel(), dtype=per_row.dtype).view(per_row.shape)
    inputs = (x, tau) if k is None else (x, k, tau)
    return (per_row, *torch.autograd.grad((per_row * weights).sum(), inputs))


LABELS = [None, torch.tensor([0, 1, 0, 2, 1, 3, 3]), torch.tensor([5, 1, 2, 3, 4, 0, 6])]


@pytest.mark.parametrize("positives", ["mean", "pooled", "pairs", "decoupled"])
@pytest.mark.parametrize(
    "v, labels",
    [(v, labels) for v in (1, 2, 3) for labels in LABELS if v > 1 or labels is not None],
)
def test_chunked_equals_the_reference_in_float64(positives, v, labels):
    views = views_of(v, 7, seed=20 + v)
    want = all_outputs("reference", views, labels, positives, 0.3)
    got = all_outputs("chunked", views, labels, positives, 0.3)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("positives", ["mean", "pooled", "pairs", "decoupled"])
def test_chunked_in_batch_labels_give_both_sides_their_gradients(positives):
    query, key = views_of(2, 6, seed=30)
    labels = torch.tensor([0, 1, 0, 1, 2, 2])
    want = all_outputs("reference", query, labels, positives, 0.2, key=key)
    got = all_outputs("chunked", query, labels, positives, 0.2, key=key)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)


@given(
    chunk=st.integers(1, 9),
    labels=st.lists(st.integers(0, 2), min_size=2, max_size=6),
    positives=st.sampled_from(["mean", "pooled", "pairs", "decoupled"]),
)
def test_every_chunk_width_gives_the_same_statistics(chunk, labels, positives):
    from sce_loss import chunked_positives, reference

    labels = torch.tensor(labels)
    rows = unit(2 * len(labels), 4, generator=torch.Generator().manual_seed(chunk))
    options = dict(
        row_labels=labels.repeat(2),
        candidate_labels=labels.repeat(2),
        own=torch.arange(len(rows)),
        temperature=0.5,
        positives=positives,
        positive_weight=torch.linspace(-0.5, 1.5, len(rows), dtype=torch.float64),
    )
    x = rows.clone().requires_grad_()
    got, got_terms = chunked_positives.info_nce_positives(x, x, chunk_size=chunk, **options)
    (got_grad,) = torch.autograd.grad(got.sum(), x)
    y = rows.clone().requires_grad_()
    want, want_terms = reference.info_nce_positives(y, y, **options)
    (want_grad,) = torch.autograd.grad(want.sum(), y)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-10, atol=1e-13)
    assert torch.equal(got_terms, want_terms)


@pytest.mark.parametrize("positives", ["mean", "pooled", "pairs", "decoupled"])
def test_rows_stream_in_blocks_with_the_same_results(monkeypatch, positives):
    from sce_loss import chunked_positives

    views, labels = views_of(3, 7, seed=44), LABELS[1]
    want = all_outputs("reference", views, labels, positives, 0.3)
    monkeypatch.setattr(chunked_positives, "ROW_BLOCK", 4)  # 21 rows: six blocks
    got = all_outputs("chunked", views, labels, positives, 0.3)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_low_precision_inputs_match_the_reference(dtype):
    views, labels = views_of(3, 7, seed=40), LABELS[1]
    want = all_outputs("reference", views, labels, "mean", 0.1, dtype=dtype)
    got = all_outputs("chunked", views, labels, "mean", 0.1, dtype=dtype)
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype
    for g, w in zip(got, want):
        torch.testing.assert_close(g.float(), w.float(), rtol=1e-5, atol=1e-5)


def test_chunked_second_order_and_torch_func_are_the_references():
    views, labels = views_of(3, 5, d=4, seed=41), torch.tensor([0, 1, 0, 1, 1])

    def loss(x, backend):
        return info_nce_loss(x, symmetric=True, labels=labels, positives="pairs", backend=backend)

    penalties = []
    for backend in ("reference", "chunked"):
        x = views.clone().requires_grad_()
        (grad,) = torch.autograd.grad(loss(x, backend), x, create_graph=True)
        (second,) = torch.autograd.grad(grad.square().sum(), x)
        penalties.append(second)
    torch.testing.assert_close(penalties[1], penalties[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        torch.func.grad(lambda x: loss(x, "chunked"))(views),
        torch.func.grad(lambda x: loss(x, "reference"))(views),
        rtol=1e-12,
        atol=1e-14,
    )


def test_chunked_compiles_fullgraph_with_a_learnable_temperature():
    views = views_of(3, 6, seed=42).float()
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    temperature = torch.nn.Parameter(torch.tensor(TAU))
    criterion = InfoNCELoss(temperature=temperature, symmetric=True, backend="chunked")
    compiled = torch.compile(criterion, backend="aot_eager", fullgraph=True)
    grads = []
    for fn in (compiled, criterion):
        temperature.grad = None
        x = views.clone().requires_grad_()
        loss = fn(x, labels=labels)
        loss.backward()
        grads.append((loss.detach(), x.grad, temperature.grad))
    for g, w in zip(*grads):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)


def test_the_streaming_ops_pass_opcheck():
    from sce_loss import chunked_positives

    x = unit(6, 4)
    labels = torch.tensor([0, 1, 0, 1, 2, 2])
    own, tau = torch.arange(6), torch.tensor(0.5, dtype=torch.float64)
    weight = torch.linspace(0.5, 1.5, 6, dtype=torch.float64)
    paired = torch.full_like(own, -1)
    for positives in ("mean", "pooled", "pairs", "decoupled"):
        options = dict(positives=positives, chunk=4, private=0)
        inputs = (x, x, tau, labels, labels, own, paired, weight)
        stats = chunked_positives.positive_stats(*inputs, **options)
        torch.library.opcheck(
            chunked_positives.positive_stats,
            inputs,
            options,
            test_utils=("test_schema", "test_faketensor"),
        )
        torch.library.opcheck(
            chunked_positives.positive_gradients,
            (
                x,
                x,
                tau,
                labels,
                labels,
                own,
                paired,
                weight,
                torch.ones(6, dtype=torch.float64),
                *stats[:3],
                stats[4],
                stats[5],
            ),
            options,
            test_utils=("test_schema", "test_faketensor"),
        )


def test_auto_streams_from_the_documented_size(monkeypatch):
    import sce_loss.functional as functional
    from sce_loss import chunked_positives

    calls = []
    real = chunked_positives.info_nce_positives
    monkeypatch.setattr(
        chunked_positives, "info_nce_positives", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    views = views_of(2, 8, seed=50)
    labels = torch.arange(8) % 3
    info_nce_loss(views, symmetric=True, labels=labels)  # 16 × 16 pairs: the reference
    assert not calls
    monkeypatch.setattr(functional, "CHUNKED_POSITIVES_FROM_PAIRS", 16 * 16)
    info_nce_loss(views, symmetric=True, labels=labels)
    assert calls == [1]
    # Not under a torch.func transform: there the reference serves.
    torch.func.grad(lambda x: info_nce_loss(x, symmetric=True, labels=labels))(views)
    assert calls == [1]
