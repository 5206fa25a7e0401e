"""The fused kernels against the reference: values and gradients, every loss, mode and dtype.

Without a GPU the real kernels run on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1),
on small ragged shapes (N, M and D not multiples of the tiles, several column splits); with CUDA
they run compiled on the GPU. (The interpreter needs Triton ≥ 3.8 with NumPy ≥ 2.4.)
"""

import pytest
import torch

from conftest import make_inputs
from sce_loss import info_nce_loss, ressl_loss, sce_loss

pytest.importorskip("triton", reason="the fused backend needs Triton (pip install '.[triton]')")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

LOSSES = {
    "infonce": (info_nce_loss, dict(temperature=0.2)),
    "ressl": (ressl_loss, dict(temperature=0.1, target_temperature=0.04)),
    "sce": (sce_loss, dict(coeff=0.4, temperature=0.1, target_temperature=0.05)),
}
# Relative error bars: float32 with full-precision products; 16-bit operands on tensor cores.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 1e-2}
SHAPES = [(19, 37, 20), (5, 150, 8)]  # (N, M, D): 2 row blocks x 3 column blocks; 1 x 10 with 4 splits


def relative_error(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def run(fn, backend, query, key, queue, hyper, include_keys, temperature):
    query = query.detach().requires_grad_()
    key = key.detach().requires_grad_()
    temperature = temperature.detach().requires_grad_()
    losses = fn(query, key, queue, include_keys=include_keys, reduction="none", backend=backend,
                **(hyper | dict(temperature=temperature)))
    weights = torch.linspace(0.5, 1.5, losses.numel(), device=losses.device).view(losses.shape)
    (losses * weights).sum().backward()  # a non-uniform upstream gradient
    return losses.detach(), query.grad, key.grad, temperature.grad


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
        rtol=0, atol=0)


def test_fused_op_registration_passes_opcheck():
    """Fake tensor, schema and autograd registration, as torch.compile relies on them."""
    from sce_loss.fused.ops import fused_forward

    query, key, queue, _ = make_inputs("queue+keys", n=6, d=8, m=11, dtype=torch.float32)
    args = (query.to(DEVICE).requires_grad_(), key.to(DEVICE).requires_grad_(), key.to(DEVICE),
            queue.to(DEVICE), 0, 0.5, 0.1, 0.05, True, True, True)
    torch.library.opcheck(fused_forward, args, test_utils=("test_schema", "test_faketensor",
                                                           "test_autograd_registration"))


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
    with pytest.raises(ValueError, match="backend must be 'auto', 'reference' or 'fused', got 'fast'"):
        sce_loss(query, key, queue, backend="fast")
    with pytest.raises(ValueError, match="backend='fused' cannot run here: .*float64"):
        sce_loss(query.to(DEVICE), key.to(DEVICE), queue.to(DEVICE), backend="fused")
    wide = make_inputs("queue", d=300, dtype=torch.float32)
    with pytest.raises(ValueError, match="D ≤ 256, got D=300"):
        sce_loss(*(x.to(DEVICE) for x in wide[:3]), backend="fused")
    # auto on CPU tensors is the reference, bit for bit.
    cpu = make_inputs("queue", dtype=torch.float32)[:3]
    assert torch.equal(sce_loss(*cpu), sce_loss(*cpu, backend="reference"))
