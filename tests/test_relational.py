"""CACR and ReCo: against the literal transcription, their exact relations as hypothesis properties,
gradcheck, bad input, and the library's contracts (dtypes, autocast, queue read at call time,
torch.compile, several processes)."""

import inspect
import os
import tempfile

import literal_relational as literal
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import HAS_FUSED, fused_reason, unit
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.testing import CompileCounterWithBackend

from sce_loss.functional import info_nce_loss, ressl_loss
from sce_loss.modules import CACRLoss
from sce_loss.relational import cacr_loss, interpolated_key, reco_loss

TIGHT = dict(rtol=1e-12, atol=1e-12)
GRADIENT = dict(rtol=1e-10, atol=1e-12)
CACR_HYPER = dict(
    attraction_temperature=0.7,
    repulsion_temperature=1.3,
    attraction_weight=0.8,
    repulsion_weight=1.2,
)
RECO_HYPER = dict(
    temperature=0.2,
    relation_temperature=0.1,
    target_temperature=0.04,
    global_weight=1.0,
    local_weight=1.0,
)
# (query views, key views): None is the 2-D form; "same" is a key with the query's views.
FORMS = [(None, None), (None, 2), (2, None), (2, "same"), (3, "same"), (3, 2), (2, 1), (1, "same")]

SETTINGS = settings(max_examples=40, deadline=None)


def cacr_inputs(form, with_queue, *, n=5, d=4, m=6, scale=1.0, dtype=torch.float64, seed=0):
    """(query, key, queue) of a form; unit vectors times ``scale``."""
    query_views, key_views = form
    key_views = query_views if key_views == "same" else key_views
    g = torch.Generator().manual_seed(seed)
    shape = lambda views: ((views,) if views else ()) + (n, d)  # noqa: E731
    query = scale * unit(*shape(query_views), dtype=dtype, generator=g)
    key = scale * unit(*shape(key_views), dtype=dtype, generator=g)
    queue = scale * unit(m, d, dtype=dtype, generator=g) if with_queue else None
    return query, key, queue


