"""SCE and ReSSL with several positives per row (V views in the symmetric form, labels): against a
row-by-row transcription of docs/mathematics.md's equations, today's one-positive losses,
InfoNCE's "mean" at λ = 1, and the streaming backend against the reference."""

import pytest
import torch
from conftest import unit
from hypothesis import given, settings
from hypothesis import strategies as st

from sce_loss import ReSSLLoss, SCELoss, info_nce_loss, ressl_loss, sce_loss

TAU, TAU_M, COEFF = 0.2, 0.1, 0.5
LOSSES = {"sce": sce_loss, "ressl": ressl_loss}


def views_of(v, n, d=8, seed=0):
    return unit(v, n, d, generator=torch.Generator().manual_seed(seed))


def transcribed(loss, rows, candidates, row_labels, candidate_labels, own, coeff=COEFF):
    """Row by row: P = the candidates of the row's label but its own; t = mean of P; N = the
    rest but its own; s² = softmax_N(t·c/τ_m); SCE −Σ_c w_c log softmax_{c≠own}(a)_c with
    w = λ/|P| on P + (1−λ)s² (s² = 0 when N is empty); ReSSL −Σ_N s² log softmax_N(a)."""
    out = []
    for r in range(len(rows)):
        columns = [c for c in range(len(candidates)) if own is None or c != int(own[r])]
        positives = [c for c in columns if candidate_labels[c] == row_labels[r]]
        negatives = [c for c in columns if c not in positives]
        if not positives:
            out.append(rows.new_zeros(()))
            continue
        a = rows[r] @ candidates.T / TAU
        target = candidates[positives].detach().mean(0)
        s2 = torch.zeros(len(candidates), dtype=rows.dtype)
        if negatives:
            s2[negatives] = torch.softmax(target @ candidates[negatives].detach().T / TAU_M, 0)
        if loss == "sce":
            log_p = a[columns] - torch.logsumexp(a[columns], 0)
            w = s2[columns] * (1 - coeff)
            is_positive = torch.tensor([c in positives for c in columns], dtype=rows.dtype)
            w = w + coeff * is_positive / len(positives)
            out.append(-(w * log_p).sum())
        elif negatives:
            log_s1 = a[negatives] - torch.logsumexp(a[negatives], 0)
            out.append(-(s2[negatives] * log_s1).sum())
        else:
            out.append(rows.new_zeros(()))
    return torch.stack(out)


def symmetric_sets(v, n, labels):
    sample = torch.arange(n) if labels is None else labels
    return sample.repeat(v), torch.arange(v * n)


