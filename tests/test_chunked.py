"""The chunked backend (the fused kernels' streaming algorithm in plain PyTorch) against the
reference: values and gradients of every loss and mode, with and without crops and a gathered
bank, over chunks that split the candidates raggedly down to one column; gradcheck, extreme
temperatures, 16-bit inputs, a queue updated before the backward, memory and torch.compile."""

import pytest
import torch
from conftest import MODES, make_inputs, unit
from torch._dynamo.testing import CompileCounterWithBackend
from torch.profiler import profile

from sce_loss import chunked, info_nce_loss, reference, ressl_loss, sce_loss
from sce_loss.problem import Problem

HYPER = {
    "info_nce": dict(temperature=0.2),
    "ressl": dict(temperature=0.1, target_temperature=0.04, coeff=0.0),
    "sce": dict(temperature=0.1, target_temperature=0.05, coeff=0.4),
}
FUNCTIONS = {"info_nce": info_nce_loss, "ressl": ressl_loss, "sce": sce_loss}
# With N=5 (a bank of 5 or 15 keys) and M=7: chunks of one column, ragged splits, one chunk.
CHUNKS = [1, 2, 3, None]


# The keyword arguments of each public function, read once (outside any compiled step).
KEYWORDS = {loss: set(function.__kwdefaults__) for loss, function in FUNCTIONS.items()}


def public_hyper(loss, **changes):
    """HYPER[loss] as keyword arguments of the public function."""
    hyper = {**HYPER[loss], **changes}
    return {k: v for k, v in hyper.items() if k in KEYWORDS[loss]}


def build(loss, mode, query, key, queue, temperature, ranks=1, **changes):
    """The problem of a mode; with ``ranks`` > 1 the bank holds the keys of that many ranks, this
    rank's second (positive at offset + i), as a gather would give them."""
    bank, offset = None, 0
    if mode != "queue":
        others = unit(
            ranks - 1, *key.shape, dtype=key.dtype, generator=torch.Generator().manual_seed(ranks)
        )
        bank = torch.cat([*others[:1], key, *others[1:]])
        offset = len(key) * min(ranks - 1, 1)
    query = query if query.dim() == 3 else query.unsqueeze(0)
    hyper = HYPER[loss] | dict(temperature=temperature) | changes
    return Problem(loss=loss, query=query, key=key, bank=bank, queue=queue, offset=offset, **hyper)


def evaluate(losses_of, problem, leaves):
    """Per-row losses and the gradients of the leaves under a non-uniform upstream gradient."""
    per_row = losses_of(problem)
    weights = torch.linspace(0.5, 1.5, per_row.numel(), dtype=per_row.dtype).view(per_row.shape)
    grads = torch.autograd.grad((per_row * weights).sum(), leaves, allow_unused=True)
    return per_row.detach(), *grads


def leaves_of(mode, crops=None, dtype=torch.float64, temperature=0.1, seed=0, **sizes):
    query, key, queue, _ = make_inputs(mode, crops=crops, dtype=dtype, seed=seed, **sizes)
    temperature = torch.tensor(temperature, dtype=torch.float64)
    return query.requires_grad_(), key.requires_grad_(), queue, temperature.requires_grad_()


@pytest.mark.parametrize("loss", HYPER)
@pytest.mark.parametrize("crops", [None, 2])
@pytest.mark.parametrize(
    "mode, ranks", [(mode, 1) for mode in MODES] + [("in-batch", 3), ("queue+keys", 3)]
)
@pytest.mark.parametrize("chunk", CHUNKS)
def test_chunked_matches_the_reference_in_float64(loss, mode, crops, ranks, chunk):
    query, key, queue, temperature = leaves_of(
        mode, crops, temperature=HYPER[loss]["temperature"], seed=(chunk or 4) + ranks
    )
    problem = build(loss, mode, query, key, queue, temperature, ranks)
    leaves = (query, key, temperature)
    got = evaluate(lambda p: chunked.losses(p, chunk_size=chunk), problem, leaves)
    want = evaluate(reference.losses, problem, leaves)
    for label, g, w in zip(("loss", "query grad", "key grad", "temperature grad"), got, want):
        assert g.dtype == w.dtype == torch.float64, label
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12, msg=label)


