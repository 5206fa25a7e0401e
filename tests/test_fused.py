"""The fused kernels against the reference: values and gradients, every loss, mode and dtype.

Without a GPU the real kernels run on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1),
on small ragged shapes (N, M and D not multiples of the tiles, several column splits); with CUDA
they run compiled on the GPU. (The interpreter needs Triton ≥ 3.8 with NumPy ≥ 2.4.)
"""

import dataclasses
import subprocess
import sys

import devices
import pytest
import torch
from conftest import HAS_FUSED, fused_reason, make_inputs

from sce_loss import fused, info_nce_loss, ressl_loss, sce_loss
from sce_loss.fused import first_use, plan
from sce_loss.problem import Problem

if not HAS_FUSED:
    pytest.skip(f"the fused backend: {fused_reason()}", allow_module_level=True)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

LOSSES = {
    "infonce": (info_nce_loss, dict(temperature=0.2)),
    "ressl": (ressl_loss, dict(temperature=0.1, target_temperature=0.04)),
    "sce": (sce_loss, dict(coeff=0.4, temperature=0.1, target_temperature=0.05)),
}
# Relative error bars: float32 with full-precision products; 16-bit operands on tensor cores.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 1e-2}
# (N, M, D): 2 row blocks × 3 column blocks; 1 × 10 with several splits
SHAPES = [(19, 37, 20), (5, 150, 8)]


def relative_error(got, want):
    """‖got − want‖ / ‖want‖ (‖got‖ when ``want`` is zero: a key that is no candidate)."""
    return first_use.relative_error(got, want)


def run(fn, backend, query, key, queue, hyper, include_keys, temperature):
    query = query.detach().requires_grad_()
    key = key.detach().requires_grad_()
    temperature = temperature.detach().requires_grad_()
    losses = fn(
        query,
        key,
        queue,
        include_keys=include_keys,
        reduction="none",
        backend=backend,
        **{**hyper, "temperature": temperature},
    )
    weights = torch.linspace(0.5, 1.5, losses.numel(), device=losses.device).view(losses.shape)
    (losses * weights).sum().backward()  # a non-uniform upstream gradient
    return losses.detach(), query.grad, key.grad, temperature.grad


@pytest.mark.matrix
@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("crops", [None, 2])
def test_fused_matches_the_reference(name, mode, dtype, shape, crops):
    fn, hyper = LOSSES[name]
    n, m, d = shape
    inputs = make_inputs(mode, n=n, d=d, m=m, crops=crops, dtype=dtype, seed=n + m + d)
    query, key, queue = (None if x is None else x.to(DEVICE) for x in inputs[:3])
    temperature = torch.tensor(hyper["temperature"], device=DEVICE)
    got = run(fn, "fused", query, key, queue, hyper, inputs[3], temperature)
    want = run(fn, "reference", query, key, queue, hyper, inputs[3], temperature)
    names = ("loss", "query grad", "key grad", "temperature grad")
    for label, g, w in zip(names, got, want):
        if w is None or g is None:  # no gradient: None on one side, zeros at most on the other
            assert not any(t is not None and t.any() for t in (g, w)), label
            continue
        assert g.dtype == w.dtype, label
        assert torch.isfinite(g).all(), label
        assert relative_error(g, w) <= TOLERANCE[dtype], (label, relative_error(g, w))


@pytest.mark.parametrize("name", LOSSES)
def test_fused_multi_crop_mean_and_no_grad(name):
    fn, hyper = LOSSES[name]
    query, key, queue, _ = make_inputs("queue", n=7, d=12, m=20, crops=3, dtype=torch.float32)
    query, key, queue = query.to(DEVICE), key.to(DEVICE), queue.to(DEVICE)
    with torch.no_grad():
        got = fn(query, key, queue, backend="fused", **hyper)
    want = fn(query, key, queue, backend="reference", **hyper)
    assert relative_error(got, want) <= 1e-5


def test_fused_sce_at_coeff_one_is_fused_infonce():
    query, key, queue, _ = make_inputs("queue+keys", n=9, d=10, m=21, dtype=torch.float32)
    query, key, queue = query.to(DEVICE), key.to(DEVICE), queue.to(DEVICE)
    torch.testing.assert_close(
        sce_loss(query, key, queue, coeff=1.0, include_keys=True, backend="fused"),
        info_nce_loss(query, key, queue, temperature=0.1, include_keys=True, backend="fused"),
        rtol=0,
        atol=0,
    )


