"""Which backend ``backend="auto"`` picks off the GPU: the chunked stream against a large queue
(at least functional.CHUNKED_FROM_PAIRS row-candidate pairs), the reference otherwise."""

import pytest
import torch

from sce_loss import chunked, functional, reference
from sce_loss.problem import Problem


def problem(n, m, crops=1, include_keys=False):
    query, key = torch.zeros(crops, n, 4), torch.zeros(n, 4)
    queue = None if m is None else torch.zeros(m, 4)
    bank = key if queue is None or include_keys else None
    return Problem("sce", query, key, bank, queue, 0, 0.1, 0.05, 0.5)


@pytest.mark.parametrize(
    "case, want",
    [
        (problem(256, 4094), reference),  # 256 rows × 4095 candidates < 2^20 pairs
        (problem(256, 4095), chunked),  # 256 × 4096 = 2^20
        (problem(128, 4095, crops=2), chunked),  # crops count as rows
        (problem(256, 4096 - 256, include_keys=True), chunked),  # bank + queue: 4096 candidates
        (problem(4096, None), reference),  # in-batch: the reference at every measured size
    ],
)
def test_auto_streams_against_a_large_queue(case, want):
    assert functional._backend("auto", case) is want


def test_named_backends_are_taken_as_named():
    small = problem(4, 8)
    assert functional._backend("chunked", small) is chunked
    assert functional._backend("reference", problem(4096, 4096)) is reference
