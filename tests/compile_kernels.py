"""Compile every fused kernel for NVIDIA architectures without a GPU, at the launcher's choice.

For each architecture (``--arch 80 86 89 90``), input kind (float32 IEEE, float32 TF32, bfloat16,
float16), batch (small, large) and D ∈ {64, 128, 256}, the launch plan of that architecture's
device (sce_loss.fused.plan) picks tiles, warps and stages; each kernel is compiled at them with
Triton's bundled ptxas, and one JSON line per kernel says: shared memory used and the block's
limit, registers per thread and spill bytes (from ``ptxas -v``), and whether the products use
tensor cores (mma/wgmma in the PTX). Exit status 1 if any kernel misfits or spills, or a 16-bit
kernel runs its products without tensor cores.

Run without TRITON_INTERPRET (the interpreter's kernels cannot be compiled);
tests/test_fused_compile.py starts it that way.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import re
import sys
from concurrent.futures import ProcessPoolExecutor

import torch
import triton
from devices import BY_ARCHITECTURE as DEVICES
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from sce_loss.fused import kernels, plan

BATCHES = {"small": 16, "large": 4096}
DIMS = (64, 128, 256)
QUEUE = 65536
INPUT_POINTERS = {"X", "K", "C", "BANK"}
INT_ARGS = {
    "R",
    "N",
    "NUM_C",
    "D",
    "COLS_PER_SPLIT",
    "SPLIT_BASE",
    "TOTAL_SPLITS",
    "POS_OFFSET",
    "NUM_BANK",
    "ROWS_PER_SPLIT",
}
# Arguments that are multiples of 16 at the launches compiled here (pointers are 16-byte aligned);
# Triton specialises on it, so the compiled code is the one these launches run.
ALIGNED_INTS = {"D", "COLS_PER_SPLIT", "ROWS_PER_SPLIT", "R", "NUM_C", "NUM_BANK"}
TRITON_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
REGISTERS = re.compile(r"Used (\d+) registers")
TENSOR_CORES = re.compile(r"\b(w?gmma|mma)\.")


def compile_kernel(arch: int, fn, dtype: torch.dtype, constexprs: dict, tiles: plan.Tiles) -> dict:
    """Compile one kernel for sm_<arch>; its shared memory, registers, spills and tensor cores."""
    signature, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in INT_ARGS:
            signature[name] = "i32"
        else:
            signature[name] = f"*{TRITON_DTYPE[dtype]}" if name in INPUT_POINTERS else "*fp32"
        if signature[name].startswith("*") or name in ALIGNED_INTS:
            attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(
        fn=fn,
        signature=signature,
        attrs=attrs,
        constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()},
    )
    knobs.nvidia.dump_ptxas_log = True  # ptxas -v output, printed to stdout
    knobs.compilation.always_compile = True  # a cached kernel would print no ptxas output
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(
            source,
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": tiles.num_warps, "num_stages": tiles.num_stages},
        )
    spills = [int(s) + int(l) for s, l in SPILLS.findall(log.getvalue())]
    registers = int(REGISTERS.findall(log.getvalue())[-1])
    return dict(
        shared=compiled.metadata.shared,
        registers=registers,
        spills=sum(spills),
        tensor_cores=bool(TENSOR_CORES.search(compiled.asm["ptx"])),
    )


def configurations(archs):
    """(arch, kind, batch, dim, kernel label, kernel function name, dtype, constexprs, tiles), as
    launched; names rather than kernels, so that a configuration can be sent to another process."""
    for arch, kind, batch, dim in itertools.product(archs, plan.KINDS, BATCHES, DIMS):
        if dim > plan.MAX_DIM[kind]:
            continue  # the fused backend declines it (sce_loss.fused.unsupported_reason)
        rows = BATCHES[batch]
        chosen = plan.plan(
            DEVICES[arch],
            rows=rows,
            dim=dim,
            bank=rows,
            queue=QUEUE,
            kind=kind,
            need_grad=True,
            key_grad=True,
        )
        dtype, precision = plan.DTYPES[kind], plan.PRECISIONS[kind]
        flags = dict(ONLINE_HAS_POS=True, NEED_TARGET=True, PRECISION=precision, UPCAST=False)
        p, f, g = (
            chosen.groups[0].partial[0].tiles,
            chosen.groups[0].finalize.tiles,
            chosen.key_gradient.tiles,
        )
        for need_grad in (True, False):
            yield (
                arch,
                kind,
                batch,
                dim,
                "partial" if need_grad else "partial_no_grad",
                "partial_stats_kernel",
                dtype,
                flags
                | dict(
                    HAS_POS=True,
                    NEED_GRAD=need_grad,
                    BLOCK_R=p.block_r,
                    BLOCK_C=p.block_c,
                    BLOCK_D=p.block_d,
                ),
                p,
            )
        yield (
            arch,
            kind,
            batch,
            dim,
            "finalize",
            "finalize_kernel",
            dtype,
            dict(
                EXTRA_POS=True,
                NEED_TARGET=True,
                NEED_GRAD=True,
                BLOCK_R=f.block_r,
                BLOCK_D=f.block_d,
            ),
            f,
        )
        yield (
            arch,
            kind,
            batch,
            dim,
            "key_gradient",
            "key_gradient_kernel",
            dtype,
            flags | dict(BLOCK_R=g.block_r, BLOCK_C=g.block_c, BLOCK_D=g.block_d),
            g,
        )


def check(configuration) -> dict:
    """One configuration compiled, as a JSON-able record with its verdict."""
    arch, kind, batch, dim, name, function, dtype, constexprs, tiles = configuration
    record = dict(
        arch=arch,
        kind=kind,
        batch=batch,
        dim=dim,
        kernel=name,
        tiles=[tiles.block_r, tiles.block_c, tiles.block_d],
        warps=tiles.num_warps,
        stages=tiles.num_stages,
    )
    record |= compile_kernel(arch, getattr(kernels, function), dtype, constexprs, tiles)
    record["limit"] = DEVICES[arch].shared_memory
    record["fits"] = record["shared"] <= record["limit"]
    # Products run on tensor cores for 16-bit inputs and TF32 (the finalize kernel has none).
    record["needs_tensor_cores"] = name != "finalize" and kind != "fp32-ieee"
    record["ok"] = (
        record["fits"]
        and record["spills"] == 0
        and record["tensor_cores"] >= record["needs_tensor_cores"]
    )
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--arch", type=int, nargs="+", choices=sorted(DEVICES), default=sorted(DEVICES)
    )
    parser.add_argument("--kind", nargs="+", choices=plan.KINDS, default=plan.KINDS)
    parser.add_argument("--batch", nargs="+", choices=sorted(BATCHES), default=sorted(BATCHES))
    parser.add_argument("--dim", type=int, nargs="+", choices=DIMS, default=DIMS)
    parser.add_argument("--jobs", type=int, default=2, help="compiles in parallel")
    args = parser.parse_args(argv)
    chosen = [
        c
        for c in configurations(args.arch)
        if c[1] in args.kind and c[2] in args.batch and c[3] in args.dim
    ]
    failed = 0
    with ProcessPoolExecutor(args.jobs) as pool:
        for record in pool.map(check, chosen):
            failed += not record["ok"]
            print(json.dumps(record), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
