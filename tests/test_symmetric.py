"""The symmetric (SimCLR) form: two online views, 2N rows, 2N − 1 candidates.

The peers' NT-Xent formulas are transcribed here from their code (lightly's ``NTXentLoss``
without a memory bank, solo-learn's ``simclr_loss_func``, pytorch-metric-learning's
``SelfSupervisedLoss(NTXentLoss())``), not imported; a literal per-row loop pins SCE and ReSSL in
this form; the chunked backend must equal the reference without any 2N × 2N tensor.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import unit
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.testing import CompileCounterWithBackend
from torch.profiler import profile

from sce_loss import (
    InfoNCELoss,
    MemoryQueue,
    ReSSLLoss,
    SCELoss,
    chunked,
    info_nce_loss,
    ressl_loss,
    sce_loss,
)
from sce_loss import fused as fused_backend
from sce_loss.functional import _backend
from sce_loss.problem import DEFAULT_HYPER_PARAMETERS, Problem

FUNCTIONS = {"info_nce": info_nce_loss, "ressl": ressl_loss, "sce": sce_loss}
HYPER = {
    "info_nce": dict(temperature=0.2),
    "ressl": dict(temperature=0.1, target_temperature=0.04),
    "sce": dict(coeff=0.4, temperature=0.1, target_temperature=0.05),
}


def views(n=6, d=8, seed=0, dtype=torch.float64, scale=1.0):
    """Two views (z1, z2) of n samples, unit vectors times ``scale``, requiring grad."""
    g = torch.Generator().manual_seed(seed)
    z1, z2 = (scale * unit(n, d, generator=g) for _ in range(2))
    return z1.to(dtype).requires_grad_(), z2.to(dtype).requires_grad_()


def gradients(value, *leaves):
    return torch.autograd.grad(value, leaves)


# -- the peers' formulas, transcribed -----------------------------------------------------------


def lightly_ntxent(out0, out1, temperature):
    """lightly.loss.NTXentLoss.forward with memory_bank_size 0 and one process."""
    out0, out1 = F.normalize(out0, dim=1), F.normalize(out1, dim=1)
    batch_size = out0.shape[0]
    diag_mask = torch.eye(batch_size, dtype=torch.bool)
    logits_00 = out0 @ out0.T / temperature
    logits_01 = out0 @ out1.T / temperature
    logits_10 = out1 @ out0.T / temperature
    logits_11 = out1 @ out1.T / temperature
    logits_00 = logits_00[~diag_mask].view(batch_size, -1)
    logits_11 = logits_11[~diag_mask].view(batch_size, -1)
    logits_0100 = torch.cat([logits_01, logits_00], dim=1)
    logits_1011 = torch.cat([logits_10, logits_11], dim=1)
    logits = torch.cat([logits_0100, logits_1011], dim=0)
    labels = torch.arange(batch_size).repeat(2)
    return F.cross_entropy(logits, labels)


def solo_learn_simclr(z, indexes, temperature):
    """solo.losses.simclr.simclr_loss_func with one process (z = [z1; z2], indexes repeated)."""
    z = F.normalize(z, dim=-1)
    sim = torch.exp(torch.einsum("if, jf -> ij", z, z) / temperature)
    indexes, gathered = indexes.unsqueeze(0), indexes.unsqueeze(0)
    pos_mask = indexes.t() == gathered
    pos_mask.fill_diagonal_(0)
    neg_mask = indexes.t() != gathered
    pos = torch.sum(sim * pos_mask, 1)
    neg = torch.sum(sim * neg_mask, 1)
    return -(torch.mean(torch.log(pos / (pos + neg))))


def metric_learning_ntxent(embeddings, labels, temperature, ref_emb=None, ref_labels=None):
    """pytorch_metric_learning.losses.NTXentLoss: cosine similarity; for every positive pair
    (a, p) of anchors ``embeddings`` and references ``ref_emb`` (the embeddings themselves when
    None, less the anchor itself), −log e^{s_ap/τ} / (e^{s_ap/τ} + Σ_n e^{s_an/τ}) over the
    anchor's negatives (other labels), averaged over the positive pairs."""
    same = ref_emb is None
    ref_emb, ref_labels = (embeddings, labels) if same else (ref_emb, ref_labels)
    sims = F.normalize(embeddings, dim=-1) @ F.normalize(ref_emb, dim=-1).T / temperature
    positive = labels[:, None] == ref_labels[None]
    if same:
        positive.fill_diagonal_(False)
    negative = labels[:, None] != ref_labels[None]
    losses = []
    for a, p in positive.nonzero().tolist():
        negatives = torch.logsumexp(sims[a][negative[a]], 0)
        losses.append(-(sims[a, p] - torch.logaddexp(sims[a, p], negatives)))
    return torch.stack(losses).mean()