def test_fused_op_registration_passes_opcheck():
    """Fake tensor, schema and autograd registration, as torch.compile relies on them."""
    from sce_loss.fused.ops import fused_forward

    query, key, queue, _ = make_inputs("queue+keys", n=6, d=8, m=11, dtype=torch.float32)
    hyper = [torch.tensor(v, device=DEVICE) for v in (0.5, 0.1, 0.05)]
    hyper[1].requires_grad_()
    args = (
        query.to(DEVICE).requires_grad_(),
        key.to(DEVICE).requires_grad_(),
        key.to(DEVICE),
        queue.to(DEVICE),
        *hyper,
    )
    flags = dict(offset=0, online_has_pos=True, need_target=True, need_grad=True, fallback=False)
    torch.library.opcheck(
        fused_forward,
        args,
        flags,
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


def test_fused_under_torch_compile_matches_eager():
    query, key, queue, _ = make_inputs("queue", n=6, d=8, m=11, dtype=torch.float32)
    query, key, queue = query.to(DEVICE).requires_grad_(), key.to(DEVICE), queue.to(DEVICE)

    def step(query):
        return sce_loss(query, key, queue, backend="fused")

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(query)
    (grad,) = torch.autograd.grad(loss, query)
    (want_grad,) = torch.autograd.grad(step(query), query)
    torch.testing.assert_close(loss, step(query))
    torch.testing.assert_close(grad, want_grad)


def test_backend_choice_and_errors():
    query, key, queue, _ = make_inputs("queue", dtype=torch.float64)
    with pytest.raises(ValueError, match="backend must be one of .*, got 'fast'"):
        sce_loss(query, key, queue, backend="fast")
    with pytest.raises(ValueError, match="backend='fused' cannot run here: .*float64"):
        sce_loss(query.to(DEVICE), key.to(DEVICE), queue.to(DEVICE), backend="fused")
    wide = make_inputs("queue", d=300, dtype=torch.float32)
    with pytest.raises(ValueError, match="D ≤ 256, got D=300"):
        sce_loss(*(x.to(DEVICE) for x in wide[:3]), backend="fused")
    # auto on CPU tensors is the reference, bit for bit.
    cpu = make_inputs("queue", dtype=torch.float32)[:3]
    assert torch.equal(sce_loss(*cpu), sce_loss(*cpu, backend="reference"))


def problem_of(
    loss, mode, *, n=19, d=20, m=37, crops=1, dtype=torch.float32, queue_dtype=None, seed=0, **hyper
):
    """A Problem for the fused backend's seam, on DEVICE."""
    query, key, queue, include_keys = make_inputs(
        mode, n=n, d=d, m=m, crops=crops, dtype=dtype, seed=seed
    )
    query = (query if crops else query[None]).to(DEVICE)
    key = key.to(DEVICE)
    if queue is not None:
        queue = queue.to(DEVICE, queue_dtype or dtype)
    bank = key if queue is None or include_keys else None
    return Problem(loss=loss, query=query, key=key, bank=bank, queue=queue, offset=0, **hyper)


SCE = dict(coeff=0.4, temperature=0.1, target_temperature=0.05)


@pytest.mark.matrix
@pytest.mark.parametrize("name", ["info_nce", "ressl", "sce"])
def test_the_no_grad_forward_gives_the_same_losses_without_the_vector_workspace(name, mode):
    """Without a query gradient the kernels accumulate no D-vectors (NEED_GRAD) and the plan
    holds only the 7 scalars of each (split, row)."""
    hyper = dict(info_nce=dict(temperature=0.2), ressl=dict(SCE, coeff=0.0), sce=SCE)[name]
    problem = problem_of(name, mode, crops=2, **hyper)
    query = problem.query.requires_grad_()
    with_grad = fused.losses(problem)
    with torch.no_grad():
        without = fused.losses(problem)
    torch.testing.assert_close(without, with_grad.detach(), rtol=0, atol=0)

    rows, dim = query.shape[0] * query.shape[1], query.shape[2]
    options = dict(
        rows=rows,
        dim=dim,
        bank=0 if problem.bank is None else len(problem.bank),
        queue=0 if problem.queue is None else len(problem.queue),
        kind="bf16",
        key_grad=False,
    )
    for device in (devices.H100, devices.L4, plan.INTERPRETER):
        scalars_only = plan.plan(device, need_grad=False, **options)
        assert (
            scalars_only.workspace
            == 4 * rows * plan.STATE_SCALARS * scalars_only.groups[0].total_splits
        )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_float32_queue_is_rounded_to_16_bit_inputs_dtype(dtype, mode):
    """The documented behaviour: with 16-bit inputs the products run in their dtype, so a float32
    queue gives exactly the losses and gradients of that queue rounded to it."""
    if mode == "in-batch":
        pytest.skip("no queue")
    results = []
    for queue_dtype in (torch.float32, dtype):
        problem = problem_of("sce", mode, dtype=dtype, queue_dtype=torch.float32, **SCE)
        problem = dataclasses.replace(
            problem, query=problem.query.requires_grad_(), queue=problem.queue.to(queue_dtype)
        )
        losses = fused.losses(problem)
        (grad,) = torch.autograd.grad(losses.sum(), problem.query)
        results.append((losses, grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_the_queue_is_not_saved_for_the_backward(mode):
    """Updating the queue in place between the loss and its backward changes no gradient."""
    if mode == "in-batch":
        pytest.skip("no queue")
    problem = problem_of("sce", mode, **SCE)
    query, key = problem.query.requires_grad_(), problem.key.requires_grad_()
    grads = []
    for update in (False, True):
        queue = problem.queue.clone()
        live = dataclasses.replace(
            problem,
            query=query,
            key=key,
            bank=key if problem.bank is not None else None,
            queue=queue,
        )
        losses = fused.losses(live)
        if update:
            queue.mul_(-1.0)
        grads.append(torch.autograd.grad(losses.sum(), (query, key)))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_ressl_queue_mode_key_gets_zeros_from_the_fused_backend():
    problem = problem_of("ressl", "queue", **dict(SCE, coeff=0.0))
    key = problem.key.requires_grad_()
    (grad,) = torch.autograd.grad(fused.losses(problem).sum(), key)
    assert torch.equal(grad, torch.zeros_like(key))


def test_the_static_reasons_to_decline():
    """Full-precision float32 products stop at D = 128 (larger tiles spill registers)."""
    problem = problem_of("sce", "queue", d=200, **SCE)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert "D ≤ 128" in fused.unsupported_reason(problem)
        torch.set_float32_matmul_precision("high")
        assert fused.unsupported_reason(problem) is None
    finally:
        torch.set_float32_matmul_precision(before)
    assert (
        fused.unsupported_reason(problem_of("sce", "queue", d=200, dtype=torch.bfloat16, **SCE))
        is None
    )
    wide = problem_of("sce", "queue", d=300, **SCE)
    assert "D ≤ 256, got D=300" in fused.unsupported_reason(wide)
    double = problem_of("sce", "queue", dtype=torch.float64, **SCE)
    assert "got torch.float64" in fused.unsupported_reason(double)


# -- both of PyTorch's float32 precision switches ------------------------------------------------

NEW_PRECISION_API = hasattr(torch.backends, "fp32_precision")  # torch ≥ 2.9
PRECISION_SCRIPT = """
import torch
{setting}
import sce_loss.functional as functional
from sce_loss import sce_loss
from sce_loss.check import _matmul_precision
from sce_loss.fused import plan

assert plan.kind_of(torch.float32) == {kind!r}, plan.kind_of(torch.float32)
g = torch.Generator().manual_seed(0)
q, k, queue = (torch.nn.functional.normalize(torch.randn(n, 16, generator=g), dim=1)
               for n in (6, 6, 40))
want = sce_loss(q, k, queue, include_keys=True, backend="reference")
functional._fused_first = lambda device: True  # auto's CUDA branch: the first-use check
compiled = torch.compile(lambda *x: sce_loss(*x, include_keys=True), fullgraph=True,
                         backend="aot_eager")
for got in (sce_loss(q, k, queue, include_keys=True, backend="fused"),
            sce_loss(q, k, queue, include_keys=True), compiled(q, k, queue)):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
for products in ("fp32-ieee", "fp32-tf32"):  # sce-loss-check's switch, restored after
    with _matmul_precision(products):
        assert plan.kind_of(torch.float32) == products
    assert plan.kind_of(torch.float32) == {kind!r}
print("ok")
"""


@pytest.mark.parametrize(
    "setting, kind",
    [
        ("torch.backends.cuda.matmul.fp32_precision = 'tf32'", "fp32-tf32"),
    ]
    + [
        pytest.param(*case, marks=pytest.mark.slow)
        for case in (
            ("torch.backends.cuda.matmul.allow_tf32 = True", "fp32-tf32"),
            (
                "torch.backends.cuda.matmul.allow_tf32 = True; "
                "torch.backends.cuda.matmul.fp32_precision = 'none'",
                "fp32-tf32",
            ),
            ("torch.backends.cuda.matmul.fp32_precision = 'ieee'", "fp32-ieee"),
            ("torch.backends.fp32_precision = 'tf32'", "fp32-tf32"),
            ("torch.backends.cuda.matmul.allow_tf32 = False", "fp32-ieee"),
            ("torch.set_float32_matmul_precision('high')", "fp32-tf32"),
            ("torch.set_float32_matmul_precision('highest')", "fp32-ieee"),
            ("", "fp32-ieee"),
        )
    ],
)
def test_every_float32_precision_switch_is_read_without_error(setting, kind):
    """Since torch 2.9 reading the legacy flag after the new switch was set raises ("mix of the
    legacy and new APIs"): the kind, the first-use check, a compiled step and sce-loss-check's
    own switch work under either, each setting in a fresh process."""
    if "fp32_precision" in setting and not NEW_PRECISION_API:
        pytest.skip(f"torch {torch.__version__} has only the legacy switch")
    script = PRECISION_SCRIPT.format(setting=setting, kind=kind)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