@pytest.mark.parametrize("loss", HYPER)
@pytest.mark.parametrize("chunk", [2, None])
def test_public_functions_with_the_chunked_backend(loss, mode, chunk, monkeypatch):
    """Through the public API, with chunks of 2 and, on a queue longer than two default chunks,
    the default; normalisation and reduction around the backend; the queue stored (D, M) and passed
    transposed, as the official MoCo code holds it."""
    if chunk is not None:
        monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 0)
        monkeypatch.setattr(chunked, "MIN_CHUNK", chunk)
    m = 7 if chunk else 2 * chunked.chunk_columns(3 * 6) + 5
    query, key, queue, _ = make_inputs(mode, n=6, d=5, m=m, crops=2, seed=3)
    queue = None if queue is None else queue.T.contiguous().T
    hyper = public_hyper(loss)

    def run(backend):
        q, k = (2 * query).requires_grad_(), (3 * key).requires_grad_()  # normalised inside
        values = FUNCTIONS[loss](
            q,
            k,
            queue,
            include_keys=mode == "queue+keys",
            normalize=True,
            reduction="none",
            backend=backend,
            **hyper,
        )
        weights = torch.linspace(0.5, 1.5, values.numel(), dtype=values.dtype)
        values.backward(weights.view_as(values))
        return values.detach(), q.grad, k.grad

    for g, w in zip(run("chunked"), run("reference")):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("loss", HYPER)
@pytest.mark.parametrize("needs_grad", ["query", "key", "temperature", "nothing"])
def test_only_the_gradients_asked_for(loss, mode, needs_grad):
    """Each input needing a gradient alone (and none, under no_grad) gives the reference's values
    and that gradient: the forward skips the D-vectors the gradients do not need."""
    query, key, queue, temperature = leaves_of(mode, crops=2, seed=4)
    leaves = dict(query=query, key=key, temperature=temperature)
    for name, leaf in leaves.items():
        leaf.requires_grad_(name == needs_grad)
    problem = build(loss, mode, query, key, queue, temperature)
    if needs_grad == "nothing":
        with torch.no_grad():
            torch.testing.assert_close(
                chunked.losses(problem, chunk_size=3),
                reference.losses(problem),
                rtol=1e-12,
                atol=1e-12,
            )
        return
    got = evaluate(lambda p: chunked.losses(p, chunk_size=3), problem, (leaves[needs_grad],))
    want = evaluate(reference.losses, problem, (leaves[needs_grad],))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("loss", HYPER)
@pytest.mark.parametrize("crops", [None, 2])
def test_gradcheck(loss, mode, crops):
    """Query, τ and (InfoNCE) key through a gathered bank, at chunks of 2. For SCE and ReSSL a
    finite-difference step on the key also moves the target, a constant by definition, so their
    key gradient is checked against the reference above instead."""
    query, key, queue, temperature = leaves_of(mode, crops, temperature=0.3, n=4, d=3, m=5, seed=5)
    key.requires_grad_(loss == "info_nce")

    def per_row(query, key, temperature):
        return chunked.losses(
            build(loss, mode, query, key, queue, temperature, ranks=2), chunk_size=2
        )

    assert torch.autograd.gradcheck(per_row, (query, key, temperature))


def test_hyper_parameters_as_tensors_get_no_gradient():
    """λ and τ_m as 0-d tensors (even requiring grad) shape a constant target."""
    query, key, queue, temperature = leaves_of("queue+keys", seed=6)
    coeff = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    target_temperature = torch.tensor(0.07, dtype=torch.float64, requires_grad=True)
    problem = build(
        "sce",
        "queue+keys",
        query,
        key,
        queue,
        temperature,
        coeff=coeff,
        target_temperature=target_temperature,
    )
    leaves = (query, key, temperature, coeff, target_temperature)
    got = evaluate(lambda p: chunked.losses(p, chunk_size=2), problem, leaves)
    want = evaluate(
        reference.losses,
        build(
            "sce", "queue+keys", query, key, queue, temperature, coeff=0.3, target_temperature=0.07
        ),
        leaves[:3],
    )
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    assert got[-2:] == (None, None)


