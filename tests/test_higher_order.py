"""One semantics on every path beyond first-order eager autograd: a gradient penalty
(create_graph=True), gradgradcheck, and torch.func's grad, vjp, jacrev and vmap give the
reference's numbers through whatever backend ``auto`` picks, and through each backend forced."""

import pytest
import torch
from conftest import HAS_FUSED, make_inputs, needs_fused, unit

from sce_loss import info_nce_loss, interpolated_key, ressl_loss, sce_loss
from sce_loss.functional import _backend
from sce_loss.problem import DEFAULT_HYPER_PARAMETERS, TORCH_VERSION, Problem

FUNCTIONS = {"info_nce": info_nce_loss, "ressl": ressl_loss, "sce": sce_loss}
MODES = {
    "queue": dict(include_keys=False),
    "queue+keys": dict(include_keys=True),
    "in-batch": dict(),
    "symmetric": dict(symmetric=True),
}


def inputs(mode, n, d, m, dtype=torch.float64, seed=0):
    """(query, key, queue): the queue is None where ``mode`` takes none."""
    query, key, queue, _ = make_inputs("queue", n=n, d=d, m=m, dtype=dtype, seed=seed)
    queue = queue if mode.startswith("queue") else None
    return query.requires_grad_(), key.requires_grad_(), queue


def penalised_gradients(loss, mode, backend, query, key, queue):
    """Gradients of loss + 10·‖∂loss/∂query‖² (a gradient penalty) w.r.t. query and key."""
    value = FUNCTIONS[loss](query, key, queue, backend=backend, **MODES[mode])
    (grad,) = torch.autograd.grad(value, query, create_graph=True)
    return torch.autograd.grad(value + 10 * grad.square().sum(), (query, key), allow_unused=True)


@pytest.mark.parametrize("loss", FUNCTIONS)
def test_a_gradient_penalty_through_auto_is_the_references(loss):
    """N=64, D=32, M=4096: auto streams (chunked) on this CPU."""
    query, key, queue = inputs("queue", 64, 32, 4096, dtype=torch.float32)
    problem = Problem(
        loss=loss,
        query=query[None],
        key=key,
        bank=None,
        queue=queue,
        offset=0,
        **DEFAULT_HYPER_PARAMETERS["sce"],
    )
    assert _backend("auto", problem).__name__ == "sce_loss.chunked"
    got = penalised_gradients(loss, "queue", "auto", query, key, queue)
    want = penalised_gradients(loss, "queue", "reference", query, key, queue)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss", FUNCTIONS)
@pytest.mark.parametrize("mode", MODES)
def test_a_gradient_penalty_through_chunked_is_the_references(loss, mode):
    query, key, queue = inputs(mode, 6, 5, 9, seed=1)
    got = penalised_gradients(loss, mode, "chunked", query, key, queue)
    want = penalised_gradients(loss, mode, "reference", query, key, queue)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize(
    "loss, mode",
    [("info_nce", m) for m in ("queue", "in-batch", "symmetric")]
    + [("sce", m) for m in ("queue", "in-batch")],
)
def test_gradgradcheck(backend, loss, mode):
    """Over every input the loss is a differentiable function of: InfoNCE's query, key and τ;
    SCE's query and τ (its key also shapes the stop-gradient target, which a numerical
    derivative would see and autograd, by definition, does not)."""
    query, key, queue = inputs(mode, 4, 3, 5, seed=2)
    temperature = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    options = dict(reduction="none", backend=backend, temperature=temperature)
    if mode == "symmetric":
        options["symmetric"] = True
    if loss == "info_nce":
        leaves = (query, key, temperature)

        def function(query, key, temperature):
            return info_nce_loss(query, key, queue, **{**options, "temperature": temperature})

    else:
        leaves = (query, temperature)

        def function(query, temperature):
            options.update(temperature=temperature, target_temperature=0.2)
            return sce_loss(query, key.detach(), queue, **options)

    assert torch.autograd.gradgradcheck(function, leaves)


