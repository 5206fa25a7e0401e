"""The launch plan of the fused kernels: tiles, warps, stages, splits, row groups and grids for one
device.

A pure function of a device description and a problem's sizes, so every plan can be computed (and
compiled, tests/compile_kernels.py) without a GPU. The rules:

- Tiles keep each kernel within the device's shared memory per block and its 255 registers per
  thread without spilling: the partial-stats kernel holds two D-wide float32 accumulators per row
  (O_a, O_b) besides its operands, so wider D takes fewer rows or more warps (``PARTIAL_TILES``,
  checked for sm_80, sm_86, sm_89 and sm_90 by tests/compile_kernels.py).
- Splits: each candidate segment (key bank, queue) has its own launch, whose columns are split
  until that launch alone holds two programs per SM (at least one where the workspace is short),
  within a workspace of 64 MiB that does not grow with the number of candidates M. One split
  costs 4·R·(2D+7) bytes for R rows with the query gradient, 4·R·7 without.
- Row groups: when the rows are so many that even one split per segment passes the workspace
  (4·R·(2D+7) bytes per segment: beyond R = V·N = 16,163 rows at D = 256 with in-batch keys and
  a queue, 32,326 with one segment), or that the splits filling the device do not fit, the rows are
  launched in groups, one after the other in the same workspace: the fewest groups of whole crops
  that fit, else each crop in equal parts. Each group's launches still fill the device.
- The key-gradient pass (over the N×N bank) splits its rows the same way, each split writing a
  (B, D) float32 slice that is summed afterwards (in the backward, after the forward's workspace
  is freed).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..problem import constant_while_tracing

KINDS = ("fp32-ieee", "fp32-tf32", "bf16", "fp16")
DTYPES = {
    "fp32-ieee": torch.float32,
    "fp32-tf32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
PRECISIONS = {"fp32-ieee": "tf32x3", "fp32-tf32": "tf32", "bf16": None, "fp16": None}
WORKSPACE_BYTES = 64 << 20
PROGRAMS_PER_SM = 2
STATE_SCALARS = 7  # per (split, row): m_a, l_a, g_a, m_b, l_b, g_b, a_pos (g: gaps)


@dataclass(frozen=True)
class Device:
    """What the plan needs to know of a GPU: its SM count and the shared memory one block may use
    (the opt-in maximum, in bytes)."""

    name: str
    sms: int
    shared_memory: int


# Triton's interpreter (TRITON_INTERPRET=1, CPU tensors): the smallest tiles, so small test shapes
# still cover several row, column and split blocks.
INTERPRETER = Device("Triton interpreter", 2, 0)


def device_of(device: torch.device) -> Device:
    """The description of a CUDA device (or of the interpreter for any other device)."""
    if device.type != "cuda":
        return INTERPRETER
    properties = torch.cuda.get_device_properties(device)
    return Device(
        properties.name,
        properties.multi_processor_count,
        properties.shared_memory_per_block_optin,  # type: ignore[attr-defined]  # not in stubs
    )


@dataclass(frozen=True)
class Tiles:
    """A kernel's block sizes (rows, columns, dimensions), warps and software-pipeline stages."""

    block_r: int
    block_c: int
    block_d: int
    num_warps: int = 4
    num_stages: int = 2


@dataclass(frozen=True)
class Launch:
    """One kernel launch: its tiles, grid, and the blocks each program streams (columns of a split
    for the partial-stats kernel, rows of a split for the key-gradient kernel)."""

    kernel: str
    tiles: Tiles
    grid: tuple[int, ...]
    blocks_per_program: int

    @property
    def span(self) -> int:
        """Columns (partial stats) or rows (key gradient) of one split."""
        step = self.tiles.block_r if self.kernel == "key_gradient" else self.tiles.block_c
        return self.blocks_per_program * step