def reco_inputs(crops=None, mixed_like_query=False, *, n=5, d=4, m=6, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    views = (crops,) if crops else ()
    return dict(
        query=unit(*views, n, d, dtype=dtype, generator=g),
        key=unit(n, d, dtype=dtype, generator=g),
        queue=unit(m, d, dtype=dtype, generator=g),
        weak_key=unit(n, d, dtype=dtype, generator=g),
        weak_queue=unit(m + 2, d, dtype=dtype, generator=g),
        mixed_query=unit(*(views if mixed_like_query else ()), n, d, dtype=dtype, generator=g),
        mixed_key=unit(n, d, dtype=dtype, generator=g),
    )


def reco(inputs, **options):
    inputs = dict(inputs)
    return reco_loss(
        inputs.pop("query"), inputs.pop("key"), inputs.pop("queue"), **inputs, **options
    )


def cacr_cases():
    for form in FORMS:
        for with_queue in (False, True):
            for intra_batch in (True, False):
                if with_queue or intra_batch:
                    yield form, with_queue, intra_batch


# -- the literal transcription -------------------------------------------------------------------


@pytest.mark.parametrize("form, with_queue, intra_batch", list(cacr_cases()))
@pytest.mark.parametrize("scale", [1.0, 1.7])
def test_cacr_matches_the_literal_transcription(form, with_queue, intra_batch, scale):
    """Values and gradients (query, key; none into the queue), every form, unit vectors or not."""
    query, key, queue = cacr_inputs(form, with_queue, scale=scale, seed=1)
    query.requires_grad_()
    key.requires_grad_()
    queue = None if queue is None else queue.requires_grad_()
    options = dict(intra_batch=intra_batch, **CACR_HYPER)
    losses = cacr_loss(query, key, queue, reduction="none", **options)
    want, want_grad_query, want_grad_key = literal.cacr(
        query.detach(), key.detach(), None if queue is None else queue.detach(), **options
    )
    want = torch.tensor(want, dtype=torch.float64).view(query.shape[:-1])
    assert losses.shape == query.shape[:-1]
    torch.testing.assert_close(losses, want, **TIGHT)
    torch.testing.assert_close(
        cacr_loss(query, key, queue, reduction="sum", **options), want.sum(), **TIGHT
    )
    cacr_loss(query, key, queue, **options).backward()
    torch.testing.assert_close(
        query.grad, torch.tensor(want_grad_query, dtype=torch.float64), **GRADIENT
    )
    torch.testing.assert_close(
        key.grad, torch.tensor(want_grad_key, dtype=torch.float64), **GRADIENT
    )
    assert queue is None or queue.grad is None


@pytest.mark.parametrize("crops, mixed_like_query", [(None, False), (2, False), (2, True)])
def test_reco_matches_the_literal_transcription(crops, mixed_like_query):
    """Values and gradients: query, key and mixed_query get theirs; weak_key and mixed_key none."""
    inputs = reco_inputs(crops, mixed_like_query, seed=2)
    for name in ("query", "key", "weak_key", "mixed_query", "mixed_key"):
        inputs[name].requires_grad_()
    losses = reco(inputs, reduction="none", **RECO_HYPER)
    want, *want_grads = literal.reco(**{k: v.detach() for k, v in inputs.items()}, **RECO_HYPER)
    want = torch.tensor(want, dtype=torch.float64).view(inputs["query"].shape[:-1])
    assert losses.shape == inputs["query"].shape[:-1]
    torch.testing.assert_close(losses, want, **TIGHT)
    torch.testing.assert_close(reco(inputs, reduction="sum", **RECO_HYPER), want.sum(), **TIGHT)
    reco(inputs, **RECO_HYPER).backward()
    for name, grad in zip(("query", "key", "mixed_query"), want_grads, strict=True):
        torch.testing.assert_close(
            inputs[name].grad, torch.tensor(grad, dtype=torch.float64), **GRADIENT
        )
    assert inputs["weak_key"].grad is None and inputs["mixed_key"].grad is None


@pytest.mark.parametrize("ratio", [0.3, torch.tensor(0.8), torch.linspace(0, 1, 5)])
def test_interpolated_key_matches_the_literal_transcription(ratio):
    query, key, _ = cacr_inputs((None, None), False, seed=3)
    index = torch.randperm(5, generator=torch.Generator().manual_seed(3))
    number = ratio.tolist() if isinstance(ratio, torch.Tensor) else ratio
    torch.testing.assert_close(
        interpolated_key(query, key, index, ratio),
        torch.tensor(literal.interpolated_key(query, key, index, number), dtype=torch.float64),
        **TIGHT,
    )


def test_interpolated_key_has_no_gradient_unit_norm_and_ends_at_query_and_key():
    query, key, _ = cacr_inputs((None, None), False, dtype=torch.float32, seed=4)
    query.requires_grad_()
    key.requires_grad_()
    index = torch.tensor([4, 3, 0, 1, 2])
    mixed = interpolated_key(query, key, index, 0.6)
    assert not mixed.requires_grad and mixed.dtype == torch.float32
    torch.testing.assert_close(mixed.norm(dim=-1), torch.ones(5))
    torch.testing.assert_close(interpolated_key(query, key, index, 1.0), query.detach())
    torch.testing.assert_close(interpolated_key(query, key, index, 0.0), key.detach()[index])


# -- exact relations ---------------------------------------------------------------------------


@st.composite
def cacr_problems(draw, forms=FORMS):
    form = draw(st.sampled_from(forms))
    with_queue = draw(st.booleans())
    intra_batch = draw(st.booleans()) if with_queue else True
    query, key, queue = cacr_inputs(
        form,
        with_queue,
        n=draw(st.integers(2, 6)),
        d=draw(st.integers(1, 5)),
        m=draw(st.integers(1, 7)),
        scale=draw(st.sampled_from([1.0, 0.6])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )
    options = dict(
        intra_batch=intra_batch,
        attraction_temperature=draw(st.floats(0.0, 3.0)),
        repulsion_temperature=draw(st.floats(0.0, 3.0)),
        attraction_weight=draw(st.floats(0.1, 2.0)),
        repulsion_weight=draw(st.floats(0.1, 2.0)),
    )
    return query.requires_grad_(), key.requires_grad_(), queue, options


def values_and_gradients(fn, query, key, *args, ramp=True, **options):
    """Per-row losses and the gradients of their sum, weighted by a ramp over the rows (a
    non-uniform upstream gradient) unless ``ramp`` is False."""
    losses = fn(query, key, *args, reduction="none", **options)
    weights = torch.linspace(0.5, 1.5, losses.numel(), dtype=losses.dtype).view(losses.shape)
    return (
        losses,
        *torch.autograd.grad((losses * weights if ramp else losses).sum(), (query, key)),
    )


def assert_all_close(got, want, **tolerance):
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **(tolerance or TIGHT))


def positives(query, key):
    """The (P, V, N, D) positives of each query view, spelled out per form."""
    views = query if query.dim() == 3 else query.unsqueeze(0)
    keys = key if key.dim() == 3 else key.unsqueeze(0)
    if query.dim() == 3 and key.dim() == 3 and len(query) == len(key) >= 2:
        others = [[keys[u] for u in range(len(keys)) if u != v] for v in range(len(views))]
        return torch.stack([torch.stack(column) for column in zip(*others)])
    return keys.unsqueeze(1).expand(-1, len(views), -1, -1)


def negatives_mean_cost(query, queue, intra_batch):
    """mean_j ‖q − n_j‖² over the queue and the other rows, with explicit differences."""
    views = query if query.dim() == 3 else query.unsqueeze(0)
    total, count = torch.zeros(views.shape[:-1], dtype=views.dtype), 0
    if queue is not None:
        total = total + (views.unsqueeze(-2) - queue).pow(2).sum(-1).sum(-1)
        count += len(queue)
    if intra_batch:  # the diagonal (q_i − q_i)² is exactly 0
        total = total + (views.unsqueeze(-2) - views.unsqueeze(-3)).pow(2).sum(-1).sum(-1)
        count += views.shape[1] - 1
    return (total / count).view(query.shape[:-1])


@SETTINGS
@given(cacr_problems(forms=[(None, None), (2, None), (None, 1), (2, "same")]))
def test_cacr_with_one_positive_attracts_by_the_squared_distance(problem):
    query, key, queue, options = problem
    options["repulsion_weight"] = 0.0
    weight = options["attraction_weight"]

    def squared_distance(query, key, reduction):
        (positive,) = positives(query, key)
        return weight * (query - positive.view(query.shape)).pow(2).sum(-1)

    assert_all_close(
        values_and_gradients(cacr_loss, query, key, queue, **options),
        values_and_gradients(squared_distance, query, key),
    )


@SETTINGS
@given(cacr_problems())
def test_cacr_at_zero_temperatures_weighs_its_pairs_uniformly(problem):
    """τ⁺ = 0: the attraction is the mean positive cost; τ⁻ = 0: the repulsion the mean negative."""
    query, key, queue, options = problem
    options.update(attraction_temperature=0.0, repulsion_temperature=0.0)
    alpha, beta = options["attraction_weight"], options["repulsion_weight"]

    def means(query, key, reduction):
        attraction = (query - positives(query, key)).pow(2).sum(-1).mean(0).view(query.shape[:-1])
        return alpha * attraction - beta * negatives_mean_cost(query, queue, options["intra_batch"])

    assert_all_close(
        values_and_gradients(cacr_loss, query, key, queue, **options),
        values_and_gradients(means, query, key),
    )


@SETTINGS
@given(cacr_problems(), st.integers(0, 2**31 - 1))
def test_cacr_rows_are_equivariant_under_a_batch_permutation(problem, seed):
    query, key, queue, options = problem
    perm = torch.randperm(key.shape[-2], generator=torch.Generator().manual_seed(seed))
    losses, grad_query, grad_key = values_and_gradients(
        cacr_loss, query, key, queue, ramp=False, **options
    )
    permuted = [x.detach()[..., perm, :].requires_grad_() for x in (query, key)]
    assert_all_close(
        values_and_gradients(cacr_loss, *permuted, queue, ramp=False, **options),
        (losses[..., perm], grad_query[..., perm, :], grad_key[..., perm, :]),
    )


@SETTINGS
@given(cacr_problems(), st.integers(0, 2**31 - 1))
def test_cacr_rows_are_invariant_under_a_queue_permutation(problem, seed):
    query, key, queue, options = problem
    if queue is None:
        return
    perm = torch.randperm(len(queue), generator=torch.Generator().manual_seed(seed))
    assert_all_close(
        values_and_gradients(cacr_loss, query, key, queue[perm], **options),
        values_and_gradients(cacr_loss, query, key, queue, **options),
    )


@SETTINGS
@given(cacr_problems())
def test_cacr_is_linear_in_its_two_weights(problem):
    query, key, queue, options = problem
    alpha, beta = options.pop("attraction_weight"), options.pop("repulsion_weight")
    both = values_and_gradients(
        cacr_loss, query, key, queue, attraction_weight=alpha, repulsion_weight=beta, **options
    )
    pull = values_and_gradients(
        cacr_loss, query, key, queue, attraction_weight=1.0, repulsion_weight=0.0, **options
    )
    push = values_and_gradients(
        cacr_loss, query, key, queue, attraction_weight=0.0, repulsion_weight=1.0, **options
    )
    assert_all_close(both, [alpha * a + beta * b for a, b in zip(pull, push)])


@st.composite
def reco_problems(draw):
    crops = draw(st.sampled_from([None, 2]))
    inputs = reco_inputs(
        crops,
        crops is not None and draw(st.booleans()),
        n=draw(st.integers(1, 6)),
        d=draw(st.integers(1, 5)),
        m=draw(st.integers(1, 7)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )
    for name in ("query", "key", "mixed_query"):
        inputs[name].requires_grad_()
    hyper = dict(
        temperature=draw(st.floats(0.05, 1.0)),
        relation_temperature=draw(st.floats(0.05, 1.0)),
        target_temperature=draw(st.floats(0.02, 1.0)),
        global_weight=draw(st.floats(0.0, 3.0)),
        local_weight=draw(st.floats(0.0, 3.0)),
    )
    return inputs, hyper


def reco_values_and_gradients(fn, inputs):
    losses = fn(inputs)
    grads = torch.autograd.grad(
        losses.sum(),
        [inputs[k] for k in ("query", "key", "mixed_query")],
        allow_unused=True,
        materialize_grads=True,
    )
    return (losses, *grads)


@SETTINGS
@given(reco_problems())
def test_reco_without_its_two_extra_terms_is_infonce(problem):
    inputs, hyper = problem
    hyper.update(global_weight=0.0, local_weight=0.0)
    got = reco_values_and_gradients(lambda x: reco(x, reduction="none", **hyper), inputs)
    want = reco_values_and_gradients(
        lambda x: (
            info_nce_loss(
                x["query"], x["key"], x["queue"], temperature=hyper["temperature"], reduction="none"
            )
            + 0 * x["mixed_query"].sum()
        ),
        inputs,
    )
    assert_all_close(got, want)


@SETTINGS
@given(reco_problems())
def test_reco_is_infonce_plus_ressl_plus_infonce_of_the_mixed_images(problem):
    """Each term is the library's own loss, values and gradients."""
    inputs, hyper = problem

    def composed(x):
        instance = info_nce_loss(
            x["query"], x["key"], x["queue"], temperature=hyper["temperature"], reduction="none"
        )
        relation = ressl_loss(
            x["query"],
            x["weak_key"],
            x["weak_queue"],
            temperature=hyper["relation_temperature"],
            target_temperature=hyper["target_temperature"],
            reduction="none",
        )
        local = info_nce_loss(
            x["mixed_query"],
            x["mixed_key"],
            x["queue"],
            temperature=hyper["temperature"],
            reduction="none",
        )
        return instance + hyper["global_weight"] * relation + hyper["local_weight"] * local

    got = reco_values_and_gradients(lambda x: reco(x, reduction="none", **hyper), inputs)
    assert_all_close(got, reco_values_and_gradients(composed, inputs))


# -- gradcheck ---------------------------------------------------------------------------------


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("with_queue", [False, True])
def test_cacr_gradcheck_with_uniform_weights(form, with_queue):
    """At τ⁺ = τ⁻ = 0 the weights are uniform whatever the inputs, so finite differences see
    exactly the stop-gradient loss: query, key (both ends of intra-batch pairs) and α, β."""
    query, key, queue = cacr_inputs(form, with_queue, n=4, d=3, m=3, scale=1.3, seed=5)
    alpha = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    beta = torch.tensor(1.1, dtype=torch.float64, requires_grad=True)

    def loss(query, key, alpha, beta):
        return cacr_loss(
            query,
            key,
            queue,
            attraction_temperature=0.0,
            repulsion_temperature=0.0,
            attraction_weight=alpha,
            repulsion_weight=beta,
            reduction="none",
        )

    arguments = (query.requires_grad_(), key.requires_grad_(), alpha, beta)
    assert torch.autograd.gradcheck(loss, arguments)


@pytest.mark.parametrize("with_queue", [False, True])
def test_cacr_gradcheck_with_one_positive_and_one_negative(with_queue):
    """One positive and one negative per row: weights 1 whatever τ⁺, τ⁻ (the negative is the
    queue's only entry, or the batch's other row, differentiated at both ends)."""
    query, key, queue = cacr_inputs(
        (None, None), with_queue, n=3 if with_queue else 2, d=3, m=1, seed=6
    )

    def loss(query, key):
        return cacr_loss(
            query, key, queue, intra_batch=not with_queue, reduction="none", **CACR_HYPER
        )

    assert torch.autograd.gradcheck(loss, (query.requires_grad_(), key.requires_grad_()))


def test_cacr_temperatures_get_no_gradient_and_its_weights_do():
    query, key, queue = cacr_inputs((2, "same"), True, seed=7)
    hyper = {
        name: torch.tensor(value, dtype=torch.float64, requires_grad=True)
        for name, value in CACR_HYPER.items()
    }
    cacr_loss(query.requires_grad_(), key, queue, **hyper).backward()
    assert hyper["attraction_temperature"].grad is None
    assert hyper["repulsion_temperature"].grad is None
    assert hyper["attraction_weight"].grad != 0 and hyper["repulsion_weight"].grad != 0


@pytest.mark.parametrize("crops", [None, 2])
def test_reco_gradcheck_with_learnable_temperatures(crops):
    """Through query, key, mixed_query, τ and τ_s (weak_key and mixed_key shape constants)."""
    inputs = reco_inputs(crops, n=3, d=3, m=4, seed=8)
    temperature = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    relation_temperature = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)

    def loss(query, key, mixed_query, temperature, relation_temperature):
        return reco(
            inputs | dict(query=query, key=key, mixed_query=mixed_query),
            temperature=temperature,
            relation_temperature=relation_temperature,
            target_temperature=0.07,
            reduction="none",
        )

    arguments = [inputs[k].requires_grad_() for k in ("query", "key", "mixed_query")]
    assert torch.autograd.gradcheck(loss, (*arguments, temperature, relation_temperature))


# -- bad input -----------------------------------------------------------------------------------

q, k, Q = (unit(*shape, dtype=torch.float32) for shape in ((4, 8), (4, 8), (6, 8)))
nan, inf = q.clone(), Q.clone()
nan[1, 2], inf[0, 0] = float("nan"), float("inf")

CACR_BAD = [
    (dict(query=q.numpy()), TypeError, "query must be a torch.Tensor"),
    (dict(key=[1.0]), TypeError, "key must be a torch.Tensor, got list"),
    (dict(queue="queue"), TypeError, "queue must be a torch.Tensor, got str"),
    (dict(query=q.long()), TypeError, "query must be float64, float32, bfloat16 or float16"),
    (dict(query=q[0]), ValueError, r"query must be \(N, D\) or \(V, N, D\), got shape \(8,\)"),
    (dict(query=q[None, None]), ValueError, r"query must be \(N, D\) or \(V, N, D\)"),
    (dict(query=q[:0], key=k[:0]), ValueError, "query must be non-empty"),
    (
        dict(key=k[0]),
        ValueError,
        r"key must be \(N, D\) or \(U, N, D\), got shape \(8,\) \(query: N=4, D=8\)",
    ),
    (dict(key=k[:3]), ValueError, r"key must be .* got shape \(3, 8\)"),
    (dict(key=k[:, :7]), ValueError, r"key must be .* got shape \(4, 7\)"),
    (dict(key=k[None, :3]), ValueError, r"key must be .* got shape \(1, 3, 8\)"),
    (dict(key=k[None][:0]), ValueError, r"key must be .* got shape \(0, 4, 8\)"),
    (
        dict(queue=Q[:, :7]),
        ValueError,
        r"queue must be \(M, D\), got shape \(6, 7\) \(query: N=4, D=8\)",
    ),
    (
        dict(key=k.double()),
        TypeError,
        "key must have query's dtype torch.float32, got torch.float64",
    ),
    (dict(query=nan), ValueError, "query must be finite"),
    (dict(key=nan), ValueError, "key must be finite"),
    (dict(queue=inf), ValueError, "queue must be finite"),
    (dict(queue=None, intra_batch=False), ValueError, "at least one negative"),
    (dict(queue=Q[:0], intra_batch=False), ValueError, "at least one negative"),
    (dict(query=q[:1], key=k[:1], queue=None), ValueError, "at least one negative.* 1 row"),
    (
        dict(attraction_temperature=-1),
        ValueError,
        "attraction_temperature must be a finite number ≥ 0, got -1.0",
    ),
    (dict(attraction_temperature=float("inf")), ValueError, "attraction_temperature must be"),
    (dict(repulsion_temperature=float("nan")), ValueError, "repulsion_temperature must be"),
    (dict(repulsion_temperature=torch.tensor(-0.5)), ValueError, "repulsion_temperature must be"),
    (dict(attraction_weight=-0.1), ValueError, "attraction_weight must be a finite number ≥ 0"),
    (dict(repulsion_weight=torch.tensor(-1.0)), ValueError, "repulsion_weight must be"),
    (
        dict(attraction_weight="1"),
        TypeError,
        "attraction_weight must be a float or a 0-d float tensor, got str",
    ),
    (dict(repulsion_weight=torch.tensor([1.0])), TypeError, "repulsion_weight must be a float"),
    (dict(attraction_temperature=True), TypeError, "attraction_temperature must be a float"),
    (dict(intra_batch=1), TypeError, "intra_batch must be a bool, got int"),
    (dict(normalize="yes"), TypeError, "normalize must be a bool, got str"),
    (dict(reduction="avg"), ValueError, "reduction must be one of .* got 'avg'"),
    (dict(gather="yes"), TypeError, "gather must be a bool or a torch.distributed.ProcessGroup"),
    (
        dict(backend="fused"),
        ValueError,
        r"backend must be one of \('auto', 'reference'\) for "
        "cacr_loss",
    ),
    (dict(queue=Q.to("meta")), ValueError, "queue must be on query's device"),
]


@pytest.mark.parametrize("overrides, error, message", CACR_BAD)
def test_cacr_bad_input_raises_a_clear_error(overrides, error, message):
    arguments = dict(query=q, key=k, queue=Q) | overrides
    with pytest.raises(error, match=message):
        cacr_loss(arguments.pop("query"), arguments.pop("key"), arguments.pop("queue"), **arguments)


def reco_arguments(**overrides):
    return (
        dict(
            query=q,
            key=k,
            queue=Q,
            weak_key=k.flip(0),
            weak_queue=Q[:5],
            mixed_query=q.flip(0),
            mixed_key=k.roll(1, 0),
        )
        | overrides
    )


RECO_BAD = [
    (dict(query=q[0]), ValueError, r"query must be \(N, D\) or \(V, N, D\)"),
    (dict(query=q.half()), TypeError, "key must have query's dtype torch.float16"),
    (dict(key=k[:3]), ValueError, r"key must be \(N, D\), got shape \(3, 8\)"),
    (dict(key=k[None]), ValueError, r"key must be \(N, D\)"),
    (dict(queue=None), TypeError, "queue must be a torch.Tensor, got NoneType"),
    (dict(queue=Q[:0]), ValueError, r"queue must be \(M, D\) with M ≥ 1"),
    (dict(weak_key=k[:, :7]), ValueError, r"weak_key must be \(N, D\)"),
    (dict(weak_key=k.double()), TypeError, "weak_key must have query's dtype"),
    (dict(weak_key=None), TypeError, "weak_key must be a torch.Tensor"),
    (dict(weak_queue=Q[:, :7]), ValueError, r"weak_queue must be \(M, D\) with M ≥ 1"),
    (dict(weak_queue=Q[:0]), ValueError, r"weak_queue must be \(M, D\) with M ≥ 1"),
    (
        dict(mixed_query=q[None].expand(3, -1, -1)),
        ValueError,
        r"mixed_query must be \(N, D\) or the query's shape",
    ),
    (
        dict(query=q[None].expand(2, -1, -1), mixed_query=q[None].expand(3, -1, -1)),
        ValueError,
        r"mixed_query must be \(N, D\) or the query's shape \(2, 4, 8\).* got shape \(3, 4, 8\)",
    ),
    (dict(mixed_query=q[:3]), ValueError, "mixed_query must be"),
    (dict(mixed_key=k[:, :7]), ValueError, r"mixed_key must be \(N, D\)"),
    (dict(mixed_key=k.double()), TypeError, "mixed_key must have query's dtype"),
    (dict(weak_key=nan), ValueError, "weak_key must be finite"),
    (dict(weak_queue=inf), ValueError, "weak_queue must be finite"),
    (dict(mixed_query=nan), ValueError, "mixed_query must be finite"),
    (dict(mixed_key=nan), ValueError, "mixed_key must be finite"),
    (dict(queue=inf), ValueError, "queue must be finite"),
    (dict(temperature=0.0), ValueError, "temperature must be a finite number ≥"),
    (dict(relation_temperature=-1.0), ValueError, "relation_temperature must be a finite number"),
    (dict(target_temperature=float("nan")), ValueError, "target_temperature must be a finite"),
    (dict(relation_temperature="0.1"), TypeError, "relation_temperature must be a float"),
    (dict(global_weight=-1.0), ValueError, "global_weight must be a finite number ≥ 0, got -1.0"),
    (dict(local_weight=torch.tensor(-2.0)), ValueError, "local_weight must be a finite number"),
    (dict(local_weight="2"), TypeError, "local_weight must be a float or a 0-d float tensor"),
    (dict(normalize=1), TypeError, "normalize must be a bool, got int"),
    (dict(reduction="avg"), ValueError, "reduction must be one of .* got 'avg'"),
    (dict(backend="triton"), ValueError, "backend must be one of .* got 'triton'"),
    (dict(gather="yes"), TypeError, "gather must be a bool or a torch.distributed.ProcessGroup"),
]


@pytest.mark.parametrize("overrides, error, message", RECO_BAD)
def test_reco_bad_input_raises_a_clear_error(overrides, error, message):
    with pytest.raises(error, match=message):
        reco(reco_arguments(**overrides))


INDEX = torch.tensor([1, 2, 3, 0])
INTERPOLATION_BAD = [
    (dict(query=q[None]), ValueError, r"query must be \(N, D\), got shape \(1, 4, 8\)"),
    (
        dict(key=k[:, :7]),
        ValueError,
        r"key must be \(B, D\), got shape \(4, 7\) \(query: N=4, D=8\)",
    ),
    (dict(key=k[:0]), ValueError, r"key must be \(B, D\)"),
    (dict(key=k.double()), TypeError, "key must have query's dtype"),
    (dict(key=nan), ValueError, "key must be finite"),
    (dict(index=[1, 2, 3, 0]), TypeError, "index must be an int64 or int32 tensor, got list"),
    (
        dict(index=INDEX.float()),
        TypeError,
        "index must be an int64 or int32 tensor, got a torch.float32 tensor",
    ),
    (dict(index=INDEX[:3]), ValueError, r"index must be \(4,\) on query's device"),
    (
        dict(index=torch.tensor([1, 2, 3, 4])),
        ValueError,
        r"index must hold rows of key, in \[0, 4\)",
    ),
    (dict(index=torch.tensor([1, -1, 3, 0])), ValueError, "index must hold rows of key"),
    (dict(ratio=1.5), ValueError, r"ratio must be a finite number in \[0, 1\], got 1.5"),
    (dict(ratio=-0.1), ValueError, r"ratio must be a finite number in \[0, 1\]"),
    (dict(ratio=float("nan")), ValueError, "ratio must be a finite number"),
    (dict(ratio="0.5"), TypeError, "ratio must be a float or a 0-d float tensor, got str"),
    (dict(ratio=True), TypeError, "ratio must be a float or a 0-d float tensor, got bool"),
    (dict(ratio=[0.5]), TypeError, "ratio must be a float or a 0-d float tensor, got list"),
    (
        dict(ratio=torch.ones(3)),
        TypeError,
        r"ratio must be a float, a 0-d float tensor or a \(4,\)",
    ),
    (dict(ratio=torch.full((4,), 1.2)), ValueError, r"ratio must hold numbers in \[0, 1\]"),
]


@pytest.mark.parametrize("overrides, error, message", INTERPOLATION_BAD)
def test_interpolated_key_bad_input_raises_a_clear_error(overrides, error, message):
    arguments = dict(query=q, key=k, index=INDEX, ratio=0.5) | overrides
    with pytest.raises(error, match=message):
        interpolated_key(**arguments)


@pytest.mark.parametrize("normalize", [False, True])
def test_inputs_are_unchanged_bit_for_bit(normalize):
    query, key, queue = (2.5 * x for x in cacr_inputs((2, "same"), True, dtype=torch.float32))
    inputs = {name: 2.5 * x for name, x in reco_inputs(2, dtype=torch.float32).items()}
    tensors = [query, key, queue, *inputs.values()]
    for x in tensors:
        x.requires_grad_()
    before = [x.detach().clone() for x in tensors]
    cacr_loss(query, key, queue, normalize=normalize).backward()
    reco(inputs, normalize=normalize).backward()
    interpolated_key(query[0], key[0], torch.arange(5).flip(0), 0.4)
    for x, was in zip(tensors, before, strict=True):
        assert torch.equal(x.detach(), was)


# -- the library's contracts -------------------------------------------------------------------


def test_defaults_are_the_documented_values():
    """CACR: the formula's neutral values (all 1; docs/relational.md gives each official
    source's); ReCo: main_reco.py's."""
    cacr = inspect.signature(cacr_loss).parameters
    assert [cacr[name].default for name in CACR_HYPER] == [1.0, 1.0, 1.0, 1.0]
    assert cacr["intra_batch"].default is True
    reco_parameters = inspect.signature(reco_loss).parameters
    assert {name: reco_parameters[name].default for name in RECO_HYPER} == RECO_HYPER
    # zhangyifei01/ReCo main_reco.py: --lambda2 default 1.0 ("default: 1.")
    assert reco_parameters["local_weight"].default == 1.0


def test_normalize_equals_normalising_first():
    query, key, queue = (3 * x for x in cacr_inputs((2, None), True, seed=9))
    unit_vectors = [torch.nn.functional.normalize(x, dim=-1) for x in (query, key, queue)]
    torch.testing.assert_close(
        cacr_loss(query, key, queue, normalize=True), cacr_loss(*unit_vectors), **TIGHT
    )
    inputs = {name: 3 * x for name, x in reco_inputs(seed=9).items()}
    normalised = {name: torch.nn.functional.normalize(x, dim=-1) for name, x in inputs.items()}
    torch.testing.assert_close(reco(inputs, normalize=True), reco(normalised), **TIGHT)


def test_tensor_hyper_parameters_equal_floats():
    query, key, queue = cacr_inputs((2, 3), True, dtype=torch.float32, seed=10)
    as_tensors = {name: torch.tensor(value) for name, value in CACR_HYPER.items()}
    assert torch.equal(
        cacr_loss(query, key, queue, **as_tensors), cacr_loss(query, key, queue, **CACR_HYPER)
    )
    inputs = reco_inputs(dtype=torch.float32, seed=10)
    assert torch.equal(
        reco(inputs, **{n: torch.tensor(v) for n, v in RECO_HYPER.items()}),
        reco(inputs, **RECO_HYPER),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_computes_in_float32_close_to_float64(dtype):
    exact_inputs = cacr_inputs((2, "same"), True, seed=11)
    query, key, queue = (x.to(dtype).requires_grad_() for x in exact_inputs)
    loss = cacr_loss(query, key, queue)
    loss.backward()
    assert loss.dtype == torch.float32 and query.grad.dtype == dtype
    tolerance = 1e-6 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(
        loss.double(),
        cacr_loss(*(x.detach().double() for x in (query, key, queue))),
        rtol=tolerance,
        atol=tolerance,
    )
    inputs = {name: x.to(dtype) for name, x in reco_inputs(seed=11).items()}
    assert reco(inputs).dtype == torch.float32
    assert cacr_loss(*exact_inputs).dtype == torch.float64


def test_autocast_changes_nothing():
    query, key, queue = cacr_inputs((2, "same"), True, dtype=torch.float32, seed=12)
    inputs = reco_inputs(2, dtype=torch.float32, seed=12)
    want = cacr_loss(query, key, queue), reco(inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = cacr_loss(query, key, queue), reco(inputs)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_the_queues_are_read_when_the_loss_is_called():
    """Enqueueing in place between the loss and its backward (as MoCo's forward does) changes
    neither the gradients nor fails."""
    query, key, queue = cacr_inputs((2, "same"), True, seed=13)
    inputs = reco_inputs(2, seed=13)

    def gradients(update_in_place):
        q = query.clone().requires_grad_()
        x = dict(
            inputs,
            query=inputs["query"].clone().requires_grad_(),
            queue=inputs["queue"].clone(),
            weak_queue=inputs["weak_queue"].clone(),
        )
        own_queue = queue.clone()
        loss = cacr_loss(q, key, own_queue) + reco(x)
        if update_in_place:
            for bank in (own_queue, x["queue"], x["weak_queue"]):
                bank.mul_(-1)
        loss.backward()
        return q.grad, x["query"].grad

    assert_all_close(gradients(True), gradients(False), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["chunked", "fused"])
def test_reco_runs_on_every_backend_of_its_terms(backend):
    if backend == "fused" and not HAS_FUSED:
        pytest.skip(f"the fused backend: {fused_reason()}")
    inputs = reco_inputs(2, dtype=torch.float32, seed=15)
    for name in ("query", "key", "mixed_query"):
        inputs[name].requires_grad_()
    got = reco_values_and_gradients(lambda x: reco(x, reduction="none", backend=backend), inputs)
    want = reco_values_and_gradients(
        lambda x: reco(x, reduction="none", backend="reference"), inputs
    )
    assert_all_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["cacr", "reco"])
def test_a_float_schedule_compiles_fullgraph_at_most_twice(name):
    """Hyper-parameters that change every step as Python floats: the first compile specialises
    them, the second makes them dynamic, and no later step recompiles."""
    query, key, queue = cacr_inputs((2, "same"), True, dtype=torch.float32, seed=16)
    inputs = reco_inputs(2, dtype=torch.float32, seed=16)
    query.requires_grad_()
    inputs["query"].requires_grad_()

    def step(**hyper):
        if name == "cacr":
            return cacr_loss(query, key, queue, **hyper), query
        return reco(inputs, **hyper), inputs["query"]

    def loss_and_gradient(fn, **hyper):
        loss, leaf = fn(**hyper)
        return loss, *torch.autograd.grad(loss, leaf)

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    for i in range(6):
        hyper = {
            n: v * (1 + 0.05 * i) for n, v in (CACR_HYPER if name == "cacr" else RECO_HYPER).items()
        }
        assert_all_close(
            loss_and_gradient(compiled, **hyper),
            loss_and_gradient(step, **hyper),
            rtol=1e-6,
            atol=1e-7,
        )
    assert counter.frame_count <= 2, counter.frame_count


def test_gather_without_a_process_group_is_one_process():
    query, key, queue = cacr_inputs((2, None), True, seed=17)
    assert not dist.is_initialized()
    assert torch.equal(cacr_loss(query, key, queue, gather=True), cacr_loss(query, key, queue))


# -- several processes -------------------------------------------------------------------------

N_PER_RANK = 3
GATHER_CASES = [
    (form, with_queue)
    for form in [(None, None), (2, "same"), (3, 2)]
    for with_queue in (False, True)
]


def _gather_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        rows = slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK)
        results = {}
        for form, with_queue in GATHER_CASES:
            query, key, queue = cacr_inputs(form, with_queue, n=N_PER_RANK * world, seed=world)
            query, key = query[..., rows, :].requires_grad_(), key[..., rows, :].requires_grad_()
            loss = cacr_loss(query, key, queue, gather=True, **CACR_HYPER)
            loss.backward()
            results[form, with_queue] = loss.detach(), query.grad, key.grad
        inputs = reco_inputs(2, n=N_PER_RANK * world, seed=world)
        inputs = {name: x[..., rows, :] if "queue" not in name else x for name, x in inputs.items()}
        results["reco"] = reco(inputs, gather=True, reduction="none")
        torch.save(results, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks():
    world = 2
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_gather_worker, args=(world, os.path.join(out_dir, "init"), out_dir), nprocs=world)
        yield world, [torch.load(os.path.join(out_dir, f"{r}.pt")) for r in range(world)]


@pytest.mark.parametrize("form, with_queue", GATHER_CASES)
def test_cacr_ranks_match_one_process_on_the_concatenated_batch(two_ranks, form, with_queue):
    """Every rank's queries are intra-batch negatives: mean_r L_r = L, and each rank's gradients
    are W × the one-process gradients of its rows (DDP's averaging divides W out)."""
    world, results = two_ranks
    query, key, queue = cacr_inputs(form, with_queue, n=N_PER_RANK * world, seed=world)
    query.requires_grad_()
    key.requires_grad_()
    loss = cacr_loss(query, key, queue, **CACR_HYPER)
    loss.backward()
    per_rank = [r[form, with_queue] for r in results]
    torch.testing.assert_close(torch.stack([r[0] for r in per_rank]).mean(), loss.detach(), **TIGHT)
    for rank, (_, grad_query, grad_key) in enumerate(per_rank):
        rows = slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK)
        torch.testing.assert_close(grad_query, world * query.grad[..., rows, :], **GRADIENT)
        torch.testing.assert_close(grad_key, world * key.grad[..., rows, :], **GRADIENT)


