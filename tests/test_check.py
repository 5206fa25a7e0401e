"""``python -m sce_loss.check`` on a machine without a GPU: it says so, checks the chunked backend
and (through Triton's interpreter) the fused kernels against the reference for every input kind,
writes its report and exits 0.

The quick check runs in the default tier; the full one (about a minute on two cores) in the slow
tier. Triton's interpreter
converts float32 to bfloat16 by truncation where a GPU rounds to nearest, so its float32-queue
cases are compared with the reference given the queue as the interpreter converts it."""

import json
import os
import subprocess
import sys

import pytest
import torch

from sce_loss import fused

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path of the check")


def run_check(tmp_path, *options):
    """The check's report, after the assertions every run must pass."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "sce_loss.check", "--out", str(tmp_path), *options],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "No CUDA GPU" in result.stdout
    report = json.loads((tmp_path / "check.json").read_text())
    backends = {row["backend"] for row in report["agreement"]}
    assert "chunked" in backends
    failed = [row for row in report["agreement"] if not row["ok"]]
    assert not failed, json.dumps(failed, indent=1)
    assert report["verdict"].startswith("All ") and "agree" in report["verdict"]
    assert "No GPU here" in report["verdict"]
    markdown = (tmp_path / "check.md").read_text()
    assert "| chunked |" in markdown and report["verdict"] in markdown
    fused_rows = [row for row in report["agreement"] if row["backend"] == "fused (interpreter)"]
    if fused.triton_reason() is not None:
        assert not fused_rows and "fused kernels are not checked" in result.stdout
    return result, fused_rows


def test_the_quick_check_without_a_gpu(tmp_path):
    _, fused_rows = run_check(tmp_path, "--quick")
    if fused.triton_reason() is None:
        assert {row["kind"] for row in fused_rows} == {"fp32-ieee", "bf16"}


@pytest.mark.slow
def test_the_check_without_a_gpu(tmp_path):
    result, fused_rows = run_check(tmp_path)
    if fused.triton_reason() is not None:
        return
    kinds = {row["kind"] for row in fused_rows}
    assert kinds == {"fp32-ieee", "bf16", "bf16, fp32 queue", "fp16"}
    # Every loss and queue mode of the float32 queue, at every shape, against the queue as read.
    fp32_queue = [row for row in fused_rows if row["kind"] == "bf16, fp32 queue"]
    assert len(fp32_queue) == 3 * 2 * 2
    assert {tuple(row["shape"]) for row in fp32_queue} == {(1, 19, 37, 20), (2, 5, 150, 8)}
    truncated = [row for row in fp32_queue if "reference_queue" in row]
    assert truncated and "truncat" in result.stdout
    assert all(
        max(
            row[k]
            for k in ("loss_error", "query_grad_error", "key_grad_error", "temperature_grad_error")
        )
        <= row["tolerance"]
        for row in fp32_queue
    )