@needs_fused
@pytest.mark.parametrize("loss", FUNCTIONS)
@pytest.mark.parametrize("mode", ["queue", "in-batch"])
def test_a_gradient_penalty_through_the_fused_kernels_is_the_references(loss, mode):
    """Through Triton's interpreter on the CPU (the real kernels), float32."""
    query, key, queue = inputs(mode, 5, 8, 7, dtype=torch.float32, seed=3)
    got = penalised_gradients(loss, mode, "fused", query, key, queue)
    want = penalised_gradients(loss, mode, "reference", query, key, queue)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_a_queue_updated_before_a_differentiated_backward_raises():
    query, key, queue = inputs("queue", 4, 3, 5, seed=4)
    queue = queue.clone()
    value = sce_loss(query, key, queue, backend="chunked")
    queue.neg_()
    with pytest.raises(RuntimeError, match="backend='reference'"):
        torch.autograd.grad(value, query, create_graph=True)


# -- torch.func ---------------------------------------------------------------------------------


@pytest.mark.parametrize("m", [1000, 1024])
def test_func_grad_on_both_sides_of_the_auto_switch(m):
    """N=256, D=128: auto takes the reference at M=1000 and chunked at M=1024."""
    query, key, queue = inputs("queue", 256, 128, m, torch.float32, 5)
    query, key = query.detach(), key.detach()
    problem = Problem(
        loss="sce",
        query=query[None],
        key=key,
        bank=None,
        queue=queue,
        offset=0,
        **DEFAULT_HYPER_PARAMETERS["sce"],
    )
    expected = "sce_loss.reference" if m < 1024 else "sce_loss.chunked"
    assert _backend("auto", problem).__name__ == expected
    got = torch.func.grad(lambda q: sce_loss(q, key, queue))(query)
    want = torch.autograd.grad(sce_loss(query.requires_grad_(), key, queue), query)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_forward_mode_ad_on_both_sides_of_the_auto_switch():
    """Dual tensors (torch.autograd.forward_ad) compute through the reference on every backend:
    the directional derivative of the loss at N=64, D=32, M=4096, where auto takes chunked."""
    import torch.autograd.forward_ad as forward_ad

    query, key, queue = inputs("queue", 64, 32, 4096, torch.float64, 7)
    query = query.detach()
    tangent = torch.randn_like(query)
    derivatives = {}
    for backend in ("auto", "chunked", "reference"):
        with forward_ad.dual_level():
            loss = sce_loss(forward_ad.make_dual(query, tangent), key, queue, backend=backend)
            derivatives[backend] = forward_ad.unpack_dual(loss).tangent
    q = query.clone().requires_grad_()
    (gradient,) = torch.autograd.grad(sce_loss(q, key, queue, backend="reference"), q)
    want = (gradient * tangent).sum()
    for backend, got in derivatives.items():
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=backend)


BACKENDS = ["auto", "reference", "chunked"] + (["fused"] if HAS_FUSED else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["queue", "in-batch", "symmetric"])
def test_func_grad_vjp_jacrev_and_vmap_on_every_backend(backend, mode):
    if backend == "fused" and mode == "symmetric":
        pytest.skip("the fused kernels decline the symmetric form")
    query, key, queue = inputs(mode, 4, 6, 5, torch.float32, 6)
    query, key = query.detach(), key.detach()
    options = dict(backend=backend, **({"symmetric": True} if mode == "symmetric" else {}))

    def per_row(q, k):
        return sce_loss(q, k, queue, reduction="none", **options)

    want_rows = per_row(query, key)
    q, k = query.clone().requires_grad_(), key.clone().requires_grad_()
    want_grads = torch.autograd.grad(per_row(q, k).sum(), (q, k))
    want_jacobian = torch.autograd.functional.jacobian(lambda q: per_row(q, key), query)

    got_grads = torch.func.grad(lambda q, k: per_row(q, k).sum(), argnums=(0, 1))(query, key)
    rows, vjp = torch.func.vjp(per_row, query, key)
    got_vjp = vjp(torch.ones_like(rows))
    got_jacobian = torch.func.jacrev(lambda q: per_row(q, key))(query)
    batch = torch.stack([query, query.flip(0)])
    got_vmap = torch.func.vmap(lambda q: per_row(q, key))(batch)
    tolerance = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rows, want_rows, **tolerance)
    for got in (got_grads, got_vjp):
        for g, w in zip(got, want_grads):
            torch.testing.assert_close(g, w, **tolerance)
    torch.testing.assert_close(got_jacobian, want_jacobian, **tolerance)
    torch.testing.assert_close(got_vmap[0], want_rows, **tolerance)
    torch.testing.assert_close(got_vmap[1], per_row(query.flip(0), key), **tolerance)


