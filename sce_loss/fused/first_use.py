"""The first-use check: before ``backend="auto"`` trusts the fused kernels with a kind of call on a
device, it runs them once on a small fixed problem and compares with the reference.

A kind of call is a key (device, dtype, queue dtype, matmul precision, loss, candidate segments,
which of the query, key and τ gradients it computes, D): one compiled configuration. The check
problem has the call's loss, segments, dtypes and D, and at most ``CHECK_ROWS`` rows, which give
the same tiles (the plan's tiles depend on the rows only through whether there are at most 16). It
passes when its loss and the gradients the call computes agree with the float64 reference within
the documented relative errors; a failed launch or a disagreement warns once, naming the reason,
and the key is refused from then on.

Never while torch.compile traces or a CUDA graph captures (a check synchronises the device):
there a key not yet checked counts as verified. ``SCE_LOSS_SKIP_FIRST_USE_CHECK=1`` switches
the check off.
"""

from __future__ import annotations

import dataclasses
import os
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from ..arguments import autocast_disabled
from ..problem import DEFAULT_HYPER_PARAMETERS, Problem, constant_while_tracing

SKIP_VARIABLE = "SCE_LOSS_SKIP_FIRST_USE_CHECK"
# Relative error bars against the float64 reference, by input kind (sce_loss.fused.plan.KINDS).
TOLERANCES = {"fp32-ieee": 1e-5, "fp32-tf32": 5e-3, "fp16": 5e-3, "bf16": 1e-2}
CHECK_ROWS = 80
CHECK_QUEUE = 200

_verdicts: dict[tuple, bool] = {}


def verified(problem: Problem) -> bool:
    """Whether the fused kernels passed (or need not pass) their first-use check for the kind of
    call ``problem`` is: runs the check on the first call of each kind."""
    if os.environ.get(SKIP_VARIABLE) == "1":
        return True
    if torch.compiler.is_compiling():
        # A traced graph cannot run the check: it refuses a kind of call whose check failed and
        # trusts one not yet checked (a launch failure then streams inside the op instead).
        return _no_failed_check(kind_key(problem))
    key = check_key(problem)
    if key in _verdicts:
        return _verdicts[key]
    if problem.query.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return True
    reason = first_use_check(problem)
    _verdicts[key] = reason is None
    if reason is not None:
        warnings.warn(
            f"sce_loss: the fused kernels failed their first-use check on {_device_name(problem)} "
            f"for {problem.loss} with {problem.dtype} inputs: {reason}. backend='auto' computes "
            "these calls with another backend from now on. Run `python -m sce_loss.check` to "
            "see the fused kernels' agreement and speed on this machine.",
            RuntimeWarning,
            stacklevel=3,
        )
    return _verdicts[key]


@constant_while_tracing
def _no_failed_check(kind: tuple) -> bool:
    """Whether no check of this kind of call has failed. Read once when a graph is traced, as a
    constant: a graph that read ``_verdicts`` would guard on it and recompile each time an eager
    call (a validation step, another dtype) adds a verdict."""
    return all(ok for key, ok in _verdicts.items() if key[: len(kind)] == kind)


def check_key(problem: Problem) -> tuple:
    """What the check is run once for: one compiled configuration of the kernels, its kind of
    call (:func:`kind_key`) and the tiles of every kernel."""
    from . import plan

    query = problem.query
    rows, dim = query.shape[0] * query.shape[1], query.shape[2]
    tiles = plan.tiles(plan.device_of(query.device), plan.kind_of(query.dtype), dim, rows)
    return (*kind_key(problem), tuple(sorted(tiles.items())))


def kind_key(problem: Problem) -> tuple:
    """A kind of call: device, dtypes, matmul precision, loss, candidate segments, the gradients
    it computes (:func:`needed_gradients`), and D (Triton compiles a kernel for each D,
    specialised on its divisibility)."""
    from . import plan

    query = problem.query
    return (
        str(query.device),
        query.dtype,
        None if problem.queue is None else problem.queue.dtype,
        plan.kind_of(query.dtype),
        problem.loss,
        problem.bank is not None,
        problem.queue is not None,
        needed_gradients(problem),
        query.shape[2],
    )


