"""Where a benchmark script writes: the committed results under benchmarks/results/ for a full
run, and never there for a quick or smoke run (a check of the script, whose figures mean nothing),
which writes to a fresh temporary folder instead."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def output(parser: argparse.ArgumentParser, out: Path | None, default: str, *, check: bool) -> Path:
    """``out`` if given, else ``RESULTS / default`` (``default`` "" for the folder itself); with
    ``check`` (--quick, --smoke) a temporary folder in its stead, and ``out`` under RESULTS is
    refused."""
    if check:
        if out is not None and out.resolve().is_relative_to(RESULTS):
            parser.error(f"--out {out}: a quick or smoke run never writes under {RESULTS}")
        if out is None:
            folder = Path(tempfile.mkdtemp(prefix="sce-loss-benchmark-check-"))
            out = folder / default if default else folder
    elif out is None:
        out = RESULTS / default if default else RESULTS
    return out
