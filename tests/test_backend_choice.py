"""Which backend ``backend="auto"`` picks off the GPU: the chunked stream against a queue of at
least CHUNKED_FROM_QUEUE keys from max(CHUNKED_FROM_PAIRS, 16·D²) row-candidate pairs on, in-batch
from CHUNKED_FROM_IN_BATCH_PAIRS on, the reference otherwise."""

import pytest
import torch

from sce_loss import chunked, functional, reference
from sce_loss.problem import DEFAULT_HYPER_PARAMETERS, Problem


def problem(n, m, crops=1, include_keys=False, dim=4):
    query, key = torch.zeros(crops, n, dim), torch.zeros(n, dim)
    queue = None if m is None else torch.zeros(m, dim)
    bank = key if queue is None or include_keys else None
    return Problem(
        loss="sce",
        query=query,
        key=key,
        bank=bank,
        queue=queue,
        offset=0,
        **DEFAULT_HYPER_PARAMETERS["sce"],
    )


@pytest.mark.parametrize(
    "case, want",
    [
        (problem(64, 4094), reference),  # 64 rows × 4095 candidates < 2^18 pairs
        (problem(64, 4095), chunked),  # 64 × 4096 = 2^18
        (problem(32, 4095, crops=2), chunked),  # crops count as rows
        (problem(64, 4096 - 64, include_keys=True), chunked),  # bank + queue: 4096 candidates
        (problem(1024, 1023), reference),  # a queue shorter than 1024 keys
        (problem(256, 4095, dim=512), reference),  # 2^20 pairs < 16·512² = 2^22
        (problem(1024, 4095, dim=512), chunked),  # 2^22 pairs
        (problem(4096, None), reference),  # in-batch: the reference below 2^26 pairs
        (problem(8192, None), chunked),  # 8192 × 8192 = 2^26: chunked is faster (0.84×)
        (problem(4096, None, crops=4), chunked),  # crops count as rows
    ],
)
def test_auto_streams_against_a_large_queue(case, want):
    assert functional._backend("auto", case) is want


def test_named_backends_are_taken_as_named():
    small = problem(4, 8)
    assert functional._backend("chunked", small) is chunked
    assert functional._backend("reference", problem(4096, 4096)) is reference


def test_triton_installed_under_pytorchs_own_distribution_name(monkeypatch):
    """PyTorch's wheels install the triton module as the pytorch-triton distribution: its
    version is read from there, and an unknown one counts as unchecked."""
    import importlib.metadata

    from sce_loss import fused

    def installed(found):
        def version(name):
            if name not in found:
                raise importlib.metadata.PackageNotFoundError(name)
            return found[name]

        return version

    monkeypatch.setattr(importlib.metadata, "version", installed({"pytorch-triton": "3.9.0"}))
    assert fused._installed_triton_version() == "3.9.0"
    monkeypatch.setattr(importlib.metadata, "version", installed({}))
    assert fused._installed_triton_version() is None
    monkeypatch.setattr(fused, "TRITON_AVAILABLE", True)
    monkeypatch.setattr(fused, "TRITON_VERSION", None)
    assert "not a version its kernels were checked with" in fused.triton_reason()


def test_the_triton_extra_admits_exactly_the_checked_versions():
    """pyproject's ``triton`` bound and fused.CHECKED_TRITON name the same minor versions: those
    whose compile check (tests/compile_kernels.py, CI's slow tier per version) has passed."""
    from pathlib import Path

    from packaging.requirements import Requirement

    from sce_loss import fused

    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python ≥ 3.11")
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    (requirement,) = map(Requirement, pyproject["project"]["optional-dependencies"]["triton"])
    admitted = {f"3.{minor}" for minor in range(20) if f"3.{minor}.0" in requirement.specifier}
    assert admitted == set(fused.CHECKED_TRITON)


@pytest.mark.parametrize(
    "version, checked", [("3.7.1", False), ("3.8.0", True), ("3.9.2", True), ("3.10.0", False)]
)
def test_fused_runs_only_under_a_checked_triton(monkeypatch, version, checked):
    from sce_loss import fused

    monkeypatch.setattr(fused, "TRITON_AVAILABLE", True)
    monkeypatch.setattr(fused, "TRITON_VERSION", version)
    assert (fused.triton_reason() is None) == checked


def test_the_trace_time_constant_mark_is_torchs_own_and_importing_imports_no_dynamo():
    """sce_loss.problem.constant_while_tracing sets what torch.compiler.assume_constant_result
    sets, without importing torch._dynamo (and Triton) with the package."""
    import subprocess
    import sys

    marked = torch.compiler.assume_constant_result(lambda: 0)
    assert getattr(marked, "_dynamo_marked_constant", False) is True
    script = "import sys, sce_loss; print('torch._dynamo' in sys.modules, 'triton' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.stdout.split() == ["False", "False"], result.stdout + result.stderr
