"""The drop-in contract of real training loops: torch.compile with schedules and a learnable τ,
autocast, the queue read when the loss is called, and modules that behave like PyTorch's.

Every backend is exercised: the fused kernels through Triton's interpreter when there is no GPU.
Compiled steps use the ``aot_eager`` backend, which traces the forward and backward graphs as
inductor would, without generating code.
"""

import inspect

import numpy as np
import pytest
import torch
from conftest import HAS_FUSED, make_inputs
from torch._dynamo.testing import CompileCounterWithBackend

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
from sce_loss.problem import DEFAULT_HYPER_PARAMETERS, TORCH_VERSION

BACKENDS = ["reference", "chunked"] + (["fused"] if HAS_FUSED else [])
LOSSES = {
    "infonce": (info_nce_loss, dict(temperature=0.2)),
    "ressl": (ressl_loss, dict(temperature=0.1, target_temperature=0.04)),
    "sce": (sce_loss, dict(coeff=0.4, temperature=0.1, target_temperature=0.05)),
}


def inputs(mode, dtype=torch.float32, seed=0):
    return make_inputs(mode, n=6, d=8, m=20, dtype=dtype, seed=seed)


def loss_and_grads(fn, query, key, queue, **options):
    query, key = query.detach().requires_grad_(), key.detach().requires_grad_()
    loss = fn(query, key, queue, **options)
    loss.backward()
    return loss.detach(), query.grad, key.grad


def assert_all_close(got, want, rtol, atol=0.0):
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol)


@pytest.mark.matrix
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", LOSSES)
def test_a_float_schedule_compiles_fullgraph_at_most_twice(backend, name, mode):
    """λ and τ (and τ_m) change every step, as Python floats: the first compile specialises them,
    the second makes them dynamic, and no later step recompiles."""
    fn, hyper = LOSSES[name]
    query, key, queue, include_keys = inputs(mode)

    def step(query, key, queue, **scheduled):
        return fn(query, key, queue, include_keys=include_keys, backend=backend, **scheduled)

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    for i in range(10):
        scheduled = {name: value * (1 + 0.05 * i) for name, value in hyper.items()}
        got = loss_and_grads(compiled, query, key, queue, **scheduled)
        want = loss_and_grads(step, query, key, queue, **scheduled)
        assert_all_close(got, want, rtol=1e-6, atol=1e-7)
    assert counter.frame_count <= 2, counter.frame_count


