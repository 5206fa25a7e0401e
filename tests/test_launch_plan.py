"""The launch plan fills every GPU users have, within the workspace bar, with no GPU here.

For the design's shapes (N ∈ {256, 1024, 4096}, D ∈ {128, 256}, M ∈ {4096, 65536, 1048576}) with
V ∈ {1, 4, 8} crops, in the three modes (in-batch, queue, queue and in-batch keys), on an H100,
A100, L4 and RTX 4090: every launch (each candidate segment's partial-stats launch of each row
group, and the key-gradient pass) puts at least one program on every SM where the work has that
many tiles, two where the workspace allows; the workspace stays within 64 MiB and does not grow
with M (no more at M = 2²⁴ than at M = 65536, the same at M = 2²⁸). Rows too many for the
workspace are launched in groups, which the interpreter runs here against the reference.
``pytest -s`` prints the plans. That these tiles compile without spills and within shared memory
is tests/test_fused_compile.py's part.
"""

import itertools
import math

import devices
import pytest
import torch
from conftest import HAS_FUSED, fused_reason

from sce_loss.fused import first_use, plan

DEVICES = (devices.H100, devices.A100, devices.L4, devices.RTX_4090)
SHAPES = list(itertools.product((256, 1024, 4096), (128, 256), (4096, 65536, 1 << 20)))
CROPS = (1, 4, 8)
MODES = ("in-batch", "queue", "queue+keys")
KINDS = ("bf16", "fp32-tf32", "fp32-ieee")
MIB = 1 << 20


def programs(launch):
    """The programs one launch starts."""
    return math.prod(launch.grid)


def supported(kind, dim):
    return dim <= plan.MAX_DIM[kind]


def plan_of(device, kind, crops, n, d, m, mode, need_grad=True, **options):
    return plan.plan(
        device,
        rows=crops * n,
        keys=n,
        dim=d,
        bank=0 if mode == "queue" else n,
        queue=0 if mode == "in-batch" else m,
        kind=kind,
        need_grad=need_grad,
        key_grad=need_grad and mode != "queue",
        **options,
    )


def describe(device, kind, crops, n, d, m, mode, chosen):
    t = chosen.groups[0].partial[0].tiles
    launches = " + ".join(
        f"{launch.grid}×{launch.blocks_per_program}" for launch in chosen.groups[0].partial
    )
    gradient = chosen.key_gradient
    return (
        f"{device.name:9} {kind:9} V={crops} N={n:<5} D={d:<4} M={m:<8} {mode:10} tiles "
        f"{t.block_r}x{t.block_c}x{t.block_d} w{t.num_warps} s{t.num_stages}  "
        f"{len(chosen.groups)} row group(s) of ≤ {chosen.groups[0].rows} rows: {launches}"
        + (f"; key gradient {gradient.grid}×{gradient.blocks_per_program}" if gradient else "")
        + f"; workspace {chosen.workspace / MIB:.1f} MiB"
    )


