"""Bad input raises a clear error naming the argument; inputs are never mutated."""

from fractions import Fraction

import numpy as np
import pytest
import torch
from conftest import make_inputs, unit

from sce_loss import info_nce_loss, ressl_loss, sce_loss

q, k, Q = (
    unit(4, 8, dtype=torch.float32),
    unit(4, 8, dtype=torch.float32),
    unit(6, 8, dtype=torch.float32),
)
nan = q.clone()
nan[1, 2] = float("nan")
inf = Q.clone()
inf[0, 0] = float("inf")

BAD = [
    (dict(query=q.numpy()), TypeError, "query must be a torch.Tensor"),
    (dict(key=[1.0]), TypeError, "key must be a torch.Tensor"),
    (dict(queue="queue"), TypeError, "queue must be a torch.Tensor"),
    (dict(query=q.long()), TypeError, "query must be float64, float32, bfloat16 or float16"),
    (dict(query=q.to_sparse()), TypeError, "query must be a dense"),
    (dict(query=q[0]), ValueError, r"query must be \(N, D\) or \(V, N, D\), got shape \(8,\)"),
    (dict(key=k[None]), ValueError, r"key must be \(N, D\)"),
    (
        dict(key=k[:3]),
        ValueError,
        r"query rows and dim \(4, 8\) must match key's \(N, D\) \(3, 8\)",
    ),
    (dict(key=unit(4, 7, dtype=torch.float32)), ValueError, "must match key's"),
    (dict(queue=unit(6, 7, dtype=torch.float32)), ValueError, r"queue must be \(M, D\) with D=8"),
    (dict(queue=Q[0]), ValueError, r"queue must be \(M, D\) with D=8, got shape \(8,\)"),
    (dict(queue=Q[None]), ValueError, r"queue must be \(M, D\) with D=8, got shape \(1, "),
    (dict(query=q[:0], key=k[:0]), ValueError, "must be non-empty"),
    (
        dict(key=k.double()),
        TypeError,
        "key must have query's dtype torch.float32, got torch.float64",
    ),
    (dict(query=nan), ValueError, "query must be finite"),
    (dict(queue=inf), ValueError, "queue must be finite"),
    (dict(query=q[:1], key=k[:1], queue=None), ValueError, "at least one negative.* 1 in-batch"),
    (dict(queue=Q[:0]), ValueError, "at least one negative: the queue is empty and include_keys"),
    (dict(reduction="avg"), ValueError, "reduction must be one of .* got 'avg'"),
    (dict(temperature=0.0), ValueError, "temperature must be a finite number ≥ 0.0001, got 0.0"),
    (dict(temperature=-1), ValueError, "temperature must be a finite number ≥ 0.0001"),
    (dict(temperature=float("nan")), ValueError, "temperature must be a finite number ≥ 0.0001"),
    (
        dict(temperature="0.1"),
        TypeError,
        "temperature must be a float or a 0-d float tensor, got str",
    ),
    (dict(temperature=torch.tensor([0.1])), TypeError, "temperature must be a float or a 0-d"),
    (
        dict(temperature=torch.tensor(-0.1)),
        ValueError,
        "temperature must be a finite number ≥ 0.0001",
    ),
    (
        dict(temperature=1e-39),
        ValueError,
        "temperature must be a finite number ≥ 0.0001, got 1e-39",
    ),
    (dict(temperature=torch.tensor(5e-5)), ValueError, "temperature must be a finite number ≥"),
    (dict(temperature=Fraction(1, 10)), TypeError, "temperature must be a float .* got Fraction"),
    (
        dict(temperature=torch.tensor(0.1, device="meta")),
        ValueError,
        "temperature must be on the inputs' device cpu or the CPU, got meta",
    ),
    (dict(reduction=np.array(["mean", "sum"])), ValueError, "reduction must be one of"),
    (dict(include_keys=1), TypeError, "include_keys must be a bool"),
    (dict(normalize="no"), TypeError, "normalize must be a bool, got str"),
    (dict(backend="triton"), ValueError, "backend must be one of .* got 'triton'"),
    (dict(gather="yes"), TypeError, "gather must be a bool or a torch.distributed.ProcessGroup"),
    (dict(gather=None), TypeError, r"gather must be .* \(True: the default group\), got NoneType"),
]
TARGETED = [
    (dict(target_temperature=1e-39), ValueError, "target_temperature must be a finite number ≥"),
    (
        dict(target_temperature=0.0),
        ValueError,
        "target_temperature must be a finite number ≥ 0.0001",
    ),
    (
        dict(query=q[:1], key=k[:1], queue=Q[:0], include_keys=True),
        ValueError,
        "at least one negative",
    ),
]
SCE_ONLY = [
    (dict(coeff=1.5), ValueError, r"coeff must be in \[0, 1\], got 1.5"),
    (dict(coeff=-0.1), ValueError, r"coeff must be in \[0, 1\]"),
    (dict(coeff=True), TypeError, "coeff must be a float or a 0-d float tensor, got bool"),
]