@pytest.mark.matrix
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", LOSSES)
def test_a_learnable_temperature_compiles_once_and_gets_its_gradient(backend, name):
    fn, hyper = LOSSES[name]
    query, key, queue, _ = inputs("queue")
    temperature = torch.nn.Parameter(torch.tensor(hyper["temperature"]))
    optimizer = torch.optim.SGD([temperature], lr=1e-3)

    def step(query, key, queue, temperature):
        return fn(query, key, queue, backend=backend, **{**hyper, "temperature": temperature})

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    for _ in range(4):
        eager = step(query, key, queue, temperature)
        (want,) = torch.autograd.grad(eager, temperature)
        optimizer.zero_grad()
        loss = compiled(query, key, queue, temperature)
        loss.backward()
        torch.testing.assert_close(loss, eager, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(temperature.grad, want, rtol=1e-5, atol=1e-6)
        assert temperature.grad.abs() > 0
        optimizer.step()
    assert counter.frame_count == 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", LOSSES)
def test_autocast_changes_no_number(backend, name, mode):
    """Under torch.autocast (Lightning's bf16-mixed) the losses compute as outside it."""
    fn, hyper = LOSSES[name]
    query, key, queue, include_keys = inputs(mode, seed=1)
    options = {**hyper, "include_keys": include_keys, "backend": backend}
    want = loss_and_grads(fn, query, key, queue, **options)
    query, key = query.detach().requires_grad_(), key.detach().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fn(query, key, queue, **options)
    loss.backward()  # outside autocast, as PyTorch recommends (and Lightning does)
    assert loss.dtype == torch.float32
    assert_all_close((loss.detach(), query.grad, key.grad), want, rtol=1e-6, atol=1e-7)


QUEUE_DTYPES = {
    "reference": [torch.float64, torch.float32, torch.bfloat16],
    "chunked": [torch.float64, torch.float32, torch.bfloat16],
    "fused": [torch.float32, torch.bfloat16],
}


@pytest.mark.parametrize(
    "backend, queue_dtype",
    [(backend, dtype) for backend in BACKENDS for dtype in QUEUE_DTYPES[backend]],
)
@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("mode", ["queue", "queue+keys"])
def test_updating_the_queue_before_the_backward_changes_nothing(backend, queue_dtype, name, mode):
    """The official MoCo code enqueues inside ``forward``, between the loss and its backward."""
    fn, hyper = LOSSES[name]
    dtype = torch.float64 if queue_dtype == torch.float64 else torch.float32
    query, key, queue, include_keys = inputs(mode, dtype=dtype, seed=2)
    options = {**hyper, "include_keys": include_keys, "backend": backend}
    stored = MemoryQueue(queue.shape[0], queue.shape[1], dtype=queue_dtype)
    stored.keys.copy_(queue)
    untouched = stored.keys.clone()
    want = loss_and_grads(fn, query, key, untouched, **options)

    query, key = query.detach().requires_grad_(), key.detach().requires_grad_()
    loss = fn(query, key, stored.keys, **options)
    stored.push(-key.detach())  # in place, before the backward
    loss.backward()
    assert not torch.equal(stored.keys, untouched)
    assert_all_close((loss.detach(), query.grad, key.grad), want, rtol=0, atol=0)


def test_a_transposed_queue_buffer_updated_in_place_before_the_backward():
    """The official MoCo builder's (D, K) buffer, passed as ``queue.T``, updated by slice."""
    query, key, queue, _ = inputs("queue", dtype=torch.float64, seed=3)
    buffer = queue.T.contiguous()
    want = loss_and_grads(sce_loss, query, key, buffer.T.clone())
    query, key = query.detach().requires_grad_(), key.detach().requires_grad_()
    loss = sce_loss(query, key, buffer.T)
    buffer[:, : key.shape[0]] = key.detach().T
    loss.backward()
    assert_all_close((loss.detach(), query.grad, key.grad), want, rtol=0, atol=0)


MODULES = [(SCELoss, sce_loss), (InfoNCELoss, info_nce_loss), (ReSSLLoss, ressl_loss)]
RELATIONAL_MODULES = [(CACRLoss, cacr_loss), (ReCoLoss, reco_loss)]


# Per-call tensors: keywords of the module's call, not its attributes.
CALL_DATA = ("labels", "queue_labels")


@pytest.mark.parametrize("module, fn", MODULES + RELATIONAL_MODULES)
def test_module_keywords_are_the_functions_keywords(module, fn):
    """A module takes its function's keyword arguments with defaults, with the same defaults,
    keywords only, plus its queues (ReCo's inputs, keyword-only without defaults, stay calls')."""
    function = {
        name: p.default
        for name, p in inspect.signature(fn).parameters.items()
        if p.kind == p.KEYWORD_ONLY and p.default is not p.empty and name not in CALL_DATA
    }
    parameters = inspect.signature(module).parameters
    init = {name: p.default for name, p in parameters.items() if "queue" not in name}
    assert init == function
    assert all(p.kind == p.KEYWORD_ONLY for p in parameters.values())


@pytest.mark.parametrize(
    "name, fn", [("info_nce", info_nce_loss), ("ressl", ressl_loss), ("sce", sce_loss)]
)
def test_the_library_defaults_are_the_functions_defaults(name, fn):
    """The hyper-parameters the library's own problems use (first-use check, sce-loss-check) are
    the functions' defaults; ReSSL is λ = 0."""
    defaults = {
        p.name: p.default
        for p in inspect.signature(fn).parameters.values()
        if p.name in ("coeff", "temperature", "target_temperature")
    }
    assert DEFAULT_HYPER_PARAMETERS[name] == defaults | (dict(coeff=0.0) if name == "ressl" else {})


@pytest.mark.parametrize("module, fn", MODULES)
def test_a_scheduler_sets_hyper_parameters_as_attributes(module, fn):
    query, key, queue, _ = inputs("queue", dtype=torch.float64, seed=4)
    criterion = module()
    criterion.temperature = 0.05
    torch.testing.assert_close(
        criterion(query, key, queue), fn(query, key, queue, temperature=0.05), rtol=0, atol=0
    )
    assert "temperature=0.05" in repr(criterion)


@pytest.mark.parametrize("module, fn", MODULES)
def test_a_parameter_temperature_is_registered_saved_moved_and_learned(module, fn):
    query, key, queue, _ = inputs("queue", dtype=torch.float64, seed=5)
    criterion = module(temperature=torch.nn.Parameter(torch.tensor(0.3)))
    assert [name for name, _ in criterion.named_parameters()] == ["temperature"]
    assert "temperature" in criterion.state_dict()
    criterion.to(torch.float64)
    assert criterion.temperature.dtype == torch.float64
    loss = criterion(query, key, queue)
    loss.backward()
    (want,) = torch.autograd.grad(
        fn(query, key, queue, temperature=criterion.temperature), criterion.temperature
    )
    torch.testing.assert_close(criterion.temperature.grad, want)
    restored = module(temperature=torch.nn.Parameter(torch.tensor(1.0, dtype=torch.float64)))
    restored.load_state_dict(criterion.state_dict())
    assert restored.temperature.item() == pytest.approx(0.3)


@pytest.mark.parametrize("module", [SCELoss, InfoNCELoss, ReSSLLoss])
@pytest.mark.parametrize(
    "options, error, message",
    [
        (dict(temperature=-1.0), ValueError, "temperature must be a finite number ≥"),
        (dict(normalize="no"), TypeError, "normalize must be a bool"),
        (dict(reduction="avg"), ValueError, "reduction must be one of"),
        (dict(backend="triton"), ValueError, "backend must be one of"),
        (dict(queue=torch.zeros(4, 2)), TypeError, "queue must be a MemoryQueue or None"),
    ],
)
def test_modules_check_their_arguments_when_built(module, options, error, message):
    with pytest.raises(error, match=message):
        module(**options)


def test_module_checks_coeff_and_target_temperature_when_built():
    with pytest.raises(ValueError, match=r"coeff must be in \[0, 1\]"):
        SCELoss(coeff=1.5)
    with pytest.raises(ValueError, match="target_temperature must be a finite number ≥"):
        ReSSLLoss(target_temperature=0.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_modules_take_a_backend(backend):
    query, key, queue, _ = inputs("queue", seed=6)
    torch.testing.assert_close(
        SCELoss(backend=backend)(query, key, queue),
        sce_loss(query, key, queue, backend="reference"),
        rtol=1e-5,
        atol=1e-6,
    )


def test_a_module_whose_attributes_a_scheduler_sets_compiles_at_most_twice():
    query, key, queue, _ = inputs("queue", seed=7)
    criterion = SCELoss(backend="reference")
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lambda q, k, c: criterion(q, k, c), backend=counter, fullgraph=True)
    for i in range(10):
        criterion.temperature, criterion.coeff = 0.1 + 0.01 * i, 0.5 + 0.02 * i
        got = loss_and_grads(compiled, query, key, queue)
        want = loss_and_grads(
            sce_loss, query, key, queue, temperature=criterion.temperature, coeff=criterion.coeff
        )
        assert_all_close(got, want, rtol=1e-6, atol=1e-7)
    assert counter.frame_count <= 2, counter.frame_count


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_key_that_is_no_online_candidate_gets_zeros_on_every_backend(backend):
    """ReSSL in queue mode leaves the positive (the key) out of the online softmax."""
    query, key, queue, _ = inputs("queue", seed=8)
    _, grad_query, grad_key = loss_and_grads(ressl_loss, query, key, queue, backend=backend)
    assert grad_key is not None and torch.equal(grad_key, torch.zeros_like(key))
    assert grad_query.abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_compiled_moco_step_enqueues_before_the_backward(backend):
    """The official MoCo builder compiled with inductor: its (D, K) buffer is transposed inside
    the step and updated by slice before the backward; the gradients are those of the old queue."""
    query, key, queue, _ = inputs("queue", seed=9)

    def step(query, key, buffer):
        loss = sce_loss(query, key, buffer.T, backend=backend)
        buffer[:, : key.shape[0]] = key.T  # self._dequeue_and_enqueue(k)
        return loss

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    want = loss_and_grads(sce_loss, query, key, queue.clone(), backend=backend)
    buffer = queue.T.contiguous()
    got = loss_and_grads(compiled, query, key, buffer)
    assert torch.equal(buffer[:, : key.shape[0]], key.T)
    assert_all_close(got, want, rtol=1e-5, atol=1e-6)


def test_the_reference_snapshot_op_passes_opcheck():
    from sce_loss.reference import snapshot

    torch.library.opcheck(snapshot, (torch.randn(5, 3).T, torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_around_a_compiled_step_with_eager_backward_semantics(backend):
    """torch.compile traces the backward under the forward's outer autocast unless told not to
    (PyTorch's backward_pass_autocast; its default is to change to "off"). With "off", a compiled
    step inside autocast gives the numbers of the step outside it."""
    query, key, queue, _ = inputs("in-batch", seed=10)
    options = dict(backend=backend)
    want = loss_and_grads(sce_loss, query, key, queue, **options)
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, c: sce_loss(q, k, c, **options), backend="aot_eager")
    query, key = query.detach().requires_grad_(), key.detach().requires_grad_()
    if not hasattr(torch._functorch.config, "backward_pass_autocast"):
        # torch 2.6 (docs/compatibility.md): the backward is traced under the outer autocast.
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = compiled(query, key, queue)
        loss.backward()
        torch.testing.assert_close(loss.detach(), want[0], rtol=1e-6, atol=1e-7)
        exact = backend == "chunked"  # its backward is its own, computed in the forward
        tolerance = dict(rtol=1e-6, atol=1e-7) if exact else dict(rtol=2e-2, atol=2e-3)
        assert_all_close((query.grad, key.grad), want[1:], **tolerance)
        return
    with torch._functorch.config.patch(backward_pass_autocast="off"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = compiled(query, key, queue)
    loss.backward()
    assert_all_close((loss.detach(), query.grad, key.grad), want, rtol=1e-6, atol=1e-7)


def numpy_schedule_cases():
    """(name, step(query, key, queue, value), value at step i, the same call with Python numbers):
    a hyper-parameter read from a NumPy schedule (np.float64, np.float32, np.int64)."""
    from sce_loss import interpolated_key

    schedule = np.linspace(0.1, 0.2, 10)
    weights = np.arange(1, 11)
    criterion = SCELoss(backend="reference")

    def module_step(q, k, c, t):
        criterion.temperature = t  # a scheduler setting the attribute
        return criterion(q, k, c)

    index = torch.arange(6).flip(0)
    return {
        "sce τ, τ_m, λ": (
            lambda q, k, c, t: sce_loss(
                q, k, c, temperature=t, target_temperature=t / 2, coeff=np.float32(0.5)
            ),
            lambda i: schedule[i],
        ),
        "info_nce τ": (
            lambda q, k, c, t: info_nce_loss(q, k, c, temperature=t),
            lambda i: schedule[i],
        ),
        "module attribute": (module_step, lambda i: schedule[i]),
        "cacr temperatures and an int weight": (
            lambda q, k, c, t: cacr_loss(
                q,
                k,
                c,
                attraction_temperature=t,
                repulsion_temperature=2 * t,
                repulsion_weight=np.int64(2),
            ),
            lambda i: schedule[i],
        ),
        "cacr int weight": (
            lambda q, k, c, w: cacr_loss(q, k, c, attraction_weight=w),
            lambda i: weights[i],
        ),
        "interpolated_key ratio": (
            lambda q, k, c, r: interpolated_key(q, k, index, r).sum(),
            lambda i: schedule[i],
        ),
    }


@pytest.mark.parametrize("case", list(numpy_schedule_cases()))
def test_numpy_hyper_parameters_compile_fullgraph_at_most_twice(case):
    """NumPy scalars work compiled wherever Python numbers do (torch.compile traces them as 0-d
    arrays), and give the Python numbers' losses."""
    step, value = numpy_schedule_cases()[case]
    query, key, queue, _ = inputs("queue", seed=9)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    for i in range(4):
        got = compiled(query, key, queue, value(i))
        want = step(query, key, queue, value(i).item())
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert counter.frame_count <= 2, counter.frame_count


def test_a_schedule_switching_from_python_to_numpy_numbers_compiles_once_more():
    """As docs/usage.md says: dynamo guards on the type of the value passed, so the first NumPy
    number after Python ones compiles again (np.float64 twice, as dynamo does for any function),
    and no later value does."""
    query, key, queue, _ = inputs("queue", seed=9)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(
        lambda q, k, c, t: sce_loss(q, k, c, temperature=t), backend=counter, fullgraph=True
    )
    counts = []
    for value in [0.1, 0.11, 0.12, *np.linspace(0.13, 0.16, 4)]:
        compiled(query, key, queue, value)
        counts.append(counter.frame_count)
    assert counts[1] == counts[2] < counts[3] <= counts[2] + 2 and counts[3] == counts[-1], counts


@pytest.mark.parametrize("fullgraph", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_a_bad_python_number_is_refused_under_compile_too(fullgraph):
    """A Python number is checked while tracing (it once computed a loss at τ = −1), also when a
    schedule has made it symbolic: with fullgraph the compile error carries the message (not on
    torch 2.6, docs/compatibility.md), else the call raises it."""
    query, key, queue, _ = inputs("queue", seed=9)
    for name, good, bad, message in (
        ("temperature", 0.1, -1.0, "temperature must be a finite number ≥ 0.0001, got -1.0"),
        ("temperature", 0.1, float("nan"), "temperature must be a finite number"),
        ("temperature", 0.1, float("inf"), "temperature must be a finite number"),
        ("target_temperature", 0.05, float("inf"), "target_temperature must be a finite number"),
        ("coeff", 0.5, 1.5, r"coeff must be in \[0, 1\], got 1.5"),
    ):
        if fullgraph and TORCH_VERSION < (2, 13):
            message = "Observed exception"
        for schedule in ([bad], [good, good + 0.01, bad]):
            torch._dynamo.reset()
            compiled = torch.compile(
                lambda q, k, c, value, name=name: sce_loss(q, k, c, **{name: value}),
                fullgraph=fullgraph,
            )
            for value in schedule[:-1]:
                compiled(query, key, queue, value)
            with pytest.raises(Exception, match=message):
                compiled(query, key, queue, schedule[-1])


def test_numpy_numbers_and_bools_are_taken_eagerly_where_pythons_are():
    query, key, queue, _ = inputs("queue", seed=10)
    want = sce_loss(query, key, queue, include_keys=True, normalize=False, temperature=0.1)
    got = sce_loss(
        query,
        key,
        queue,
        include_keys=np.bool_(True),
        normalize=np.bool_(False),
        temperature=np.float64(0.1),
        gather=np.bool_(False),
    )
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    queue = MemoryQueue(np.int64(16), np.int32(3), seed=np.int64(1))
    assert queue.keys.shape == (16, 3)
    assert torch.equal(queue.keys, MemoryQueue(16, 3, seed=1).keys)
    with pytest.raises(TypeError, match="seed must be an int, got float64"):
        MemoryQueue(16, 3, seed=np.float64(1.0))
    with pytest.raises(TypeError, match="must be a float or a 0-d float tensor, got bool"):
        sce_loss(query, key, temperature=np.bool_(True))


def test_pushing_the_queues_own_entries_works_as_if_they_were_copied():
    queue = MemoryQueue(8, 3, seed=2)
    expected = MemoryQueue(8, 3, seed=2)
    expected.push(expected.keys[1:4].clone())
    queue.push(queue.keys[1:4])  # a view of the buffer it overwrites
    assert torch.equal(queue.keys, expected.keys) and int(queue.pointer) == 3
    expected.push(expected.keys.clone())
    queue.push(queue.keys)  # all of it, wrapping round the end
    assert torch.equal(queue.keys, expected.keys) and int(queue.pointer) == 3