def test_value_checks_are_skipped_under_vmap_as_under_compile():
    """A batched tensor cannot be read on the host: vmap over a NaN gives NaN, as compile does;
    eager calls still refuse it."""
    query, key = unit(2, 4, 3), unit(4, 3)
    query[1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        sce_loss(query[1], key)
    rows = torch.func.vmap(lambda q: sce_loss(q, key))(query)
    assert torch.isfinite(rows[0]) and torch.isnan(rows[1])


def test_reco_interpolated_key_under_vmap_over_its_ratio_and_index():
    """The value checks of ``ratio`` and ``index`` are skipped under vmap (they cannot be read on
    the host there), and each batch entry is the eager call's."""
    query, key = unit(4, 3), unit(4, 3, generator=torch.Generator().manual_seed(1))
    ratios = torch.rand(3, 4, generator=torch.Generator().manual_seed(2))
    indices = torch.stack(
        [torch.randperm(4, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    )
    by_ratio = torch.func.vmap(lambda r: interpolated_key(query, key, indices[0], r))(ratios)
    by_index = torch.func.vmap(lambda i: interpolated_key(query, key, i, ratios[0]))(indices)
    for b in range(3):
        torch.testing.assert_close(by_ratio[b], interpolated_key(query, key, indices[0], ratios[b]))
        torch.testing.assert_close(by_index[b], interpolated_key(query, key, indices[b], ratios[0]))


@needs_fused
@pytest.mark.parametrize("loss", FUNCTIONS)
@pytest.mark.parametrize("mode", ["in-batch", "queue+keys"])
def test_a_penalty_on_the_keys_gradient_through_fused_is_the_references(loss, mode):
    """The key is a row of the bank (often the same tensor): its gradient is counted once. (In
    float32, second-order terms reach the hundreds: the bar is relative to their scale.)"""

    def penalised(backend):
        query, key, queue = inputs(mode, 4, 8, 6, dtype=torch.float32, seed=7)
        value = FUNCTIONS[loss](query, key, queue, backend=backend, **MODES[mode])
        grad_q, grad_k = torch.autograd.grad(value, (query, key), create_graph=True)
        penalty = value + 10 * (grad_q.square().sum() + grad_k.square().sum())
        return grad_k, *torch.autograd.grad(penalty, (query, key))

    for got, want in zip(penalised("fused"), penalised("reference")):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_func_grad_inside_torch_compile_gets_the_temperatures_gradient():
    """Inside torch.compile a torch.func transform is not routed to the reference: the chunked
    backend's own autograd must then still give dL/dτ (not 0)."""
    query, key, queue = inputs("queue", 6, 8, 20, torch.float32, 8)
    query = query.detach()
    tau = torch.tensor(0.2)

    def loss(q, t):
        return sce_loss(q, key, queue, temperature=t, backend="chunked")

    torch._dynamo.reset()
    compiled = torch.compile(torch.func.grad(loss, argnums=(0, 1)), backend="aot_eager")
    if TORCH_VERSION < (2, 11):  # docs/compatibility.md: dynamo's own error there
        with pytest.raises(Exception, match="setup_context"):
            compiled(query, tau)
        return
    got = compiled(query, tau)
    q, t = query.clone().requires_grad_(), tau.clone().requires_grad_()
    want = torch.autograd.grad(sce_loss(q, key, queue, temperature=t, backend="reference"), (q, t))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
