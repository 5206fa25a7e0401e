"""Compile every fused kernel for Hopper (sm_90) at the tiles the launcher picks, with Triton's
bundled ptxas and no GPU; print one JSON line per kernel and configuration.

Run without TRITON_INTERPRET (the interpreter's kernels cannot be compiled): tests/test_fused_compile.py
starts it that way.
"""

import itertools
import json
import re

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from sce_loss.fused import kernels, ops

HOPPER = GPUTarget("cuda", 90, 32)
FLOAT_ARGS = {"inv_tau", "inv_tau_m", "coeff"}
INT_ARGS = {"R", "N", "NUM_C", "D", "COLS_PER_SPLIT", "SPLIT_BASE", "TOTAL_SPLITS", "POS_OFFSET", "NUM_BANK"}
INPUT_POINTERS = {"X", "K", "C", "BANK"}
KINDS = {"fp32-ieee": (torch.float32, "highest"), "fp32-tf32": (torch.float32, "high"),
         "bf16": (torch.bfloat16, "highest"), "fp16": (torch.float16, "highest")}
TRITON_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def compile_for_hopper(fn, dtype, constexprs):
    signature = {name: ("constexpr" if name in constexprs else "fp32" if name in FLOAT_ARGS else
                        "i32" if name in INT_ARGS else
                        f"*{TRITON_DTYPE[dtype]}" if name in INPUT_POINTERS else "*fp32")
                 for name in fn.arg_names}
    source = ASTSource(fn=fn, signature=signature,
                       constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(source, target=HOPPER, options={"num_warps": 4})


def main():
    assert not ops.INTERPRET, "run without TRITON_INTERPRET"
    for kind, rows, dim in itertools.product(KINDS, (16, 4096), (128, 256)):
        dtype, matmul_precision = KINDS[kind]
        torch.set_float32_matmul_precision(matmul_precision)
        block_r, block_c, block_d = ops.blocks(rows, dim, dtype)
        precision = ops._precision(dtype)
        flags = dict(ONLINE_HAS_POS=True, NEED_TARGET=True, PRECISION=precision, UPCAST=False)
        for name, fn, constexprs in (
            ("partial", kernels.partial_stats_kernel,
             flags | dict(HAS_POS=True, NEED_GRAD=True, BLOCK_R=block_r, BLOCK_C=block_c, BLOCK_D=block_d)),
            ("finalize", kernels.finalize_kernel,
             dict(EXTRA_POS=True, NEED_TARGET=True, NEED_GRAD=True, BLOCK_R=block_r, BLOCK_D=block_d)),
            ("key_gradient", kernels.key_gradient_kernel,
             flags | dict(BLOCK_R=block_r, BLOCK_C=block_c, BLOCK_D=block_d)),
        ):
            compiled = compile_for_hopper(fn, dtype, constexprs)
            print(json.dumps(dict(kind=kind, rows=rows, dim=dim, kernel=name, precision=precision,
                                  tiles=[block_r, block_c, block_d], shared=compiled.metadata.shared,
                                  tensor_cores=bool(re.search(r"\b(w?gmma|mma)\.", compiled.asm["ptx"])))),
                  flush=True)


if __name__ == "__main__":
    main()
