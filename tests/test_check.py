"""``python -m sce_loss.check`` on a machine without a GPU: it says so, checks the chunked backend
and (through Triton's interpreter) the fused kernels against the reference for every input kind,
writes its report and exits 0.

The full check (not ``--quick``) runs here: about a minute on two cores. Triton's interpreter
converts float32 to bfloat16 by truncation where a GPU rounds to nearest, so its float32-queue
cases are compared with the reference given the queue as the interpreter converts it."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path of the check")


def test_the_check_without_a_gpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "sce_loss.check", "--out", str(tmp_path)],
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
    try:
        import triton  # noqa: F401
    except ImportError:
        return
    fused = [row for row in report["agreement"] if row["backend"] == "fused (interpreter)"]
    kinds = {row["kind"] for row in fused}
    assert kinds == {"fp32-ieee", "bf16", "bf16, fp32 queue", "fp16"}
    # Every loss and queue mode of the float32 queue, at every shape, against the queue as read.
    fp32_queue = [row for row in fused if row["kind"] == "bf16, fp32 queue"]
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
    assert "†" in markdown


def test_a_float32_queue_is_converted_as_the_interpreter_converts_it():
    """The conversion the check gives the reference is the kernels' own: under the interpreter,
    float32 → bfloat16 truncates (1 + 7/1024 → 1, where torch rounds to 1 + 1/128)."""
    pytest.importorskip("triton")
    from sce_loss.check import _as_the_interpreter_converts

    values = torch.tensor([1.0068359375, -1.0068359375, 3.0, 0.1])
    converted = _as_the_interpreter_converts(values, torch.bfloat16)
    assert converted.dtype == torch.bfloat16
    truncated = (values.view(torch.int32) & -(1 << 16)).view(torch.float32)
    assert torch.equal(converted.float(), truncated)
    assert converted[0].item() == 1.0 != values[0].to(torch.bfloat16).item()
