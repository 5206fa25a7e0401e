"""CPU benchmarks of the reference path, eager against torch.compile in the same run.

    python -m pytest benchmarks/test_cpu.py --benchmark-only --benchmark-group-by=param:shape \
        --benchmark-columns=median,min,max,rounds   # as committed: results/cpu.md

Each case times forward + backward of the mean loss on unit vectors in queue mode.
"""

import functools

import pytest
import torch
import torch.nn.functional as F

from sce_loss import info_nce_loss, ressl_loss, sce_loss

LOSSES = {"sce": sce_loss, "infonce": info_nce_loss, "ressl": ressl_loss}
SHAPES = {"N256-D128-M4096": (256, 128, 4096), "N256-D128-M16384": (256, 128, 16384)}


def _compiled(fn):
    return torch.compile(functools.partial(fn, backend="reference"))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("mode", ["eager", "compile"])
def test_forward_backward(benchmark, loss, shape, mode):
    n, d, m = SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    query = F.normalize(torch.randn(n, d, generator=g), dim=1).requires_grad_()
    key = F.normalize(torch.randn(n, d, generator=g), dim=1)
    queue = F.normalize(torch.randn(m, d, generator=g), dim=1)
    fn = LOSSES[loss] if mode == "eager" else _compiled(LOSSES[loss])

    def step():
        query.grad = None
        fn(query, key, queue).backward()

    step()  # compile / warm up outside the timing
    benchmark.pedantic(step, rounds=10, warmup_rounds=2)
    assert torch.isfinite(query.grad).all()
