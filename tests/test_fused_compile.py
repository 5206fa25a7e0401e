"""Every fused kernel compiles for Hopper (sm_90) at the tiles the launcher picks, fits a block's
shared memory, and uses tensor cores where it should: checked on the CPU with Triton's bundled
ptxas, so a kernel that only the interpreter accepts cannot pass CI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="the fused backend needs Triton (pip install '.[triton]')")
SHARED_MEMORY_PER_BLOCK = 227 * 1024  # H100/H200 opt-in maximum
SCRIPT = Path(__file__).with_name("compile_for_hopper.py")


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env,
                            timeout=900, cwd=SCRIPT.parent.parent)
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_every_configuration_compiled(compiled):
    # 4 input kinds x 2 row counts x 2 dims x 3 kernels
    assert len(compiled) == 48


def test_kernels_fit_in_shared_memory(compiled):
    too_big = [k for k in compiled if k["shared"] > SHARED_MEMORY_PER_BLOCK]
    assert not too_big, too_big


def test_products_use_tensor_cores_except_full_precision_float32(compiled):
    for kernel in compiled:
        if kernel["kernel"] != "finalize":
            assert kernel["tensor_cores"] == (kernel["precision"] != "ieee"), kernel