def test_reco_ranks_compute_their_own_rows(two_ranks):
    world, results = two_ranks
    want = reco(reco_inputs(2, n=N_PER_RANK * world, seed=world), reduction="none")
    torch.testing.assert_close(torch.cat([r["reco"] for r in results], -1), want, **TIGHT)


# -- CACR's one-encoder form against the official small-scale code ------------------------------


def official_attraction(latent_codes_list, alpha, tau_pos):
    """JegZheng/CACR-SSL small_scale_experiments/losses our_loss1 (choice='full'), transcribed."""
    loss1 = 0.0
    for x in range(len(latent_codes_list)):
        z_x = latent_codes_list[x]
        mask = list(range(len(latent_codes_list)))
        mask.pop(x)
        masked_z_x = torch.stack(latent_codes_list, dim=0)[mask]
        cost = (z_x - masked_z_x).norm(p=2, dim=-1).pow(2).transpose(1, 0).mul(alpha)
        dist = cost.mul(tau_pos / alpha)
        weights = torch.softmax(dist, dim=1)
        loss1 += (cost * weights).sum(1).mean()
    return loss1 / len(latent_codes_list)


def official_repulsion(latent_codes_list, beta, tau_neg):
    """our_loss2 with forward_negative_loss (Euclidean cost, choice='full', not debiased)."""
    loss2, counter = 0.0, 0
    for x in range(len(latent_codes_list)):
        for y in range(x + 1, len(latent_codes_list)):
            z_x, z_y = latent_codes_list[x], latent_codes_list[y]
            cost = torch.norm(z_x[:, None] - z_y, dim=-1).pow(2).mul(-beta)
            off_diagonal = ~torch.eye(cost.shape[0], dtype=torch.bool)
            cost = cost.masked_select(off_diagonal).view(cost.shape[0], cost.shape[0] - 1)
            weights = torch.softmax(cost.mul(tau_neg / beta), dim=1)
            loss2 += (cost * weights).sum(1).mean()
            counter += 1
    return loss2 / counter