@pytest.mark.parametrize("loss", HYPER)
@pytest.mark.parametrize("embeddings", ["random", "identical", "opposite"])
def test_extreme_temperatures_in_float32(loss, mode, embeddings):
    """τ = τ_m = 0.01: logits of ±100, with ties everywhere (identical embeddings) or keys
    opposite their queries. Nothing overflows, and float32 agrees with float64 to the precision of
    float32 logits that size: 1e-5 of the larger of each quantity and the terms it sums."""
    query, key, queue, _ = make_inputs(mode, n=8, d=16, m=32, crops=2, seed=7)
    if embeddings == "identical":
        query, key = query[:1, :1].expand_as(query), query[0, :1].expand_as(key)
        queue = None if queue is None else query[0, :1].expand_as(queue)
    if embeddings == "opposite":
        key = -query[0]
    hyper = dict(target_temperature=0.01) if loss != "info_nce" else {}
    exact = build(
        loss,
        mode,
        query.clone().requires_grad_(),
        key.clone().requires_grad_(),
        queue,
        torch.tensor(0.01, dtype=torch.float64, requires_grad=True),
        **hyper,
    )
    low = build(
        loss,
        mode,
        exact.query.detach().float().requires_grad_(),
        exact.key.detach().float().requires_grad_(),
        None if queue is None else queue.float(),
        torch.tensor(0.01, requires_grad=True),
        **hyper,
    )
    got = evaluate(
        lambda p: chunked.losses(p, chunk_size=5), low, (low.query, low.key, low.temperature)
    )
    want = evaluate(reference.losses, exact, (exact.query, exact.key, exact.temperature))
    # The size of the terms each sums: logits a ~ 1/τ (loss, x/τ and c/τ in the gradients),
    # and a/τ ~ 1/τ² in dL/dτ.
    sizes = {"loss": 1e2, "query grad": 1e2, "key grad": 1e2, "temperature grad": 1e4}
    for (label, size), g, w in zip(sizes.items(), got, want):
        assert torch.isfinite(g).all(), label
        scale = max(w.abs().max().item(), size)
        torch.testing.assert_close(g.double(), w, rtol=0, atol=1e-5 * scale, msg=label)


@pytest.mark.parametrize("loss", HYPER)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_inputs_are_computed_in_float32(loss, mode, dtype):
    """bf16/fp16 query, key and queue (the queue cast chunk by chunk): float32 losses and input-
    dtype gradients that agree with float64 on the same rounded inputs to float32 precision."""
    query, key, queue, temperature = leaves_of(mode, crops=2, dtype=dtype, n=16, d=32, m=64, seed=8)
    low = build(loss, mode, query, key, queue, temperature)
    got = evaluate(lambda p: chunked.losses(p, chunk_size=24), low, (query, key, temperature))
    exact_leaves = [x.detach().double().requires_grad_() for x in (query, key, temperature)]
    exact = build(
        loss,
        mode,
        exact_leaves[0],
        exact_leaves[1],
        None if queue is None else queue.double(),
        exact_leaves[2],
    )
    want = evaluate(reference.losses, exact, exact_leaves)
    assert got[0].dtype == torch.float32
    assert got[1].dtype == got[2].dtype == dtype
    for label, g, w in zip(("loss", "temperature grad"), got[::3], want[::3]):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-6, msg=label)
    for label, g, w in zip(("query grad", "key grad"), got[1:3], want[1:3]):
        # float32 values, rounded to the inputs' dtype at the end: one rounding of that dtype
        torch.testing.assert_close(g.double(), w, rtol=torch.finfo(dtype).eps, atol=1e-6, msg=label)


@pytest.mark.parametrize("loss", HYPER)
@pytest.mark.parametrize("mode", ["queue", "queue+keys"])
@pytest.mark.parametrize("queue_dtype", [torch.float32, torch.bfloat16])
def test_queue_updated_in_place_before_the_backward(loss, mode, queue_dtype):
    """MoCo enqueues inside forward: the gradients are those of the queue read at the call."""
    query, key, queue, include_keys = make_inputs(
        mode, n=6, d=8, m=9, crops=2, dtype=torch.float32, seed=9
    )
    queue = queue.to(queue_dtype)
    replacement = unit(*queue.shape, generator=torch.Generator().manual_seed(1)).to(queue_dtype)

    def gradients(queue, update=None):
        q, k = query.clone().requires_grad_(), key.clone().requires_grad_()
        loss_value = FUNCTIONS[loss](
            q, k, queue, include_keys=include_keys, backend="chunked", **public_hyper(loss)
        )
        if update is not None:
            queue.copy_(update)
        loss_value.backward()
        return q.grad, k.grad

    want = gradients(queue.clone())
    got = gradients(queue.clone(), update=replacement)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    # The update matters: the new queue's own gradients differ.
    assert not torch.allclose(gradients(replacement.clone())[0], want[0])


@pytest.mark.parametrize("mode", ["queue", "queue+keys"])
def test_memory_is_one_chunk_not_the_queue(mode):
    """No allocation of the forward and backward is larger than a chunk's logits: the reference
    allocates rows × M and the float32 copy of a bfloat16 queue; the chunked backend neither."""
    n, d, m, chunk = 8, 16, 20000, 1000
    query, key, queue, temperature = leaves_of(mode, dtype=torch.float32, n=n, d=d, m=m)
    problem = build("sce", mode, query, key, queue.bfloat16(), temperature)

    def largest_allocation(losses_of):
        with profile(profile_memory=True) as prof:
            losses_of(problem).sum().backward()
        return max(event.cpu_memory_usage for event in prof.events())

    chunk_logits = 2 * n * chunk * 4
    assert largest_allocation(lambda p: chunked.losses(p, chunk_size=chunk)) <= chunk_logits
    assert largest_allocation(reference.losses) >= n * m * 4