def self_supervised_loss(embeddings, ref_emb, temperature, symmetric):
    """pytorch_metric_learning.losses.SelfSupervisedLoss(NTXentLoss(τ), symmetric)."""
    labels = torch.arange(embeddings.shape[0])
    if symmetric:
        both = torch.cat([embeddings, ref_emb], dim=0)
        return metric_learning_ntxent(both, torch.cat([labels, labels]), temperature)
    return metric_learning_ntxent(embeddings, labels, temperature, ref_emb, labels)


@pytest.mark.parametrize("peer", ["lightly", "solo-learn", "metric-learning"])
@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_nt_xent_equals_the_peers(peer, backend):
    """Values and gradients of z1, z2 and a learnable τ, float64, unnormalised inputs."""
    z1, z2 = views(n=7, seed=1, scale=1.7)
    tau = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    ours = info_nce_loss(z1, z2, symmetric=True, temperature=tau, normalize=True, backend=backend)
    if peer == "lightly":
        theirs = lightly_ntxent(z1, z2, tau)
    elif peer == "solo-learn":
        theirs = solo_learn_simclr(torch.cat([z1, z2]), torch.arange(7).repeat(2), tau)
    else:
        theirs = self_supervised_loss(z1, z2, tau, symmetric=True)
    torch.testing.assert_close(ours, theirs, rtol=1e-13, atol=1e-13)
    for got, want in zip(gradients(ours, z1, z2, tau), gradients(theirs, z1, z2, tau)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)


def test_metric_learning_without_symmetry_is_the_in_batch_info_nce():
    """SelfSupervisedLoss(NTXentLoss(), symmetric=False) compares each anchor with ``ref_emb``
    only: N − 1 negatives, which is ``info_nce_loss(embeddings, ref_emb)`` in-batch."""
    z1, z2 = views(n=7, seed=2, scale=0.8)
    ours = info_nce_loss(z1, z2, temperature=0.07, normalize=True)
    theirs = self_supervised_loss(z1, z2, 0.07, symmetric=False)
    torch.testing.assert_close(ours, theirs, rtol=1e-13, atol=1e-13)
    for got, want in zip(gradients(ours, z1, z2), gradients(theirs, z1, z2)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)


# -- the specification, literally --------------------------------------------------------------


