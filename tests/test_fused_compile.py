"""Every fused kernel compiles for sm_80, sm_86, sm_89 and sm_90 at the tiles the launch plan picks
for that architecture's device: within a block's shared memory, without register spills, and on
tensor cores where it multiplies 16-bit or TF32 operands. Checked on the CPU with Triton's bundled
ptxas (tests/compile_kernels.py), so a kernel that only the interpreter accepts cannot pass CI.
CI runs the slow matrix under every Triton version the `triton` extra admits, each in its own
virtual environment (.ci/run).

The full matrix (4 architectures × 4 input kinds × 2 batches × 3 dims × 4 kernels) compiles for
several minutes on two cores: it is marked slow; a quick subset runs always.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sce_loss import fused

if fused.triton_reason() is not None:
    pytest.skip(f"the fused backend: {fused.triton_reason()}", allow_module_level=True)
SCRIPT = Path(__file__).with_name("compile_kernels.py")


def compile_kernels(*arguments):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *arguments],
        capture_output=True,
        text=True,
        env=env,
        timeout=3000,
        cwd=SCRIPT.parent.parent,
    )
    records = [json.loads(line) for line in result.stdout.splitlines()]
    failed = [r for r in records if not r["ok"]]
    assert not failed, json.dumps(failed, indent=1)
    assert result.returncode == 0, result.stderr[-4000:]
    return records


def assert_verdicts(records):
    for r in records:
        assert r["fits"] and r["shared"] <= r["limit"], r
        assert r["spills"] == 0, r
        assert r["tensor_cores"] or not r["needs_tensor_cores"], r
        assert r["kernel"] == "finalize" or r["kind"] == "fp32-ieee" or r["tensor_cores"], r


def test_the_largest_configurations_compile_for_the_gpu_with_the_least_shared_memory():
    """D = 256 of a large batch on sm_86 (99 KiB of shared memory): the tightest fit. The whole
    matrix, every architecture and size, is the slow tier's."""
    records = compile_kernels("--arch", "86", "--batch", "large", "--dim", "256")
    assert len(records) == 1 * 3 * 4  # 1 arch × 3 kinds × 4 kernels
    assert_verdicts(records)


@pytest.mark.slow
def test_every_configuration_compiles_for_every_architecture():
    records = compile_kernels()
    # 4 archs × 2 batches × (3 kinds × 3 dims + full-precision float32 at D = 64, 128) × 4 kernels
    assert len(records) == 4 * 2 * 11 * 4
    assert_verdicts(records)
    for arch in sorted({r["arch"] for r in records}):
        mine = [r for r in records if r["arch"] == arch]
        print(
            f"sm_{arch}: shared ≤ {max(r['shared'] for r in mine)} of {mine[0]['limit']} "
            f"bytes, registers ≤ {max(r['registers'] for r in mine)}, spills "
            f"{sum(r['spills'] for r in mine)} bytes"
        )