@pytest.mark.parametrize("loss", ["info_nce", "sce"])
@pytest.mark.parametrize("crops", [None, 2])
def test_the_default_chunk_holds_at_most_chunk_elements_logits(loss, crops):
    """The default chunk width counts every row of the product, V·N online rows and N target rows
    (SCE, not InfoNCE): one chunk's logits stay within CHUNK_ELEMENTS float32 values (4 MiB)."""
    query, key, queue, temperature = leaves_of("queue", crops, torch.float32, n=64, d=8, m=100)
    problem = build(loss, "queue", query, key, queue, temperature)
    with profile(profile_memory=True) as prof:
        chunked.losses(problem).sum().backward()
    largest = max(event.cpu_memory_usage for event in prof.events())
    assert chunked.CHUNK_ELEMENTS * 4 // 2 < largest <= chunked.CHUNK_ELEMENTS * 4


def test_a_differentiated_backward_is_the_references():
    """Differentiating the backward (create_graph=True, here through a learnable weighting of the
    rows and a gradient penalty) recomputes through the reference's graph: the same numbers."""

    def second_order(losses_of):
        query, key, queue, temperature = leaves_of("queue")
        weights = torch.ones(1, len(key), dtype=torch.float64, requires_grad=True)
        per_row = losses_of(build("sce", "queue", query, key, queue, temperature))
        (grad,) = torch.autograd.grad((weights * per_row).sum(), query, create_graph=True)
        return torch.autograd.grad(grad.square().sum(), (weights, query, key, temperature))

    for got, want in zip(second_order(chunked.losses), second_order(reference.losses)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_a_queue_updated_before_a_differentiated_backward_raises():
    query, key, queue, temperature = leaves_of("queue")
    queue = queue.clone()
    per_row = chunked.losses(build("sce", "queue", query, key, queue, temperature))
    queue.mul_(-1)
    with pytest.raises(RuntimeError, match="backend='reference'"):
        torch.autograd.grad(per_row.sum(), query, create_graph=True)


def test_chunk_loops_pass_opcheck():
    """The two chunk loops are custom ops (torch.compile runs them as they are): their schemas
    and fake-tensor implementations, as torch.compile relies on them."""
    views, n, d = 2, 5, 8
    exponents = unit(views * n + n, d, dtype=torch.float32)
    bank, queue = unit(3 * n, d, dtype=torch.float32), unit(7, d, dtype=torch.float32)
    masked = chunked.masked_columns(
        n,
        views=views,
        offset=n,
        online_has_pos=False,
        need_target=True,
        symmetric=False,
        device="cpu",
    )
    keys, positive = bank[:n], chunked.positive_columns(views * n, n, 0, "cpu")
    online = views * n
    for stream_args, options in (
        ((exponents, bank, queue.bfloat16(), masked), dict(chunk_size=3)),
        ((exponents, bank, queue, masked, None, positive + n), dict(chunk_size=3)),
        (
            (exponents, None, queue, masked, keys, positive),
            dict(chunk_size=4, vectors_from=len(exponents)),
        ),
        ((exponents, None, queue, masked, keys, positive), dict(chunk_size=4)),
        (
            (exponents[:online], None, queue, masked[:online], keys, positive),
            dict(chunk_size=4, need_target=False),
        ),
    ):
        torch.library.opcheck(
            chunked.stream_states,
            stream_args,
            dict(dict(views=views, need_target=True), **options),
            test_utils=("test_schema", "test_faketensor"),
        )
    maxima, inverse_sums = torch.ones(len(exponents)), torch.rand(len(exponents))
    weights = torch.rand(views * n)
    for rows, target_weights, positive_weights in (
        (len(exponents), -weights, weights),
        (len(exponents), -weights, None),
        (online, None, weights),
    ):
        torch.library.opcheck(
            chunked.bank_products,
            (
                exponents[:rows],
                maxima[:rows],
                inverse_sums[:rows],
                weights,
                target_weights,
                positive_weights,
                bank,
                masked[:online],
                masked[online:rows],
            ),
            dict(chunk_size=4, views=views, offset=n),
            test_utils=("test_schema", "test_faketensor"),
        )


def test_serves_every_problem():
    query, key, queue, temperature = leaves_of("queue+keys", dtype=torch.float16)
    assert (
        chunked.unsupported_reason(build("sce", "queue+keys", query, key, queue, temperature))
        is None
    )


@pytest.fixture
def fresh_dynamo():
    """Forget earlier compilations: the steps below share their code objects across cases."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.matrix
@pytest.mark.parametrize("loss", HYPER)
def test_compiles_once_or_twice_under_a_schedule(loss, mode, fresh_dynamo):
    """fullgraph, with λ and τ floats that change every step: at most two compilations (the
    second with the floats dynamic), values and gradients those of eager."""
    query, key, queue, include_keys = make_inputs(
        mode, n=6, d=8, m=11, crops=2, dtype=torch.float32, seed=10
    )
    query.requires_grad_()
    key.requires_grad_()

    fixed = {k: v for k, v in public_hyper(loss).items() if k not in ("temperature", "coeff")}
    takes_coeff = "coeff" in KEYWORDS[loss]

    def step(query, key, temperature, coeff):  # coeff enters only the losses that take it
        scheduled = dict(temperature=temperature, coeff=coeff) if takes_coeff else {}
        scheduled.setdefault("temperature", temperature)
        return FUNCTIONS[loss](
            query, key, queue, include_keys=include_keys, backend="chunked", **scheduled, **fixed
        )

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, fullgraph=True, backend=counter)
    for i in range(10):
        args = (query, key, 0.1 + 0.01 * i, 0.6 - 0.03 * i)
        got, want = compiled(*args), step(*args)
        torch.testing.assert_close(got, want)
        for g, w in zip(
            torch.autograd.grad(got, (query, key)), torch.autograd.grad(want, (query, key))
        ):
            torch.testing.assert_close(g, w)
    assert 1 <= counter.frame_count <= 2


def test_compiles_once_with_a_learnable_temperature(mode, fresh_dynamo):
    query, key, queue, include_keys = make_inputs(
        mode, n=6, d=8, m=11, crops=2, dtype=torch.float32, seed=11
    )
    query.requires_grad_()
    temperature = torch.tensor(0.1, requires_grad=True)

    def step(query, temperature):
        return sce_loss(
            query, key, queue, temperature=temperature, include_keys=include_keys, backend="chunked"
        )

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, fullgraph=True, backend=counter)
    for _ in range(3):
        got = torch.autograd.grad(compiled(query, temperature), (query, temperature))
        want = torch.autograd.grad(step(query, temperature), (query, temperature))
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)
        assert got[1] != 0
        with torch.no_grad():
            temperature -= 0.01 * got[1].sign()  # a learning step
    assert counter.frame_count == 1


@pytest.mark.parametrize("loss", HYPER)
@pytest.mark.parametrize(
    "mode, crops", [("queue", 2), ("in-batch", None), ("queue+keys", 2), ("in-batch", 3)]
)
@pytest.mark.parametrize("row_block", [2, 3, 10])
def test_row_blocks_give_the_references_numbers(loss, mode, crops, row_block, monkeypatch):
    """Large batches stream at most ROW_BLOCK rows at a time: blocks that split a crop's N = 5
    rows and the target rows raggedly, or that hold two of three crops, change nothing."""
    monkeypatch.setattr(chunked, "ROW_BLOCK", row_block)
    query, key, queue, temperature = leaves_of(mode, crops, temperature=0.2, seed=11)
    problem = build(loss, mode, query, key, queue, temperature, ranks=2)
    leaves = (query, key, temperature)
    got = evaluate(lambda p: chunked.losses(p, chunk_size=3), problem, leaves)
    want = evaluate(reference.losses, problem, leaves)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tau_dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_a_temperature_in_another_precision_than_the_inputs(tau_dtype):
    """A learnable τ held in bfloat16 (a module cast with .to(torch.bfloat16)) or float64: 1/τ
    is taken in the compute dtype, as the reference takes it, for the values and both
    gradients."""
    query, key, queue, _ = make_inputs("queue", n=6, d=8, m=40, dtype=torch.float32, seed=3)
    results = []
    for backend in ("chunked", "reference"):
        q = query.clone().requires_grad_()
        tau = torch.tensor(0.1, dtype=tau_dtype, requires_grad=True)
        loss = sce_loss(q, key, queue, temperature=tau, backend=backend)
        results.append((loss.detach(), *torch.autograd.grad(loss, (q, tau))))
    for got, want in zip(*results):
        # float32 tolerances (the computation is float32 whatever τ's dtype); before: 1e-3 apart
        torch.testing.assert_close(got, want, rtol=1.3e-6, atol=1e-5, check_dtype=False)
