"""The public API's annotations: every argument of every public function, module and of
``MemoryQueue`` says what it takes, and the calls of tests/typecheck_api.py (which mypy checks in
CI) run."""

import inspect

import pytest
import torch
import typecheck_api

import sce_loss


def public_callables():
    """(name, function) of each public function, and of each public class's methods that a user
    calls (``__init__``, and ``forward``/``push`` where the class defines them)."""
    for name in sce_loss.__all__:
        obj = getattr(sce_loss, name)
        if inspect.isclass(obj):
            methods = ["__init__"] + [m for m in ("forward", "push") if hasattr(obj, m)]
            yield from ((f"{name}.{m}", getattr(obj, m)) for m in methods)
        else:
            yield name, obj


def unannotated(function) -> list[str]:
    signature = inspect.signature(function)
    missing = [
        p.name
        for p in signature.parameters.values()
        if p.name != "self" and p.annotation is inspect.Parameter.empty
    ]
    if signature.return_annotation is inspect.Signature.empty:
        missing.append("return")
    return missing


@pytest.mark.parametrize(
    "name, function", [pytest.param(name, f, id=name) for name, f in public_callables()]
)
def test_every_public_argument_is_annotated(name, function):
    assert unannotated(function) == [], name


def test_the_type_checked_calls_run():
    torch.manual_seed(0)
    losses = typecheck_api.the_functions() + typecheck_api.the_modules()
    assert len(losses) == 14
    assert all(loss.dim() == 0 and torch.isfinite(loss) for loss in losses)