@dataclass(frozen=True)
class RowGroup:
    """Rows [start, stop) of the flattened query, launched together: one partial-stats launch per
    candidate segment, then the finalize launch. Row r's key is K[key_start + (r − start) mod keys]
    (whole crops: key_start 0 and keys N; part of one crop: those rows' own keys)."""

    start: int
    stop: int
    key_start: int
    keys: int
    partial: tuple[Launch, ...]
    finalize: Launch

    @property
    def rows(self) -> int:
        return self.stop - self.start

    @property
    def total_splits(self) -> int:
        return sum(launch.grid[1] for launch in self.partial)


@dataclass(frozen=True)
class Plan:
    """The launches of one loss evaluation: the row groups (one in all but the largest problems),
    each with one partial-stats launch per candidate segment (key bank, queue) and its finalize
    launch; the key-gradient launch (None without a key bank or when no key gradient is needed);
    and the bytes of workspace they use (the groups run one after the other in the same bytes)."""

    groups: tuple[RowGroup, ...]
    key_gradient: Launch | None
    workspace: int

    @property
    def partial_states(self) -> int:
        """The most (row, split) partial states of any row group: what the workspace holds."""
        return max(group.rows * group.total_splits for group in self.groups)


def kind_of(dtype: torch.dtype) -> str:
    """The input kind: float32 follows the float32 matmul precision (:func:`tf32_products`);
    16-bit inputs multiply on tensor cores."""
    if dtype == torch.float32:
        return "fp32-tf32" if tf32_products() else "fp32-ieee"
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