def check_plan(device, kind, crops, n, d, m, mode, need_grad=True):
    """The plan's invariants; returns it."""
    chosen = plan_of(device, kind, crops, n, d, m, mode, need_grad)
    print(describe(device, kind, crops, n, d, m, mode, chosen))
    rows = crops * n
    columns = [c for c in (0 if mode == "queue" else n, 0 if mode == "in-batch" else m) if c]
    assert chosen.workspace <= plan.WORKSPACE_BYTES, chosen.workspace / MIB
    split_row_bytes = 4 * ((2 * d if need_grad else 0) + plan.STATE_SCALARS)

    # The row groups cover the rows once, in order; each is whole crops or part of one crop.
    assert chosen.groups[0].start == 0 and chosen.groups[-1].stop == rows
    for before, after in zip(chosen.groups, chosen.groups[1:]):
        assert before.stop == after.start
    for group in chosen.groups:
        assert group.rows > 0
        if group.keys == n:
            assert group.key_start == 0 and group.start % n == 0 and group.rows % n == 0
        else:
            assert group.start % n == group.key_start and group.rows == group.keys
            assert group.key_start + group.keys <= n
        used = split_row_bytes * group.rows * group.total_splits
        assert used <= chosen.workspace
        assert len(group.partial) == len(columns)
        for launch, count in zip(group.partial, columns):
            t = launch.tiles
            row_blocks, steps = -(-group.rows // t.block_r), -(-count // t.block_c)
            assert launch.grid[0] == row_blocks
            # The splits cover the columns, none empty.
            assert launch.grid[1] * launch.span >= count > (launch.grid[1] - 1) * launch.span
            work = row_blocks * steps  # the most programs this launch can have
            assert programs(launch) >= min(device.sms, work), (group, launch)
            if programs(launch) < min(plan.PROGRAMS_PER_SM * device.sms, work):
                # Two programs per SM only where one more split would pass the workspace.
                assert used + split_row_bytes * group.rows > plan.WORKSPACE_BYTES, (group, launch)
            # No more splits than twice what two programs per SM need.
            wanted = -(-plan.PROGRAMS_PER_SM * device.sms // row_blocks)
            assert launch.grid[1] < 2 * wanted or launch.grid[1] == 1, (group, launch)
    if len(chosen.groups) > 1:  # grouped only when all the rows at once could not fit
        whole = split_row_bytes * rows * len(columns)
        assert whole > plan.WORKSPACE_BYTES

    gradient = chosen.key_gradient
    assert (gradient is not None) == (need_grad and mode != "queue")
    if gradient is not None:
        t = gradient.tiles
        column_blocks, row_steps = -(-n // t.block_c), -(-rows // t.block_r)
        assert gradient.grid[0] == column_blocks
        assert gradient.grid[1] * gradient.span >= rows > (gradient.grid[1] - 1) * gradient.span
        assert programs(gradient) >= min(device.sms, column_blocks * row_steps), gradient
        if gradient.grid[1] > 1:
            assert 4 * n * d * gradient.grid[1] <= chosen.workspace
    return chosen


@pytest.mark.parametrize("device", DEVICES, ids=lambda d: d.name)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", MODES)
def test_every_launch_fills_every_sm_within_a_flat_workspace(device, kind, mode):
    for crops, (n, d, m) in itertools.product(CROPS, SHAPES):
        if not supported(kind, d) or (mode == "in-batch" and m != SHAPES[0][2]):
            continue
        chosen = check_plan(device, kind, crops, n, d, m, mode)
        if mode != "in-batch" and m >= 65536:
            # The queue's launch: two programs per SM.
            queue = chosen.groups[0].partial[-1]
            assert programs(queue) >= plan.PROGRAMS_PER_SM * device.sms, queue
            # Flat in M: no more workspace for a queue 256 times larger, and the same for one
            # 4096 times larger (the splits a full grid needs, whatever the queue's length).
            larger = plan_of(device, kind, crops, n, d, m << 8, mode)
            largest = plan_of(device, kind, crops, n, d, m << 12, mode)
            assert largest.workspace == larger.workspace <= chosen.workspace
            assert [(g.start, g.stop) for g in largest.groups] == [
                (g.start, g.stop) for g in chosen.groups
            ]
            assert [launch.grid for launch in largest.groups[0].partial] == [
                launch.grid for launch in larger.groups[0].partial
            ]


def test_the_largest_batches_are_launched_in_row_groups_within_the_workspace():
    """Where one split per segment already passes 64 MiB (4·R·(2D+7) bytes each), the rows go
    in groups that each fill an H100; the figures of the plan at these sizes."""
    for crops, n, mode in ((4, 4096, "queue+keys"), (8, 2048, "queue+keys"), (8, 4096, "queue")):
        chosen = check_plan(devices.H100, "bf16", crops, n, 256, 65536, mode)
        assert len(chosen.groups) == 2
        assert chosen.workspace <= plan.WORKSPACE_BYTES
        for launch in chosen.groups[0].partial:
            assert programs(launch) >= devices.H100.sms
    # The largest crop alone passes the workspace at one split: parts of each crop.
    chosen = check_plan(devices.H100, "bf16", 2, 40000, 256, 65536, "queue+keys")
    assert all(group.keys < 40000 for group in chosen.groups)
    assert chosen.workspace <= plan.WORKSPACE_BYTES


@pytest.mark.parametrize("device", DEVICES, ids=lambda d: d.name)
def test_in_batch_keys_fill_every_sm_next_to_a_queue(device):
    """The bank's own launch fills the device by itself: its splits are not a share of the
    queue's (in include_keys mode N = 1024 gets as many programs as in-batch mode)."""
    for n in (256, 1024, 4096):
        alone = plan_of(device, "bf16", 1, n, 128, 0, "in-batch").groups[0].partial[0]
        beside = plan_of(device, "bf16", 1, n, 128, 65536, "queue+keys").groups[0].partial[0]
        steps = -(-n // beside.tiles.block_c)
        assert programs(beside) >= min(plan.PROGRAMS_PER_SM * device.sms, beside.grid[0] * steps)
        assert programs(beside) >= min(programs(alone), plan.PROGRAMS_PER_SM * device.sms)


def test_evaluation_needs_only_the_scalar_workspace():
    """No query gradient: 7 floats per (split, row), no D-vectors."""
    for device, crops, (n, d, m), mode in itertools.product(DEVICES, CROPS, SHAPES, MODES):
        chosen = check_plan(device, "bf16", crops, n, d, m, mode, need_grad=False)
        assert len(chosen.groups) == 1
        assert (
            chosen.workspace == 4 * crops * n * plan.STATE_SCALARS * chosen.groups[0].total_splits
        )


def test_kinds_and_dimensions_without_tiles_are_value_errors():
    options = dict(rows=256, bank=0, queue=4096, need_grad=True, key_grad=False)
    with pytest.raises(ValueError, match=r"dim must be between 1 and 128 .*'fp32-ieee'.*dim=256"):
        plan.plan(devices.H100, kind="fp32-ieee", dim=256, **options)
    with pytest.raises(ValueError, match=r"dim must be between 1 and 256 .*'bf16'.*dim=300"):
        plan.plan(devices.H100, kind="bf16", dim=300, **options)
    with pytest.raises(ValueError, match=r"kind must be one of .*got 'fp64'"):
        plan.plan(devices.H100, kind="fp64", dim=128, **options)
    with pytest.raises(ValueError, match=r"kind must be one of"):
        plan.tiles(plan.INTERPRETER, "int8", 64, 16)
    with pytest.raises(ValueError, match=r"rows must be a positive multiple of keys"):
        plan.plan(devices.H100, kind="bf16", dim=128, keys=100, **options)


@pytest.mark.parametrize("device", DEVICES, ids=lambda d: d.name)
def test_the_first_use_check_compiles_the_callers_tiles(device):
    """The check problem has at most CHECK_ROWS rows: the tiles must not depend on rows beyond."""
    for kind, d in itertools.product(plan.KINDS, (20, 64, 128, 256)):
        if not supported(kind, d):
            continue
        for rows in [*range(1, 130), 1000, 4096, 65536]:
            assert plan.tiles(device, kind, d, rows) == plan.tiles(
                device, kind, d, min(rows, first_use.CHECK_ROWS)
            )


def test_a_device_description_of_the_interpreter():
    assert plan.device_of(torch.device("cpu")) is plan.INTERPRETER
    tiles = plan.tiles(plan.INTERPRETER, "bf16", 20, 1000)["partial"]
    assert (tiles.block_r, tiles.block_c, tiles.block_d) == (16, 16, 32)


# Row groups through the interpreter: a workspace small enough that 2 crops of 40 rows (D = 8, a
# split costs 4·(2D+7) = 92 bytes per row) go in whole crops, or in parts of each crop
# (16 + 16 + 8 rows); the bytes are per candidate segment (the bank, the queue).
GROUPED = {
    "crops": (5_000, [(0, 40, 0, 40), (40, 80, 0, 40)]),
    "parts": (
        2_000,
        [
            (0, 16, 0, 16),
            (16, 32, 16, 16),
            (32, 40, 32, 8),
            (40, 56, 0, 16),
            (56, 72, 16, 16),
            (72, 80, 32, 8),
        ],
    ),
}


@pytest.mark.matrix
@pytest.mark.parametrize("loss", ["ressl", "sce"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("grouping", sorted(GROUPED))
def test_row_groups_give_the_losses_and_gradients_of_the_reference(
    monkeypatch, loss, mode, grouping
):
    """Each group reads its own rows, keys and in-batch positives (ReSSL leaves the positive
    out of the online softmax, SCE out of the target)."""
    if not HAS_FUSED:
        pytest.skip(f"the fused backend: {fused_reason()}")
    from sce_loss import fused, reference
    from sce_loss.check import make_problem

    per_segment, groups = GROUPED[grouping]
    workspace = per_segment * (2 if mode == "queue+keys" else 1)
    monkeypatch.setattr(plan, "WORKSPACE_BYTES", workspace)
    chosen = plan_of(plan.INTERPRETER, "fp32-ieee", 2, 40, 8, 150, mode)
    assert [(g.start, g.stop, g.key_start, g.keys) for g in chosen.groups] == groups
    assert chosen.workspace <= workspace
    problem = make_problem(
        loss,
        mode,
        crops=2,
        n=40,
        m=150,
        d=8,
        dtype=torch.float32,
        queue_dtype=torch.float32,
        device="cpu",
        seed=3,
    )
    got = first_use.evaluate(fused.losses, problem, needed=(True, True, True))
    want = first_use.evaluate(
        reference.losses, first_use.in_float64(problem), needed=(True, True, True)
    )
    for name, g, w in zip(("loss", "query grad", "key grad", "τ grad"), got, want):
        assert first_use.relative_error(g, w) <= first_use.TOLERANCES["fp32-ieee"], name