def call(fn, overrides):
    arguments = dict(query=q, key=k, queue=Q) | overrides
    return fn(arguments.pop("query"), arguments.pop("key"), arguments.pop("queue"), **arguments)


@pytest.mark.parametrize("overrides, error, message", BAD)
@pytest.mark.parametrize("fn", [info_nce_loss, ressl_loss, sce_loss])
def test_bad_input_raises_a_clear_error(fn, overrides, error, message):
    with pytest.raises(error, match=message):
        call(fn, overrides)


@pytest.mark.parametrize("overrides, error, message", TARGETED)
@pytest.mark.parametrize("fn", [ressl_loss, sce_loss])
def test_bad_target_input_raises_a_clear_error(fn, overrides, error, message):
    with pytest.raises(error, match=message):
        call(fn, overrides)


@pytest.mark.parametrize("overrides, error, message", SCE_ONLY)
def test_bad_coeff_raises_a_clear_error(overrides, error, message):
    with pytest.raises(error, match=message):
        call(sce_loss, overrides)


def test_queue_on_another_device_is_refused():
    with pytest.raises(ValueError, match="queue must be on query's device"):
        sce_loss(q, k, Q.to("meta"))


@pytest.mark.parametrize("fn", [info_nce_loss, ressl_loss, sce_loss])
@pytest.mark.parametrize("normalize", [False, True])
def test_inputs_are_unchanged_bit_for_bit(fn, normalize, mode):
    inputs = make_inputs(mode, crops=2, dtype=torch.float32, seed=10)
    query, key, queue, include_keys = (
        x * 2.5 if isinstance(x, torch.Tensor) else x for x in inputs
    )
    query.requires_grad_()
    key.requires_grad_()
    before = [None if x is None else x.detach().clone() for x in (query, key, queue)]
    fn(query, key, queue, include_keys=include_keys, normalize=normalize).backward()
    for x, was in zip((query, key, queue), before):
        assert x is None or torch.equal(x.detach(), was)


@pytest.mark.parametrize("fn", [info_nce_loss, ressl_loss, sce_loss])
def test_numpy_and_integer_hyper_parameters_are_numbers(fn):
    """A NumPy float32 τ (what a NumPy schedule yields) or an int τ means its value."""
    want = call(fn, dict(temperature=0.25))
    torch.testing.assert_close(call(fn, dict(temperature=np.float32(0.25))), want, rtol=0, atol=0)
    torch.testing.assert_close(call(fn, dict(temperature=np.float64(0.25))), want, rtol=0, atol=0)
    torch.testing.assert_close(call(fn, dict(temperature=1)), call(fn, dict(temperature=1.0)))


@pytest.mark.parametrize("fn", [info_nce_loss, ressl_loss, sce_loss])
def test_the_smallest_temperature_passes_in_float32_too(fn):
    """τ = 1e-4 is allowed however it is given: a float, a float32 tensor or NumPy float32."""
    for temperature in (1e-4, torch.tensor(1e-4), np.float32(1e-4)):
        assert torch.isfinite(call(fn, dict(temperature=temperature)))


@pytest.mark.parametrize(
    "temperature, message",
    [
        (
            torch.full((4, 1), 0.1),
            r"temperature must be a float or a 0-d float tensor, got .* \(4, 1\)",
        ),
        (torch.tensor(1), "temperature must be a float or a 0-d float tensor, got a torch.int64"),
        (True, "temperature must be a float or a 0-d float tensor, got bool"),
        ("0.1", "temperature must be a float or a 0-d float tensor, got str"),
    ],
)
def test_hyper_parameters_of_the_wrong_type_are_refused_under_compile_too(temperature, message):
    """Types and shapes are known without reading a value: checked while compiling as well."""
    query, key = unit(4, 8, dtype=torch.float32), unit(4, 8, dtype=torch.float32)
    torch._dynamo.reset()
    step = torch.compile(lambda q, k, t: sce_loss(q, k, temperature=t), backend="aot_eager")
    with pytest.raises(TypeError, match=message):
        step(query, key, temperature)


def test_a_cpu_temperature_tensor_serves_inputs_on_another_device():
    """A 0-d τ on the CPU with inputs elsewhere (here the meta device, standing in for a GPU) is
    accepted, as PyTorch accepts CPU scalars beside device tensors; a τ on a third device is not."""
    query, key = torch.randn(4, 8, device="meta"), torch.randn(4, 8, device="meta")
    assert sce_loss(query, key, temperature=torch.tensor(0.1)).device.type == "meta"
    on_meta = torch.tensor(0.1, device="meta")
    with pytest.raises(ValueError, match="temperature must be on the inputs' device cpu or the"):
        sce_loss(
            unit(4, 8, dtype=torch.float32), unit(4, 8, dtype=torch.float32), temperature=on_meta
        )
