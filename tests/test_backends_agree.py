"""Every available backend equals the reference on random problems: loss, mode (in-batch, queue,
queue with the keys, symmetric), crops, dtype, reduction and a learnable τ drawn by hypothesis;
values and the gradients of query, key and τ. The fused kernels run through Triton's interpreter
(float32 and bfloat16, the modes they serve); the slow tier draws more and larger problems."""

import pytest
import torch
from conftest import HAS_FUSED, unit
from hypothesis import given, settings
from hypothesis import strategies as st

from sce_loss import info_nce_loss, ressl_loss, sce_loss

FUNCTIONS = {"info_nce": info_nce_loss, "ressl": ressl_loss, "sce": sce_loss}
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2}
HYPER = dict(
    info_nce=dict(temperature=0.2),
    ressl=dict(temperature=0.1, target_temperature=0.04),
    sce=dict(coeff=0.4, temperature=0.1, target_temperature=0.05),
)


@st.composite
def problems(draw, largest):
    loss = draw(st.sampled_from(sorted(FUNCTIONS)))
    mode = draw(st.sampled_from(["in-batch", "queue", "queue+keys", "symmetric"]))
    crops = None if mode == "symmetric" else draw(st.sampled_from([None, 2]))
    n = draw(st.integers(2, largest))
    return dict(
        loss=loss,
        mode=mode,
        crops=crops,
        n=n,
        d=draw(st.integers(1, 12)),
        m=draw(st.integers(1, 3 * largest)),
        dtype=draw(st.sampled_from([torch.float64, torch.float32, torch.bfloat16])),
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
        learnable=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def run(problem, backend):
    """Values and gradients on ``backend``; for "oracle", the reference in float64 on the same
    (rounded) inputs, which is what the backends' error bars are stated against."""
    g = torch.Generator().manual_seed(problem["seed"])
    n, d, dtype = problem["n"], problem["d"], problem["dtype"]
    crops = (problem["crops"],) if problem["crops"] else ()
    rounded = [
        unit(*crops, n, d, generator=g).to(dtype),
        unit(n, d, generator=g).to(dtype),
        unit(problem["m"], d, generator=g).to(dtype),
    ]
    if backend == "oracle":
        rounded, backend = [x.double() for x in rounded], "reference"
    query, key = (x.requires_grad_() for x in rounded[:2])
    queue = rounded[2] if "queue" in problem["mode"] else None
    hyper = dict(HYPER[problem["loss"]])
    tau = torch.tensor(hyper["temperature"], dtype=torch.float64)
    if problem["learnable"]:
        hyper["temperature"] = tau.requires_grad_()
    options = dict(include_keys=True) if problem["mode"] == "queue+keys" else {}
    if problem["mode"] == "symmetric":
        options = dict(symmetric=True)
    value = FUNCTIONS[problem["loss"]](
        query, key, queue, reduction=problem["reduction"], backend=backend, **hyper, **options
    )
    weights = torch.linspace(0.5, 1.5, value.numel(), dtype=torch.float64)
    weights = weights.to(value.dtype).view(value.shape)
    leaves = [query, key] + ([tau] if problem["learnable"] else [])
    grads = torch.autograd.grad((weights * value).sum(), leaves)
    return [value.detach(), *grads]


def term_scales(problem) -> dict:
    """The size of the terms each gradient sums, which is what rounding errs relative to (they
    cancel to about 0 where the distributions saturate). With g_r the upstream of row r,
    p and w the online and target distributions (Σ_k |p_rk − w_rk| ≤ 2) and unit vectors:
    dL/dx_r = g_r Σ_k (p_rk − w_rk) c_k / τ and the candidates' gradients sum terms up to
    2·Σ_r |g_r| / τ; dL/dτ = −Σ_r g_r Σ_k (p_rk − w_rk) a_rk / τ, with |a_rk| ≤ 1/τ, up to
    2·Σ_r |g_r| / τ². (The bfloat16 kernels also round the coefficients p − w of their products
    to bfloat16, as 16-bit tensor-core products do.)"""
    rows = (2 if problem["mode"] == "symmetric" else problem["crops"] or 1) * problem["n"]
    # run()'s weights: 0.5 on a scalar, linspace(0.5, 1.5) over the rows (mean 1).
    upstream = {"mean": 0.5, "sum": 0.5 * rows, "none": rows}[problem["reduction"]]
    tau = HYPER[problem["loss"]]["temperature"]
    return dict(query=2 * upstream / tau, key=2 * upstream / tau, temperature=2 * upstream / tau**2)


def assert_agree(problem, backend):
    tolerance = TOLERANCE[problem["dtype"]]
    outputs = ["value", "query", "key"] + (["temperature"] if problem["learnable"] else [])
    for name, got, want in zip(outputs, run(problem, backend), run(problem, "oracle")):
        # Relative to the output's norm, to 1 where that is smaller, and for a gradient to the
        # terms it sums (term_scales) where those are larger.
        scale = max(float(want.double().norm()), 1.0, term_scales(problem).get(name, 0.0))
        error = float((got.double() - want.double()).norm()) / scale
        assert error <= tolerance, (backend, name, problem, error)


def fused_serves(problem):
    return HAS_FUSED and problem["mode"] != "symmetric" and problem["dtype"] != torch.float64


def assert_every_backend_agrees(problem):
    for backend in ("reference", "chunked", "fused"):
        if backend != "fused" or fused_serves(problem):
            assert_agree(problem, backend)


@settings(max_examples=25, deadline=None)
@given(problems(largest=6))
def test_every_backend_equals_the_reference(problem):
    assert_every_backend_agrees(problem)


@pytest.mark.slow
@settings(max_examples=200, deadline=None)
@given(problems(largest=40))
def test_every_backend_equals_the_reference_on_larger_draws(problem):
    assert_every_backend_agrees(problem)
