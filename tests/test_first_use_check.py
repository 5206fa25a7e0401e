"""The first-use check of ``backend="auto"``, its failures simulated on the CPU.

The fused kernels run through Triton's interpreter; a launch that raises and a kernel that returns
a wrong loss stand for what a user's GPU could do. Each kind of call is checked once; a failure
warns once, naming the reason and ``python -m sce_loss.check``, and refuses that kind from then on.
"""

import dataclasses
import warnings

import pytest
import torch
from conftest import HAS_FUSED, fused_reason
from test_fused import DEVICE, SCE, problem_of
from torch._dynamo.testing import CompileCounterWithBackend

from sce_loss import fused, sce_loss
from sce_loss.fused import first_use, kernels

if not HAS_FUSED:
    pytest.skip(f"the fused backend: {fused_reason()}", allow_module_level=True)


@pytest.fixture(autouse=True)
def fresh_verdicts(monkeypatch):
    from sce_loss.fused import ops

    monkeypatch.setattr(first_use, "_verdicts", {})
    monkeypatch.setattr(ops, "_NOTED", set())
    monkeypatch.delenv(first_use.SKIP_VARIABLE, raising=False)


class FailingLaunch:
    """A kernel whose launch fails, as one needing more shared memory than the GPU has."""

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            raise RuntimeError(
                "out of resource: shared memory, Required: 168000, Hardware limit: 101376"
            )

        return launch


class WrongLoss:
    """The real finalize kernel, its losses then off by 10 %."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.kernel[grid](*args, **kwargs)
            args[4].mul_(1.1)  # LOSS

        return launch


def training_problem(mode="queue+keys"):
    problem = problem_of("sce", mode, **SCE)
    problem.query.requires_grad_()
    return problem


def test_a_passing_check_runs_once_per_kind_of_call(monkeypatch):
    calls = []
    real = first_use.first_use_check
    monkeypatch.setattr(first_use, "first_use_check", lambda p: calls.append(p) or real(p))
    problem = training_problem()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fused.verified(problem) and fused.verified(problem)
        assert len(calls) == 1
        with torch.no_grad():  # evaluation compiles other kernels: a kind of its own
            assert fused.verified(problem)
        assert fused.verified(problem_of("ressl", "queue", **dict(SCE, coeff=0.0)))
    assert len(calls) == 3
    assert calls[0].query.shape[1] <= first_use.CHECK_ROWS


def test_a_failed_launch_warns_once_and_refuses_that_kind(monkeypatch):
    monkeypatch.setattr(kernels, "partial_stats_kernel", FailingLaunch())
    problem = training_problem()
    with pytest.warns(RuntimeWarning) as record:
        assert not fused.verified(problem)
    (warning,) = record
    message = str(warning.message)
    assert "failed to run (RuntimeError: out of resource: shared memory" in message
    assert "python -m sce_loss.check" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not fused.verified(problem)  # no second warning, no second check


def test_a_wrong_value_warns_and_refuses_that_kind(monkeypatch):
    monkeypatch.setattr(kernels, "finalize_kernel", WrongLoss(kernels.finalize_kernel))
    with pytest.warns(
        RuntimeWarning,
        match=r"its loss differs from the reference by 1\.0e-01 "
        r"relative error \(tolerance 1e-05\)",
    ):
        assert not fused.verified(training_problem("queue"))


def test_the_environment_variable_switches_the_check_off(monkeypatch):
    monkeypatch.setattr(kernels, "partial_stats_kernel", FailingLaunch())
    monkeypatch.setenv(first_use.SKIP_VARIABLE, "1")
    assert fused.verified(training_problem())


def test_no_check_while_compiling_and_failures_still_count(monkeypatch):
    def no_check(problem):
        raise AssertionError("the check ran while compiling")

    monkeypatch.setattr(first_use, "first_use_check", no_check)
    problem = training_problem()
    failed_kind = (*first_use.kind_key(problem), "its tiles")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert fused.verified(problem)
    first_use._verdicts[("another", "kind", "that", "failed")] = False
    assert fused.verified(problem)  # a refusal applies to its own kind only
    first_use._verdicts[failed_kind] = False
    assert not fused.verified(problem)


def test_the_kind_of_a_call_includes_its_dimension():
    """D = 100 and D = 128 share tiles but compile to different kernels: separate checks."""
    narrow = problem_of("sce", "queue", d=100, **SCE)
    wide = problem_of("sce", "queue", d=128, **SCE)
    assert first_use.check_key(narrow) != first_use.check_key(wide)


def test_a_forced_fused_backend_raises_instead_of_falling_back(monkeypatch):
    monkeypatch.setattr(kernels, "partial_stats_kernel", FailingLaunch())
    problem = training_problem()
    with pytest.raises(RuntimeError, match="out of resource"):
        sce_loss(
            problem.query[0], problem.key, problem.queue, include_keys=True, backend="fused", **SCE
        )


def test_the_check_problem_matches_the_callers_kind():
    problem = problem_of(
        "ressl",
        "queue",
        n=300,
        d=100,
        crops=2,
        dtype=torch.bfloat16,
        queue_dtype=torch.float32,
        **dict(SCE, coeff=0.0),
    )
    check = first_use.check_problem(problem)
    assert check.loss == "ressl" and check.bank is None
    assert check.query.shape == (1, first_use.CHECK_ROWS, 100)
    assert check.query.dtype == torch.bfloat16 and check.queue.dtype == torch.float32
    assert check.query.device == torch.device(DEVICE)
    assert first_use.check_key(check) == first_use.check_key(problem)


# -- a launch failure inside a compiled graph: the op streams instead ------------------------------

HYPER = {
    "info_nce": dict(temperature=0.2),
    "ressl": dict(SCE, coeff=0.0),
    "sce": SCE,
}


def fused_outputs(problem, fallback):
    """Every output of the fused forward op, and the bank's gradient, for ``problem``."""
    from sce_loss.fused.ops import fused_bank_gradient, fused_forward

    query = problem.query.reshape(-1, problem.query.shape[-1])

    def scalar(value):
        return torch.ones((), device=query.device) * (1.0 if value is None else value)

    hyper = (
        scalar(problem.coeff),
        scalar(problem.temperature),
        scalar(problem.target_temperature),
    )
    flags = dict(
        offset=problem.offset,
        online_has_pos=problem.online_has_positive,
        need_target=problem.needs_target,
        fallback=fallback,
    )
    outputs = fused_forward(
        query, problem.key, problem.bank, problem.queue, *hyper, need_grad=True, **flags
    )
    if problem.bank is None:
        return outputs
    upstream = torch.linspace(0.5, 1.5, len(query), device=query.device)
    _, _, _, lse_a, lse_b = outputs
    bank_grad = fused_bank_gradient(
        query, problem.key, problem.bank, upstream, lse_a, lse_b, *hyper, **flags
    )
    return (*outputs, bank_grad)


