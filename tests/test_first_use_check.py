"""The first-use check of ``backend="auto"``, its failures simulated on the CPU.

The fused kernels run through Triton's interpreter; a launch that raises and a kernel that returns
a wrong loss stand for what a user's GPU could do. Each kind of call is checked once; a failure
warns once, naming the reason and ``python -m sce_loss.check``, and refuses that kind from then on.
"""

import warnings

import pytest
import torch
from test_fused import DEVICE, SCE, problem_of

from sce_loss import fused, sce_loss
from sce_loss.fused import first_use, kernels

pytest.importorskip("triton", reason="the fused backend needs Triton (pip install '.[triton]')")


@pytest.fixture(autouse=True)
def fresh_verdicts(monkeypatch):
    monkeypatch.setattr(first_use, "_verdicts", {})
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
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert fused.verified(training_problem())
    first_use._verdicts[("some", "failed", "kind")] = False
    assert not fused.verified(training_problem())


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
