"""benchmarks/gpu.py without a GPU: a clear message and exit status 2, not a traceback; its smoke
run checks the script on the CPU and writes outside the tracked results folder."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"
NO_GPU = os.environ | {"CUDA_VISIBLE_DEVICES": ""}


def run(*args):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        env=NO_GPU,
        timeout=300,
    )


def test_without_a_gpu_it_says_so_and_exits_with_status_2():
    done = run()
    assert done.returncode == 2
    assert "no CUDA GPU is available here" in done.stderr
    assert "--smoke --device cpu" in done.stderr
    assert "Traceback" not in done.stderr


def test_smoke_run_writes_to_a_temporary_folder():
    pytest.importorskip("matplotlib", reason="the script plots: pip install -e '.[examples]'")
    results = SCRIPT.parent / "results"
    before = set(results.iterdir())
    done = run(
        "--smoke", "--device", "cpu", "--losses", "sce", "--dtypes", "fp32", "--backends", "eager"
    )
    assert done.returncode == 0, done.stderr
    out = Path(done.stdout.strip().splitlines()[-1].removeprefix("written to "))
    assert out.is_dir() and out.resolve() != results.resolve()
    assert {path.name for path in out.iterdir()} == {"smoke.json", "smoke.md", "smoke.png"}
    assert set(results.iterdir()) == before
    shutil.rmtree(out)