@pytest.mark.matrix
@pytest.mark.parametrize("name", HYPER)
@pytest.mark.parametrize("mode", ["in-batch", "queue", "queue+keys"])
def test_a_failed_launch_streams_the_same_outputs_inside_the_op(name, mode, monkeypatch):
    """With every kernel failing to launch, the op of ``backend="auto"`` returns what the kernels
    return (loss, query gradient, τ gradient, LSE_a, LSE_b, and the bank's gradient), once
    warned; a forced ``backend="fused"`` (no fallback) raises."""
    problem = problem_of(name, mode, crops=2, **HYPER[name])
    want = fused_outputs(problem, fallback=False)
    for kernel in ("partial_stats_kernel", "finalize_kernel", "key_gradient_kernel"):
        monkeypatch.setattr(kernels, kernel, FailingLaunch())
    with pytest.warns(RuntimeWarning, match="failed to launch"):
        got = fused_outputs(problem, fallback=True)
    for label, g, w in zip(("loss", "grad", "dtau", "lse_a", "lse_b", "bank grad"), got, want):
        if label != "lse_b" or problem.needs_target:  # InfoNCE's LSE_b is not written
            # float32 against float32, summed in another order: the fused bar, ‖g − w‖/‖w‖
            assert first_use.relative_error(g, w) <= 1e-5, label
    with pytest.raises(RuntimeError, match="out of resource"):
        fused_outputs(problem, fallback=False)