ONE_ENCODER_HYPER = dict(
    attraction_temperature=0.7,
    repulsion_temperature=0.9,
    attraction_weight=1.3,
    repulsion_weight=0.8,
)


@pytest.mark.parametrize("views", [2, 3, 5])
@pytest.mark.parametrize("weight_gradients", [True, False])
def test_cacr_one_encoder_form_equals_the_official_code(views, weight_gradients):
    """Values always; gradients too with weight_gradients=True (the official weights carry
    gradient)."""
    latent = unit(views, 6, 4, generator=torch.Generator().manual_seed(views)).requires_grad_()
    h = ONE_ENCODER_HYPER
    ours = cacr_loss(latent, weight_gradients=weight_gradients, **h)
    theirs = official_attraction(
        list(latent.unbind(0)), h["attraction_weight"], h["attraction_temperature"]
    ) + official_repulsion(
        list(latent.unbind(0)), h["repulsion_weight"], h["repulsion_temperature"]
    )
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    (got,) = torch.autograd.grad(ours, latent)
    (want,) = torch.autograd.grad(theirs, latent)
    if weight_gradients:
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    else:
        assert not torch.allclose(got, want, rtol=1e-6, atol=1e-9)


def test_cacr_one_encoder_rows_average_to_the_loss_and_its_module_agrees():
    latent = unit(3, 5, 4, generator=torch.Generator().manual_seed(9))
    rows = cacr_loss(latent, reduction="none", **ONE_ENCODER_HYPER)
    assert rows.shape == (5,)
    torch.testing.assert_close(rows.mean(), cacr_loss(latent, **ONE_ENCODER_HYPER))
    torch.testing.assert_close(CACRLoss(**ONE_ENCODER_HYPER)(latent), rows.mean())


