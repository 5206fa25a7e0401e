"""nearest_neighbours: support[argmax_j query·support_j], streamed over the support, no gradient."""

import pytest
import torch
import torch.nn.functional as F
from conftest import unit
from hypothesis import given
from hypothesis import strategies as st

from sce_loss import MemoryQueue, nearest_neighbours
from sce_loss.neighbours import nearest_indices


def materialised(query, support):
    """solo-learn's NNCLR find_nn: idx = (z @ queue.T).max(dim=1)[1]; nn = queue[idx]."""
    index = (query.double() @ support.double().T).max(dim=1)[1]
    return support[index], index


@given(
    n=st.integers(1, 9),
    m=st.integers(1, 40),
    chunk=st.integers(1, 17),
    seed=st.integers(0, 2**16),
)
def test_streaming_equals_the_materialised_argmax_at_every_chunk_width(n, m, chunk, seed):
    g = torch.Generator().manual_seed(seed)
    query, support = unit(n, 6, generator=g), unit(m, 6, generator=g)
    _, want = materialised(query, support)
    assert torch.equal(nearest_indices(query, support, chunk_size=chunk), want)


def test_ties_keep_the_first_row_across_chunks():
    support = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    for chunk in (1, 2, 3, 4):
        assert nearest_indices(query, support, chunk_size=chunk).tolist() == [1, 0]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_rows_of_a_memory_queue_without_gradient_in_its_dtype(dtype):
    queue = MemoryQueue(50, 8, dtype=torch.float32, seed=3)
    query = F.normalize(torch.randn(7, 8, dtype=torch.float64), dim=1).to(dtype).requires_grad_()
    rows, index = nearest_neighbours(query, queue.keys, return_indices=True)
    assert rows.dtype == torch.float32 and not rows.requires_grad and index.dtype == torch.int64
    torch.testing.assert_close(rows, queue.keys[index], rtol=0, atol=0)
    want_rows, want = materialised(query.detach().float(), queue.keys)
    assert torch.equal(index, want) and torch.equal(rows, want_rows)
    assert torch.equal(nearest_neighbours(query, queue.keys), rows)


def test_it_compiles_fullgraph_as_one_opaque_op():
    query, support = unit(6, 8), unit(30, 8)
    compiled = torch.compile(nearest_neighbours, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(query, support), nearest_neighbours(query, support))
    torch.library.opcheck(
        nearest_indices,
        (query, support),
        dict(chunk_size=7),
        test_utils=("test_schema", "test_faketensor"),
    )


@pytest.mark.parametrize(
    "args, error, message",
    [
        ((unit(3, 4), unit(5, 6)), ValueError, r"support must be \(M, 4\)"),
        ((unit(3, 4), unit(0, 4)), ValueError, r"support must be a non-empty \(rows, D\)"),
        ((unit(4), unit(5, 4)), ValueError, r"query must be a non-empty \(rows, D\)"),
        ((unit(3, 4), [[0.0] * 4]), TypeError, "support must be a torch.Tensor"),
        ((unit(3, 4).long(), unit(5, 4)), TypeError, "query must be float64, float32"),
        ((unit(3, 4) * float("nan"), unit(5, 4)), ValueError, "query must be finite"),
        (
            (unit(3, 4), unit(5, 4, dtype=torch.float32).to("meta")),
            ValueError,
            "support must be on query's device cpu, got meta",
        ),
    ],
)
def test_bad_inputs_name_the_argument(args, error, message):
    with pytest.raises(error, match=message):
        nearest_neighbours(*args)
    with pytest.raises(TypeError, match="return_indices must be a bool"):
        nearest_neighbours(unit(3, 4), unit(5, 4), return_indices=1)
