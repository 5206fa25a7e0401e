import os
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F
from hypothesis import settings

# Without a GPU the fused kernels run through Triton's interpreter. Triton reads this when it is
# first imported, so it is set before any test can import it.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# Hypothesis profiles: "default" draws the same examples on every run, so that a run on a fresh
# clone (CI) is reproducible; "explore" (HYPOTHESIS_PROFILE=explore) draws new ones each run; a
# test's own @settings (the slow tier's long runs) sets how many.
settings.register_profile("default", max_examples=60, deadline=None, derandomize=True)
settings.register_profile("explore", max_examples=60, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

MODES = ("in-batch", "queue", "queue+keys")


def fused_reason():
    """Why the fused kernels cannot run in this installation (no Triton, or a version they were
    not checked with), or None."""
    from sce_loss import fused

    return fused.triton_reason()


HAS_FUSED = fused_reason() is None
needs_fused = pytest.mark.skipif(not HAS_FUSED, reason=f"the fused backend: {fused_reason()}")


def unit(*shape, dtype=torch.float64, generator=None):
    """Random unit vectors along the last dimension."""
    return F.normalize(torch.randn(*shape, dtype=torch.float64, generator=generator), dim=-1).to(
        dtype
    )


def make_inputs(mode, *, n=5, d=8, m=7, crops=None, dtype=torch.float64, seed=0):
    """(query, key, queue, include_keys) for a mode; query is (crops, n, d) when crops is given."""
    g = torch.Generator().manual_seed(seed)
    query = unit(*((crops,) if crops else ()), n, d, dtype=dtype, generator=g)
    key = unit(n, d, dtype=dtype, generator=g)
    queue = None if mode == "in-batch" else unit(m, d, dtype=dtype, generator=g)
    return query, key, queue, mode == "queue+keys"


@pytest.fixture(params=MODES)
def mode(request):
    return request.param


@pytest.hookimpl(tryfirst=True)  # before pytest's own -m selection reads the slow marks
def pytest_collection_modifyitems(items):
    """A test marked ``matrix`` runs a representative slice in the default tier: few cases that
    between them give every parameter each of its values (greedily, the case with the most values
    not yet given, first in collection order on a tie) among the cases not already marked slow. The
    slow tier runs the rest."""
    matrices = defaultdict(list)
    for item in items:
        marked = item.get_closest_marker("matrix") is not None
        if marked and hasattr(item, "callspec") and item.get_closest_marker("slow") is None:
            values = {(name, repr(value)) for name, value in item.callspec.params.items()}
            matrices[item.nodeid.split("[")[0]].append((item, values))
    for cases in matrices.values():
        uncovered = set().union(*(values for _, values in cases))
        rest = list(cases)
        while uncovered:
            chosen = max(rest, key=lambda case: len(case[1] & uncovered))
            uncovered -= chosen[1]
            rest.remove(chosen)
        for item, _ in rest:
            item.add_marker(pytest.mark.slow)