LABELS = [None, torch.tensor([0, 1, 0, 2, 1, 3, 3]), torch.tensor([2, 2, 2, 2, 0, 1, 1])]
CASES = [(v, labels) for v in (1, 2, 3) for labels in LABELS if v > 1 or labels is not None]


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("v, labels", CASES)
@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_symmetric_form_is_the_transcription(loss, v, labels, backend):
    views = views_of(v, 7, seed=10 + v)
    got = LOSSES[loss](
        views, symmetric=True, labels=labels, reduction="none", backend=backend,
        temperature=TAU, target_temperature=TAU_M,
    )  # fmt: skip
    assert got.shape == (v, 7)
    rows = views.reshape(-1, 8)
    row_labels, own = symmetric_sets(v, 7, labels)
    want = transcribed(loss, rows, rows, row_labels, row_labels, own)
    torch.testing.assert_close(got.reshape(-1), want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_in_batch_labels_make_every_same_label_key_a_positive(loss, backend):
    query, key = views_of(2, 7, seed=3)
    labels = LABELS[1]
    got = LOSSES[loss](
        query, key, labels=labels, reduction="none", backend=backend,
        temperature=TAU, target_temperature=TAU_M,
    )  # fmt: skip
    want = transcribed(loss, query, key, labels, labels, None)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_one_positive_per_row_is_todays_loss(loss, backend):
    views = views_of(2, 6, seed=4)
    distinct = torch.tensor([5, 0, 3, 1, 4, 2])
    fn = LOSSES[loss]
    symmetric = fn(views[0], views[1], symmetric=True, reduction="none")
    for got in (
        fn(views, symmetric=True, reduction="none", backend=backend),
        fn(views, symmetric=True, labels=distinct, reduction="none", backend=backend),
    ):
        torch.testing.assert_close(got, symmetric, rtol=1e-12, atol=1e-14)
    in_batch = fn(views[0], views[1], reduction="none")
    got = fn(views[0], views[1], labels=distinct, reduction="none", backend=backend)
    torch.testing.assert_close(got, in_batch, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_sce_at_coeff_1_is_supcons_mean(backend):
    views, labels = views_of(3, 7, seed=5), LABELS[1]
    got = sce_loss(views, symmetric=True, labels=labels, coeff=1.0, temperature=TAU,
                   reduction="none", backend=backend)  # fmt: skip
    want = info_nce_loss(views, symmetric=True, labels=labels, temperature=TAU, reduction="none")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_rows_with_no_positive_count_for_nothing_and_never_give_nan(loss, backend):
    one_view = views_of(1, 5, seed=6)[0].requires_grad_()
    labels = torch.tensor([0, 1, 0, 2, 3])  # samples 1, 3 and 4 have no positive
    per_row = LOSSES[loss](one_view, symmetric=True, labels=labels, reduction="none",
                           backend=backend)  # fmt: skip
    assert per_row.shape == (5,) and (per_row[[1, 3, 4]] == 0).all() and (per_row[[0, 2]] > 0).all()
    mean = LOSSES[loss](one_view, symmetric=True, labels=labels, backend=backend)
    torch.testing.assert_close(mean, per_row.sum() / 2)
    (grad,) = torch.autograd.grad(mean, one_view)
    assert torch.isfinite(grad).all()
    lonely = LOSSES[loss](one_view, symmetric=True, labels=torch.arange(5), backend=backend)
    (grad,) = torch.autograd.grad(lonely, one_view)
    assert lonely.item() == 0 and (grad == 0).all()


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_a_row_with_no_negative_keeps_sces_coeff_part_and_gives_ressl_0(backend):
    views = views_of(2, 3, seed=7).requires_grad_()
    one_class = torch.zeros(3, dtype=torch.long)
    sce = sce_loss(views, symmetric=True, labels=one_class, coeff=0.3, reduction="none",
                   backend=backend)  # fmt: skip
    supcon = info_nce_loss(views, symmetric=True, labels=one_class, temperature=0.1,
                           reduction="none")  # fmt: skip
    torch.testing.assert_close(sce, 0.3 * supcon, rtol=1e-12, atol=1e-14)
    ressl = ressl_loss(views, symmetric=True, labels=one_class, reduction="none", backend=backend)
    assert (ressl == 0).all()
    grads = torch.autograd.grad(sce.sum() + ressl.sum(), views)
    assert torch.isfinite(grads[0]).all()


# -- the streaming backend -------------------------------------------------------------------------


def all_outputs(loss, backend, views, labels, dtype=torch.float64, key=None, **options):
    """Per-row losses and the gradients of their weighted sum w.r.t. the views (and key) and τ."""
    x = views.detach().to(dtype).requires_grad_()
    k = None if key is None else key.detach().to(dtype).requires_grad_()
    tau = torch.tensor(TAU, dtype=torch.float64, requires_grad=True)
    per_row = LOSSES[loss](
        x, k, symmetric=key is None, labels=labels, temperature=tau, target_temperature=TAU_M,
        reduction="none", backend=backend, **options,
    )  # fmt: skip
    weights = torch.linspace(0.5, 1.5, per_row.numel(), dtype=per_row.dtype).view(per_row.shape)
    inputs = (x, tau) if k is None else (x, k, tau)
    return (per_row, *torch.autograd.grad((per_row * weights).sum(), inputs))


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("v, labels", CASES)
def test_chunked_equals_the_reference_in_float64(loss, v, labels):
    views = views_of(v, 7, seed=20 + v)
    want = all_outputs(loss, "reference", views, labels)
    got = all_outputs(loss, "chunked", views, labels)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("loss", LOSSES)
def test_chunked_in_batch_labels_give_both_sides_their_gradients(loss):
    query, key = views_of(2, 6, seed=30)
    labels = torch.tensor([0, 1, 0, 1, 2, 2])
    want = all_outputs(loss, "reference", query, labels, key=key)
    got = all_outputs(loss, "chunked", query, labels, key=key)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)


@settings(max_examples=40, deadline=None)
@given(
    chunk=st.integers(1, 9),
    labels=st.lists(st.integers(0, 2), min_size=2, max_size=6),
    loss=st.sampled_from(list(LOSSES)),
    coeff=st.floats(0, 1),
)
def test_every_chunk_width_gives_the_same_losses_and_gradients(chunk, labels, loss, coeff):
    from sce_loss import chunked_positives, reference

    labels = torch.tensor(labels)
    rows = unit(2 * len(labels), 4, generator=torch.Generator().manual_seed(chunk))
    options = dict(
        row_labels=labels.repeat(2),
        candidate_labels=labels.repeat(2),
        own=torch.arange(len(rows)),
        temperature=0.5,
        target_temperature=0.3,
        coeff=coeff,
        loss=loss,
    )
    x = rows.clone().requires_grad_()
    got, got_terms = chunked_positives.soft_positives(x, x, chunk_size=chunk, **options)
    (got_grad,) = torch.autograd.grad(got.sum(), x)
    y = rows.clone().requires_grad_()
    want, want_terms = reference.soft_positives(y, y, **options)
    (want_grad,) = torch.autograd.grad(want.sum(), y)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-10, atol=1e-13)
    assert torch.equal(got_terms, want_terms)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    labels=st.lists(st.integers(0, 3), min_size=2, max_size=6),
    loss=st.sampled_from(list(LOSSES)),
)
def test_permuting_the_samples_permutes_the_losses(seed, labels, loss):
    labels = torch.tensor(labels)
    views = views_of(2, len(labels), d=4, seed=seed)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    per_row = LOSSES[loss](views, symmetric=True, labels=labels, reduction="none")
    permuted = LOSSES[loss](views[:, order], symmetric=True, labels=labels[order],
                            reduction="none")  # fmt: skip
    torch.testing.assert_close(permuted, per_row[:, order], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_low_precision_inputs_match_the_reference(loss, dtype):
    views, labels = views_of(3, 7, seed=40), LABELS[1]
    want = all_outputs(loss, "reference", views, labels, dtype=dtype)
    got = all_outputs(loss, "chunked", views, labels, dtype=dtype)
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype
    for g, w in zip(got, want):
        torch.testing.assert_close(g.float(), w.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("loss", LOSSES)
def test_chunked_second_order_and_torch_func_are_the_references(loss):
    views, labels = views_of(3, 5, d=4, seed=41), torch.tensor([0, 1, 0, 1, 1])

    def value(x, backend):
        return LOSSES[loss](x, symmetric=True, labels=labels, backend=backend)

    penalties = []
    for backend in ("reference", "chunked"):
        x = views.clone().requires_grad_()
        (grad,) = torch.autograd.grad(value(x, backend), x, create_graph=True)
        (second,) = torch.autograd.grad(grad.square().sum(), x)
        penalties.append(second)
    torch.testing.assert_close(penalties[1], penalties[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        torch.func.grad(lambda x: value(x, "chunked"))(views),
        torch.func.grad(lambda x: value(x, "reference"))(views),
        rtol=1e-12,
        atol=1e-14,
    )


@pytest.mark.parametrize("module", [SCELoss, ReSSLLoss])
def test_the_modules_compile_fullgraph_with_labels_and_a_learnable_temperature(module):
    views = views_of(3, 6, seed=42).float()
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    temperature = torch.nn.Parameter(torch.tensor(TAU))
    criterion = module(temperature=temperature, symmetric=True, backend="chunked")
    compiled = torch.compile(criterion, backend="aot_eager", fullgraph=True)
    grads = []
    for fn in (compiled, criterion):
        temperature.grad = None
        x = views.clone().requires_grad_()
        value = fn(x, labels=labels)
        value.backward()
        grads.append((value.detach(), x.grad, temperature.grad))
    for g, w in zip(*grads):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)


def test_the_streaming_ops_pass_opcheck():
    from sce_loss import chunked_positives

    x = unit(6, 4)
    labels = torch.tensor([0, 1, 0, 1, 2, 2])
    own = torch.arange(6)
    tau, tau_m, coeff = (torch.tensor(v, dtype=torch.float64) for v in (0.5, 0.3, 0.4))
    for loss in LOSSES:
        options = dict(loss=loss, chunk=4, private=0)
        inputs = (x, x, tau, tau_m, coeff, labels, labels, own, torch.full_like(own, -1))
        stats = chunked_positives.soft_stats(*inputs, **options)
        for op, arguments in (
            (chunked_positives.soft_stats, inputs),
            (
                chunked_positives.soft_gradients,
                (*inputs, torch.ones(6, dtype=torch.float64), *stats[:3]),
            ),
        ):
            torch.library.opcheck(
                op, arguments, options, test_utils=("test_schema", "test_faketensor")
            )


def test_bad_input_names_the_argument():
    views = views_of(3, 4)
    with pytest.raises(TypeError, match="labels must be an integer tensor, got a torch.float32"):
        sce_loss(views.float(), symmetric=True, labels=torch.zeros(4))
    with pytest.raises(ValueError, match=r"labels must be \(4,\) \(one per sample\)"):
        ressl_loss(views, symmetric=True, labels=torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="key may be omitted only in the symmetric form"):
        sce_loss(views)
    with pytest.raises(ValueError, match=r"labels with a queue need queue_labels \(M,\)"):
        sce_loss(views[0], views[1], views[2], labels=torch.arange(4))
    with pytest.raises(ValueError, match="compare in-batch embeddings only: pass no queue"):
        sce_loss(views, symmetric=True, labels=torch.arange(4), include_keys=True)


@pytest.mark.parametrize("loss", LOSSES)
def test_rows_stream_in_blocks_with_the_same_results(monkeypatch, loss):
    from sce_loss import chunked_positives

    views, labels = views_of(3, 7, seed=43), LABELS[1]
    want = all_outputs(loss, "chunked", views, labels)
    monkeypatch.setattr(chunked_positives, "ROW_BLOCK", 4)  # 21 rows: six blocks
    got = all_outputs(loss, "chunked", views, labels)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)


# -- what an adversarial review found ----------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.uint8, torch.int32])
@pytest.mark.parametrize("loss", ["sce", "ressl", "info_nce"])
def test_narrow_integer_labels_give_the_int64_result_on_every_backend(dtype, loss):
    fn = {**LOSSES, "info_nce": info_nce_loss}[loss]
    query, key = views_of(2, 6, seed=60)
    labels = torch.tensor([4, 1, 4, 4, 2, 1])
    want = fn(query, key, labels=labels, reduction="none", backend="reference")
    for backend in ("reference", "chunked"):
        got = fn(query, key, labels=labels.to(dtype), reduction="none", backend=backend)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_queue_labels_are_compared_as_integers_not_in_the_labels_dtype():
    from sce_loss import MemoryQueue

    query, key = views_of(2, 2, seed=61)
    bank = MemoryQueue(4, 8, dtype=torch.float64, labels=True)  # fresh: every label −1
    for backend in ("reference", "chunked"):
        want = sce_loss(query, key, bank.keys, labels=torch.tensor([255, 3]),
                        queue_labels=bank.labels, reduction="none", backend=backend)  # fmt: skip
        got = sce_loss(query, key, bank.keys, labels=torch.tensor([255, 3], dtype=torch.uint8),
                       queue_labels=bank.labels, reduction="none", backend=backend)  # fmt: skip
        torch.testing.assert_close(got, want, rtol=0, atol=0)  # −1 is no 255
        large = torch.full((4,), 2**32 + 3)
        want = sce_loss(query, key, bank.keys, labels=torch.tensor([7, 3]), queue_labels=large,
                        reduction="none", backend=backend)  # fmt: skip
        got = sce_loss(query, key, bank.keys, labels=torch.tensor([7, 3], dtype=torch.int32),
                       queue_labels=large, reduction="none", backend=backend)  # fmt: skip
        torch.testing.assert_close(got, want, rtol=0, atol=0)  # 2^32 + 3 is no 3


@pytest.mark.parametrize("loss", ["sce", "ressl", "info_nce"])
def test_a_row_with_no_candidate_at_all_gives_zero_gradients(loss):
    fn = {**LOSSES, "info_nce": info_nce_loss}[loss]
    for backend in ("reference", "chunked"):
        x = torch.randn(1, 4, dtype=torch.float64, requires_grad=True)  # one view, one sample
        value = fn(x, symmetric=True, labels=torch.tensor([0]), backend=backend)
        (grad,) = torch.autograd.grad(value, x)
        assert value.item() == 0 and (grad == 0).all(), (backend, grad)


@pytest.mark.parametrize("loss", ["sce", "ressl", "info_nce"])
def test_cross_entropies_are_never_below_zero(loss):
    """Where a row's only candidate is its positive, the loss is 0: rounding must not give less."""
    fn = {**LOSSES, "info_nce": info_nce_loss}[loss]
    g = torch.Generator().manual_seed(62)
    z1, z2 = torch.randn(1, 8, generator=g), torch.randn(1, 8, generator=g)
    for backend in ("reference", "chunked"):
        views = fn(torch.stack([z1, z2]), symmetric=True, labels=torch.arange(1),
                   reduction="none", backend=backend)  # fmt: skip
        in_batch = fn(z1, z2, labels=torch.arange(1), reduction="none", backend=backend)
        assert (views >= 0).all() and (in_batch >= 0).all(), (backend, views, in_batch)


@pytest.mark.matrix
@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("mode", ["labels", "in-batch", "queue", "symmetric"])
def test_a_compiled_step_does_not_recompile_for_each_batch_size(backend, mode):
    """Static shapes, then dynamic ones: the streams' sizes stay symbolic (a len() of a traced
    tensor, or a chunk width from its rows, once specialised the graph to each batch)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    tau = torch.nn.Parameter(torch.tensor(TAU))
    queue = views_of(1, 64, seed=5)[0].float()

    def step(views, labels):
        options = dict(temperature=tau, backend=backend)
        if mode == "labels":
            return sce_loss(views, symmetric=True, labels=labels, **options)
        if mode == "symmetric":
            return sce_loss(views[0], views[1], symmetric=True, **options)
        return sce_loss(views[0], views[1], queue if mode == "queue" else None, **options)

    compiled = torch.compile(step, backend=counter, fullgraph=True)
    for n in range(8, 12):  # a graph per batch size would be 4
        views = views_of(2, n, seed=n).float().requires_grad_()
        compiled(views, torch.arange(n) % 3).backward()
    assert counter.frame_count <= 2, counter.frame_count