def literal_rows(loss, z1, z2, temperature, target_temperature=1.0, coeff=1.0):
    """Per-row losses (2, N) of the symmetric form, one row and one candidate at a time."""
    e = torch.cat([z1, z2]).tolist()
    n = len(z1)
    out = [[0.0] * n for _ in range(2)]
    for v in range(2):
        for i in range(n):
            row, pos = v * n + i, (1 - v) * n + i
            cands = [c for c in range(2 * n) if c != row]
            a = {c: sum(x * y for x, y in zip(e[row], e[c])) / temperature for c in cands}
            b = {c: sum(x * y for x, y in zip(e[pos], e[c])) / target_temperature for c in cands}

            def log_softmax(logits, over):
                top = max(logits[c] for c in over)
                total = math.log(sum(math.exp(logits[c] - top) for c in over)) + top
                return {c: logits[c] - total for c in over}

            negatives = [c for c in cands if c != pos]
            s2 = {c: math.exp(value) for c, value in log_softmax(b, negatives).items()}
            if loss == "ressl":
                log_s1 = log_softmax(a, negatives)
                value = -sum(s2[c] * log_s1[c] for c in negatives)
            else:
                log_p = log_softmax(a, cands)
                value = -coeff * log_p[pos] - (1 - coeff) * sum(s2[c] * log_p[c] for c in negatives)
            out[v][i] = value
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("loss", FUNCTIONS)
@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_per_row_losses_are_the_specification(loss, backend):
    z1, z2 = views(n=5, seed=3)
    hyper = HYPER[loss]
    got = FUNCTIONS[loss](z1, z2, symmetric=True, reduction="none", backend=backend, **hyper)
    assert got.shape == (2, 5)
    want = literal_rows(loss, z1.detach(), z2.detach(), **hyper)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def log_one_minus_p_pos(z1, z2, tau):
    """log(1 − p_pos) of each row of the symmetric form, (2, N): the log of the negatives' share
    of the online softmax, LSE over the 2N − 2 negatives minus LSE over the 2N − 1 candidates (as
    1 − exp(−NT-Xent) it cancels to nothing where p_pos rounds to 1)."""
    z = torch.cat([z1, z2])
    rows = len(z)
    logits = (z @ z.T / tau).fill_diagonal_(float("-inf"))
    positives = (torch.arange(rows) + rows // 2) % rows
    negatives = logits.clone()
    negatives[torch.arange(rows), positives] = float("-inf")
    return (torch.logsumexp(negatives, 1) - torch.logsumexp(logits, 1)).view(2, -1)


unit_pairs = st.tuples(st.integers(2, 9), st.integers(2, 6), st.integers(0, 2**16))


@settings(deadline=None)
@given(unit_pairs, st.floats(0.05, 1.0), st.floats(0.02, 1.0), st.floats(0.0, 1.0))
def test_sce_relations_in_the_symmetric_form(sizes, tau, tau_m, coeff):
    """SCE(λ=1) = NT-Xent; SCE(λ=0) = ReSSL − log(1 − p_pos) per row; linear in λ."""
    n, d, seed = sizes
    z1, z2 = (x.detach() for x in views(n, d, seed))
    options = dict(symmetric=True, reduction="none", temperature=tau)
    sce = lambda lam: sce_loss(z1, z2, coeff=lam, target_temperature=tau_m, **options)  # noqa: E731
    nt_xent = info_nce_loss(z1, z2, **options)
    torch.testing.assert_close(sce(1.0), nt_xent, rtol=1e-12, atol=1e-12)
    ressl = ressl_loss(z1, z2, target_temperature=tau_m, **options)
    log_negatives_share = log_one_minus_p_pos(z1, z2, tau)  # log(1 − p_pos), without cancelling
    torch.testing.assert_close(sce(0.0), ressl - log_negatives_share, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(
        sce(coeff), coeff * sce(1.0) + (1 - coeff) * sce(0.0), rtol=1e-12, atol=1e-12
    )


# -- backends ------------------------------------------------------------------------------------


def symmetric_problem(loss, z1, z2, temperature):
    hyper = {k: v for k, v in HYPER[loss].items() if k != "temperature"}
    if loss == "ressl":
        hyper["coeff"] = 0.0
    query, key = torch.cat([z1, z2]), torch.cat([z2, z1])
    return Problem(
        loss=loss,
        query=query[None],
        key=key,
        bank=key,
        queue=None,
        offset=0,
        temperature=temperature,
        **hyper,
        symmetric=True,
    )


@pytest.mark.parametrize("loss", FUNCTIONS)
@pytest.mark.parametrize("chunk", [1, 2, 5, None])
def test_chunked_equals_the_reference(loss, chunk):
    """Values and gradients (z1, z2, learnable τ), chunks that split the 2N columns raggedly."""
    z1, z2 = views(n=6, seed=4)
    tau = torch.tensor(HYPER[loss]["temperature"], dtype=torch.float64, requires_grad=True)
    weights = torch.linspace(0.5, 1.5, 12, dtype=torch.float64).view(1, 12)

    def run(losses_of):
        per_row = losses_of(symmetric_problem(loss, z1, z2, tau))
        return per_row.detach(), *gradients((weights * per_row).sum(), z1, z2, tau)

    from sce_loss import reference

    for got, want in zip(run(lambda p: chunked.losses(p, chunk_size=chunk)), run(reference.losses)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_views_are_computed_in_float32(dtype):
    z1, z2 = views(n=9, d=16, seed=5, dtype=dtype)

    def run(backend):
        loss = sce_loss(z1, z2, symmetric=True, backend=backend)
        return loss, *gradients(loss, z1, z2)

    got, want = run("chunked"), run("reference")
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype
    for g, w in zip(got, want):
        torch.testing.assert_close(g.float(), w.float(), rtol=1e-2, atol=1e-3)


def test_chunked_never_holds_a_2n_by_2n_tensor(monkeypatch):
    """At 2N = 1024 with chunks of 2^16 logits, no allocation of the forward and backward is
    larger than one chunk's logits: (2N online + 2N target rows) × 64 columns."""
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 1 << 16)
    n, d = 512, 16
    z1, z2 = views(n=n, d=d, seed=6, dtype=torch.float32)
    with profile(profile_memory=True) as prof:
        sce_loss(z1, z2, symmetric=True, backend="chunked").backward()
    largest = max(event.cpu_memory_usage for event in prof.events())
    assert largest <= 4 * n * chunked.MIN_CHUNK * 4 < (2 * n) ** 2 * 4 // 2, largest


def test_the_fused_kernels_decline_and_auto_streams_large_batches():
    z1, z2 = (x.detach() for x in views(n=4, seed=7, dtype=torch.float32))
    problem = symmetric_problem("sce", z1, z2, 0.1)
    assert "symmetric" in fused_backend.unsupported_reason(problem)
    with pytest.raises(ValueError, match="symmetric"):
        sce_loss(z1, z2, symmetric=True, backend="fused")
    assert _backend("auto", problem).__name__ == "sce_loss.reference"
    big = torch.zeros(1, 4096, 1)
    large = Problem(
        loss="sce",
        query=big,
        key=big[0],
        bank=big[0],
        queue=None,
        offset=0,
        **DEFAULT_HYPER_PARAMETERS["sce"],
        symmetric=True,
    )
    assert _backend("auto", large).__name__ == "sce_loss.chunked"


# -- the API ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda z1, z2: sce_loss(z1, z2, z2, symmetric=True), "no queue"),
        (lambda z1, z2: sce_loss(z1, z2, z2, symmetric=True, include_keys=True), "no queue"),
        (lambda z1, z2: sce_loss(torch.stack([z1, z1]), z2, symmetric=True), r"\(N, D\)"),
        (
            lambda z1, z2: sce_loss(z1[:1], z2[:1], symmetric=True),
            r"at least 2 samples \(across every rank\), got 1$",
        ),
        (lambda z1, z2: info_nce_loss(z1, z2, symmetric=1), "symmetric must be a bool"),
        (lambda z1, z2: SCELoss(symmetric=True, queue=MemoryQueue(8, 8)), "hold no queue"),
    ],
)
def test_bad_calls_are_refused(call, message):
    z1, z2 = (x.detach() for x in views(n=4, seed=8))
    with pytest.raises((ValueError, TypeError), match=message):
        call(z1, z2)