def test_cacr_weight_gradients_in_the_queue_form_flow_through_intra_batch_distances_only():
    """The official queue code: w⁻ over [queue (detached), intra-batch (live)] distances."""
    query, key, queue = cacr_inputs((None, None), True, seed=10)
    query.requires_grad_()
    h = ONE_ENCODER_HYPER
    ours = cacr_loss(query, key, queue, weight_gradients=True, **h)
    q = query
    sq_queue = (q[:, None] - queue).pow(2).sum(-1)
    intra = torch.norm(q[:, None] - q, dim=-1).pow(2)
    off_diagonal = ~torch.eye(len(q), dtype=torch.bool)
    intra = intra.masked_select(off_diagonal).view(len(q), len(q) - 1)
    cost = torch.cat([sq_queue, intra], 1)
    weights = torch.softmax(
        torch.cat([sq_queue.detach(), intra], 1).mul(-h["repulsion_temperature"]), 1
    )
    repulsion = (cost.mul(-1.0) * weights).sum(1).mean().mul(h["repulsion_weight"])
    pos = (q - key).pow(2).sum(-1)
    theirs = h["attraction_weight"] * pos.mean() + repulsion
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    (got,) = torch.autograd.grad(ours, query)
    (want,) = torch.autograd.grad(theirs, query)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda z: cacr_loss(z[0]), r"\(V, N, D\)"),
        (lambda z: cacr_loss(z[:1]), "V ≥ 2"),
        (lambda z: cacr_loss(z, queue=z[0]), "no queue"),
        (lambda z: cacr_loss(z, intra_batch=False), "intra_batch=True"),
        (lambda z: cacr_loss(z, weight_gradients=1), "weight_gradients must be a bool"),
    ],
)
def test_cacr_one_encoder_bad_calls_are_refused(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call(unit(2, 4, 3))


def test_cacr_one_encoder_needs_two_samples():
    with pytest.raises(ValueError, match="at least one negative"):
        cacr_loss(unit(2, 1, 3))