@constant_while_tracing
def tf32_products() -> bool:
    """Whether float32 CUDA matmuls may use TF32, under either of PyTorch's switches.

    Since torch 2.9 ``torch.backends.cuda.matmul.fp32_precision`` ("tf32", "ieee", or "none":
    inherit ``torch.backends.fp32_precision``) reads both its own setting and the legacy one
    (``allow_tf32``, ``torch.set_float32_matmul_precision``), while reading the legacy flag after
    the new switch was set raises; older versions have only the legacy flag. Read at trace time
    under torch.compile (the getters are not traceable)."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", "none")
    if precision == "none":
        precision = getattr(torch.backends, "fp32_precision", "none")
    if precision == "none":
        try:
            return bool(matmul.allow_tf32)
        except RuntimeError:  # the legacy flag set, then the new switch set back to "none"
            return torch.get_float32_matmul_precision() != "highest"
    return precision == "tf32"


@contextlib.contextmanager
def float32_products(kind: str):
    """Float32 CUDA matmuls of ``kind`` ("fp32-tf32" or "fp32-ieee") inside the context, through
    the switch this torch has (the new one where it exists, so as not to mix the two)."""
    matmul = torch.backends.cuda.matmul
    if hasattr(torch.backends, "fp32_precision"):
        before = matmul.fp32_precision
        matmul.fp32_precision = "tf32" if kind == "fp32-tf32" else "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision = before
    else:
        before = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high" if kind == "fp32-tf32" else "highest")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(before)


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


# Partial-stats tiles (BLOCK_R, BLOCK_C, num_warps) by input kind and BLOCK_D, for batches of more
# than 16 rows; found by compiling for sm_80, sm_86, sm_89 and sm_90 under every Triton version in
# fused.CHECKED_TRITON (tests/compile_kernels.py): the largest that neither spill registers nor
# pass 99 KiB of shared memory at 2 stages under any of them.
# TF32 operands take twice the registers and shared memory of 16-bit ones, and full-precision
# float32 (three TF32 products per product, "tf32x3") twice again.
PARTIAL_TILES = {
    "bf16": {64: (32, 64, 4), 128: (32, 64, 8), 256: (32, 32, 8)},
    "fp32-tf32": {64: (32, 64, 4), 128: (32, 32, 8), 256: (16, 16, 8)},
    "fp32-ieee": {64: (16, 32, 4), 128: (16, 32, 8)},
}
PARTIAL_TILES["fp16"] = PARTIAL_TILES["bf16"]
# The largest D of each kind: full-precision float32 products at D = 256 spill registers at every
# tile tried (16 rows, 16–32 columns, 4–16 warps, 1–2 stages), so the plan has none.
MAX_DIM = {kind: max(by_dim) for kind, by_dim in PARTIAL_TILES.items()}
# Batches of at most 16 rows take 16-row tiles of at most this many columns (16 × 64 TF32 tiles
# spill registers under Triton 3.8).
SMALL_BATCH_COLUMNS = 32
# Deeper software pipelines where a block may use more than this much shared memory; the key pass
# keeps 2 stages (its full-precision float32 tiles at D = 128 spill registers at 3 on sm_90 under
# Triton 3.8).
DEEP_PIPELINE_SHARED = 128 * 1024
KEY_GRADIENT_STAGES = 2


def tiles(device: Device, kind: str, dim: int, rows: int) -> dict[str, Tiles]:
    """The tiles of each kernel for inputs of this kind and dimension on this device."""
    if kind not in PARTIAL_TILES:
        raise ValueError(f"kind must be one of {', '.join(map(repr, KINDS))}, got {kind!r}")
    if not 1 <= dim <= MAX_DIM[kind]:
        raise ValueError(
            f"dim must be between 1 and {MAX_DIM[kind]} for kind {kind!r}, got dim={dim}"
        )
    block_d = max(16, _next_power_of_2(dim))
    if device is INTERPRETER:
        small = Tiles(16, 16, block_d)
        return dict(partial=small, finalize=small, key_gradient=small)
    block_r, block_c, num_warps = PARTIAL_TILES[kind][max(64, block_d)]
    if rows <= 16:
        block_r, block_c = 16, min(block_c, SMALL_BATCH_COLUMNS)
    stages = 3 if device.shared_memory > DEEP_PIPELINE_SHARED else 2
    return dict(
        partial=Tiles(block_r, block_c, block_d, num_warps, stages),
        finalize=Tiles(16, 16, block_d, num_warps, 1),
        key_gradient=Tiles(block_r, block_c, block_d, num_warps, min(stages, KEY_GRADIENT_STAGES)),
    )


def plan(
    device: Device,
    *,
    rows: int,
    dim: int,
    bank: int,
    queue: int,
    kind: str,
    need_grad: bool,
    key_grad: bool,
    keys: int | None = None,
) -> Plan:
    """The launches for ``rows`` query rows of dimension ``dim`` against ``bank`` in-batch
    candidates then ``queue`` queue entries (either may be 0), inputs of ``kind``, with the query
    gradient (``need_grad``) and the key-bank gradient (``key_grad``) or not. ``keys`` is N, the
    rows of one crop (``rows`` by default: one crop). The launches use at most
    ``WORKSPACE_BYTES``."""
    keys = rows if keys is None else keys
    cap = WORKSPACE_BYTES
    if rows < 1 or keys < 1 or rows % keys:
        raise ValueError(f"rows must be a positive multiple of keys, got rows={rows}, keys={keys}")
    if bank < 0 or queue < 0:
        raise ValueError(f"bank and queue must be ≥ 0, got bank={bank}, queue={queue}")
    chosen = tiles(device, kind, dim, rows)
    partial_tiles, finalize_tiles = chosen["partial"], chosen["finalize"]
    split_row_bytes = 4 * ((2 * dim if need_grad else 0) + STATE_SCALARS)
    steps = [_cdiv(columns, partial_tiles.block_c) for columns in (bank, queue) if columns > 0]

    def splits(group_rows: int, *, required: bool) -> list[int] | None:
        return _splits(
            device,
            steps,
            blocks=_cdiv(group_rows, partial_tiles.block_r),
            budget=cap // (split_row_bytes * group_rows),
            required=required,
        )

    groups = []
    for start, stop, key_start, group_keys in _row_groups(
        rows, keys, partial_tiles.block_r, lambda n: splits(n, required=False) is not None
    ):
        group_rows = stop - start
        row_blocks = _cdiv(group_rows, partial_tiles.block_r)
        counts = splits(group_rows, required=True)
        assert counts is not None  # required: never None
        partial = tuple(
            Launch("partial", partial_tiles, (row_blocks, count), _cdiv(n, count))
            for n, count in zip(steps, counts)
        )
        finalize = Launch(
            "finalize", finalize_tiles, (_cdiv(group_rows, finalize_tiles.block_r),), 1
        )
        groups.append(RowGroup(start, stop, key_start, group_keys, partial, finalize))
    used = split_row_bytes * max(group.rows * group.total_splits for group in groups)

    key_gradient = None
    if key_grad and bank > 0:
        g = chosen["key_gradient"]
        column_blocks, row_steps = _cdiv(bank, g.block_c), _cdiv(rows, g.block_r)
        slice_bytes = 4 * bank * dim
        budget = max(1, cap // slice_bytes)
        counts = _splits(device, [row_steps], blocks=column_blocks, budget=budget, required=True)
        assert counts is not None  # required: never None
        (count,) = counts
        key_gradient = Launch("key_gradient", g, (column_blocks, count), _cdiv(row_steps, count))
        if count > 1:
            used = max(used, slice_bytes * count)
    return Plan(tuple(groups), key_gradient, used)


def _splits(
    device: Device, steps: list[int], *, blocks: int, budget: int, required: bool
) -> list[int] | None:
    """How many pieces to split each segment of ``steps`` tiles into, for launches of ``blocks``
    blocks along the other axis and at most ``budget`` pieces in all: two programs per SM for
    every segment if the budget allows, else at least one (the rest of the budget shared), else
    (only if ``required``; otherwise None) whatever the budget allows, one piece at least.
    Each count is one a uniform span gives: ⌈steps / ⌈steps / count⌉⌉ = count."""
    most = [_at_least(n, _cdiv(PROGRAMS_PER_SM * device.sms, blocks)) for n in steps]
    if sum(most) <= budget:
        return most
    least = [_at_least(n, _cdiv(device.sms, blocks)) for n in steps]
    if sum(least) > budget:
        if not required:
            return None
        least = [1] * len(steps)
    counts, spare = list(least), budget - sum(least)
    order = sorted(range(len(steps)), key=lambda i: most[i] - least[i])
    for position, i in enumerate(order):  # the smaller needs first: what they leave goes on
        share = spare // (len(order) - position)
        counts[i] = _at_most(steps[i], least[i] + min(most[i] - least[i], share))
        spare -= counts[i] - least[i]
    return counts


def _at_least(steps: int, wanted: int) -> int:
    """The fewest pieces, ≥ ``wanted`` (or all ``steps``), that a uniform span makes of
    ``steps``."""
    if wanted >= steps:
        return steps
    if wanted <= 1:
        return 1
    return _cdiv(steps, (steps - 1) // (wanted - 1))


def _at_most(steps: int, allowed: int) -> int:
    """The most pieces, ≤ ``allowed`` (≥ 1), that a uniform span makes of ``steps``."""
    return _cdiv(steps, _cdiv(steps, max(1, allowed)))


def _row_groups(rows: int, keys: int, block_r: int, fits) -> list[tuple[int, int, int, int]]:
    """(start, stop, key_start, keys) of each row group: all rows if ``fits(rows)``, else the
    fewest groups of whole crops that fit, else each crop in the fewest equal parts (whole row
    tiles) that fit."""
    crops = rows // keys
    for count in range(1, crops + 1):
        per_group = _cdiv(crops, count)
        if _cdiv(crops, per_group) == count and fits(per_group * keys):
            return [
                (first * keys, min(crops, first + per_group) * keys, 0, keys)
                for first in range(0, crops, per_group)
            ]
    parts = 2
    while True:
        length = _cdiv(_cdiv(keys, parts), block_r) * block_r
        if length <= block_r or fits(length):
            break
        parts += 1
    return [
        (
            crop * keys + first,
            crop * keys + min(keys, first + length),
            first,
            min(keys, first + length) - first,
        )
        for crop in range(crops)
        for first in range(0, keys, length)
    ]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)