def test_inputs_are_not_modified_and_both_views_get_gradients():
    z1, z2 = views(n=5, seed=9, scale=2.0)
    before = z1.detach().clone(), z2.detach().clone()
    sce_loss(z1, z2, symmetric=True, normalize=True).backward()
    assert torch.equal(z1.detach(), before[0]) and torch.equal(z2.detach(), before[1])
    assert z1.grad.abs().sum() > 0 and z2.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "module, function",
    [(InfoNCELoss, info_nce_loss), (ReSSLLoss, ressl_loss), (SCELoss, sce_loss)],
)
def test_modules_take_the_flag(module, function):
    z1, z2 = (x.detach() for x in views(n=5, seed=10))
    criterion = module(symmetric=True, reduction="none")
    torch.testing.assert_close(
        criterion(z1, z2), function(z1, z2, symmetric=True, reduction="none"), rtol=0, atol=0
    )


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_compiles_at_most_twice_under_a_temperature_schedule(backend):
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    z1, z2 = (x.detach().float() for x in views(n=6, seed=11))

    @torch.compile(backend=counter, fullgraph=True)
    def step(z1, z2, tau, coeff):
        return sce_loss(z1, z2, symmetric=True, temperature=tau, coeff=coeff, backend=backend)

    for i in range(5):
        tau, coeff = 0.1 + 0.01 * i, 0.5 - 0.05 * i
        a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
        got = step(a, b, tau, coeff)
        got.backward()
        c, d = z1.clone().requires_grad_(), z2.clone().requires_grad_()
        want = sce_loss(c, d, symmetric=True, temperature=tau, coeff=coeff, backend=backend)
        want.backward()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.grad, c.grad, rtol=1e-5, atol=1e-6)
    assert counter.frame_count <= 2


def test_a_compiled_step_streams_on_the_chunked_backend():
    """The compiled graph runs the chunk loop: compiling does not fall back to the reference."""
    graphs = []

    def recording(gm, example_inputs):
        graphs.append(gm.print_readable(print_output=False))
        return gm.forward

    torch._dynamo.reset()
    z1, z2 = views(n=6, seed=12, dtype=torch.float32)
    step = torch.compile(
        lambda a, b: sce_loss(a, b, symmetric=True, backend="chunked"),
        backend=recording,
        fullgraph=True,
    )
    step(z1, z2).backward()
    assert any("chunked_stream" in graph for graph in graphs)


@pytest.mark.parametrize("loss", FUNCTIONS)
@pytest.mark.parametrize("row_block", [2, 5])
def test_row_blocks_in_the_symmetric_form(loss, row_block, monkeypatch):
    monkeypatch.setattr(chunked, "ROW_BLOCK", row_block)
    test_chunked_equals_the_reference(loss, 3)