def first_use_check(problem: Problem) -> str | None:
    """Run the check problem of ``problem``'s kind; None if it passes, else why it failed."""
    from . import losses, plan

    check = check_problem(problem)
    needed = needed_gradients(problem)
    tolerance = TOLERANCES[plan.kind_of(problem.dtype)]
    try:
        got = evaluate(losses, check, needed=needed)
    except Exception as error:  # a launch failure: out of resources, a compiler error, ...
        first_line = (str(error).strip().splitlines() or [""])[0]
        return f"the kernels failed to run ({type(error).__name__}: {first_line})"
    from .. import reference

    want = evaluate(reference.losses, in_float64(check), needed=needed)
    names = ("query gradient", "key gradient", "τ gradient")
    for name, g, w in zip(("loss", *(n for n, need in zip(names, needed) if need)), got, want):
        difference = relative_error(g, w)
        if not difference <= tolerance:  # NaN fails too
            return (
                f"its {name} differs from the reference by {difference:.1e} relative error "
                f"(tolerance {tolerance:.0e})"
            )
    return None


def check_problem(problem: Problem) -> Problem:
    """A small fixed problem with ``problem``'s loss, segments, dtypes, device and D."""
    query = problem.query
    rows, dim = min(query.shape[0] * query.shape[1], CHECK_ROWS), query.shape[2]
    generator = torch.Generator().manual_seed(0)

    def unit(count: int, dtype: torch.dtype) -> Tensor:
        vectors = torch.randn(count, dim, dtype=torch.float64, generator=generator)
        return F.normalize(vectors, dim=-1).to(device=query.device, dtype=dtype)

    key = unit(rows, query.dtype)
    queue = None if problem.queue is None else unit(CHECK_QUEUE, problem.queue.dtype)
    return Problem(
        loss=problem.loss,
        query=unit(rows, query.dtype)[None],
        key=key,
        bank=None if problem.bank is None else key,
        queue=queue,
        offset=0,
        **DEFAULT_HYPER_PARAMETERS[problem.loss],
    )


def relative_error(got: Tensor, want: Tensor) -> float:
    """‖got − want‖ / ‖want‖ in float64 (‖got‖ when ``want`` is zero)."""
    got, want = got.double(), want.double()
    scale = want.norm()
    return ((got - want).norm() / (scale if scale > 0 else 1.0)).item()


def needed_gradients(problem: Problem) -> tuple[bool, bool, bool]:
    """Which of the query, key and τ gradients the call computes: each kernel computes its own
    (the query's in the forward pass, the key's in the backward, dL/dτ from the statistics)."""
    if not torch.is_grad_enabled():
        return (False, False, False)
    temperature = problem.temperature
    return (
        problem.query.requires_grad,
        problem.key.requires_grad,
        isinstance(temperature, Tensor) and temperature.requires_grad,
    )


def _device_name(problem: Problem) -> str:
    from . import plan

    return plan.device_of(problem.query.device).name


def in_float64(problem: Problem) -> Problem:
    def double(x):
        return None if x is None else x.detach().double()

    key = double(problem.key)
    return dataclasses.replace(
        problem,
        query=double(problem.query),
        key=key,
        bank=None if problem.bank is None else key,
        queue=double(problem.queue),
    )


def evaluate(losses, problem: Problem, *, needed: tuple[bool, bool, bool]) -> list[Tensor]:
    """The per-row losses of ``problem`` and the ``needed`` ones of the query, key and τ
    gradients of their weighted sum (weights 0.5..1.5, a non-uniform upstream gradient)."""
    need_query, need_key, need_temperature = needed
    with torch.set_grad_enabled(any(needed)), autocast_disabled(problem.query.device.type):
        query = problem.query.detach().requires_grad_(need_query)
        key = problem.key.detach().requires_grad_(need_key)
        temperature = torch.tensor(
            float(problem.temperature),
            dtype=torch.float64,
            device=query.device,
            requires_grad=need_temperature,
        )
        live = dataclasses.replace(
            problem,
            query=query,
            key=key,
            bank=None if problem.bank is None else key,
            temperature=temperature,
        )
        per_row = losses(live)
        if not any(needed):
            return [per_row]
        weights = torch.linspace(
            0.5, 1.5, per_row.numel(), dtype=per_row.dtype, device=per_row.device
        ).view(per_row.shape)
        inputs = [x for x, need in zip((query, key, temperature), needed) if need]
        grads = torch.autograd.grad((per_row * weights).sum(), inputs, allow_unused=True)
        return [
            per_row.detach(),
            *(torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)),
        ]