def test_a_compiled_auto_step_survives_a_failed_launch(monkeypatch):
    """An unchecked kind inside a compiled graph is trusted; its failed launch streams instead,
    with the reference's loss and gradients."""
    monkeypatch.setattr(fused, "unsupported_reason", lambda problem: None)
    monkeypatch.setattr(first_use, "first_use_check", lambda problem: None)
    import sce_loss.functional as functional

    problem = training_problem()
    monkeypatch.setattr(
        functional, "_backend", lambda name, p: fused if name == "auto" else functional.reference
    )
    for kernel in ("partial_stats_kernel", "finalize_kernel", "key_gradient_kernel"):
        monkeypatch.setattr(kernels, kernel, FailingLaunch())

    def step(query, key, queue, backend):
        return sce_loss(query, key, queue, include_keys=True, backend=backend, **SCE)

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    results = []
    for fn, backend in ((compiled, "auto"), (step, "reference")):
        query = problem.query[0].detach().clone().requires_grad_()
        key = problem.key.detach().clone().requires_grad_()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            loss = fn(query, key, problem.queue, backend)
        loss.backward()
        results.append((loss.detach(), query.grad, key.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# -- the check covers what the call computes -------------------------------------------------------


class WrongOutput:
    """The real kernel, its output argument ``output`` then off by 10 %."""

    def __init__(self, kernel, output):
        self.kernel, self.index = kernel, kernel.arg_names.index(output)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.kernel[grid](*args, **kwargs)
            args[self.index].mul_(1.1)

        return launch


@pytest.mark.parametrize(
    "which, kernel, output, name",
    [
        ("key", "key_gradient_kernel", "GRAD_BANK", "key gradient"),  # online keys, frozen query
        ("temperature", "finalize_kernel", "DTAU", "τ gradient"),  # a learnable τ alone
    ],
)
def test_a_call_needing_only_one_gradient_checks_that_gradient(
    which, kernel, output, name, monkeypatch
):
    """A call whose query needs no gradient still computes the key's or τ's: the check runs
    that kernel, and its wrong output is refused."""
    monkeypatch.setattr(kernels, kernel, WrongOutput(getattr(kernels, kernel), output))
    problem = problem_of("sce", "queue+keys", **SCE)
    if which == "key":
        problem.key.requires_grad_()
    else:
        problem = dataclasses.replace(
            problem, temperature=torch.tensor(SCE["temperature"], requires_grad=True)
        )
    assert first_use.needed_gradients(problem) == (False, which == "key", which != "key")
    with pytest.warns(RuntimeWarning, match=f"its {name} differs from the reference"):
        assert not fused.verified(problem)
    assert fused.verified(problem_of("sce", "queue+keys", **SCE))  # no gradient: another kind


# -- no recompiles from the library's own caches ---------------------------------------------------


@pytest.fixture
def fused_first(monkeypatch):
    """``auto`` takes its CUDA branch on the CPU: the fused kernels (through the interpreter)
    after their first-use check."""
    import sce_loss.functional as functional

    monkeypatch.setattr(functional, "_fused_first", lambda device: True)
    monkeypatch.setattr(functional, "_EXPLAINED", set())


def eager_calls_between_steps(query, key, queue):
    """What a training loop runs eagerly between compiled steps: a no-grad validation (a kind of
    call of its own: a new verdict) and a float64 call the fused kernels cannot serve (a new
    note)."""
    import sce_loss.functional as functional

    with torch.no_grad():
        sce_loss(query, key, queue, include_keys=True, **SCE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # warned once, on the first call
        sce_loss(query.double(), key.double(), queue.double(), **SCE)
    (note,) = functional._EXPLAINED
    assert "the fused kernels cannot serve this call" in note


def test_a_learnable_temperature_step_compiles_once_whatever_runs_eagerly(fused_first):
    problem = training_problem()
    query, key, queue = problem.query[0].detach(), problem.key, problem.queue
    temperature = torch.nn.Parameter(torch.tensor(SCE["temperature"]))
    hyper = {k: v for k, v in SCE.items() if k != "temperature"}

    def step(query, key, queue, temperature):
        return sce_loss(query, key, queue, include_keys=True, temperature=temperature, **hyper)

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    for _ in range(3):
        x = query.clone().requires_grad_()
        compiled(x, key, queue, temperature).backward()
        want = step(query.clone().requires_grad_(), key, queue, temperature)
        eager_calls_between_steps(query, key, queue)
        assert x.grad is not None and torch.isfinite(want)
    assert counter.frame_count == 1
    assert len(first_use._verdicts) == 2  # the eager step's kind and validation's


def test_a_schedule_compiles_at_most_twice_whatever_runs_eagerly(fused_first):
    problem = training_problem()
    query, key, queue = problem.query[0].detach(), problem.key, problem.queue

    def step(query, key, queue, coeff, temperature):
        return sce_loss(query, key, queue, include_keys=True, coeff=coeff, temperature=temperature)

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    for i in range(4):
        x = query.clone().requires_grad_()
        compiled(x, key, queue, 0.5 - 0.05 * i, 0.1 + 0.01 * i).backward()
        eager_calls_between_steps(query, key, queue)
    assert counter.frame_count <= 2, counter.frame_count
