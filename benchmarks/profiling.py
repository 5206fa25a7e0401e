"""PyTorch's profiler for the benchmark scripts, without the lines its tracing library writes
to stderr when it starts and stops, and the peak memory measured with it."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from torch.profiler import profile


@contextmanager
def _stderr_silenced() -> Iterator[None]:
    """File descriptor 2 sent to the null device: the profiler's tracer writes there from C++."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


@contextmanager
def quiet_profile(**options) -> Iterator[profile]:
    """``torch.profiler.profile(**options)``, silent as it starts and stops (not in between)."""
    prof = profile(**options)
    with _stderr_silenced():
        prof.__enter__()
    try:
        yield prof
    finally:
        with _stderr_silenced():
            prof.__exit__(None, None, None)


def peak_allocated_mib(fn) -> float:
    """The peak of the bytes allocated by ``fn()`` and not yet freed, in MiB (profiler events)."""
    with quiet_profile(profile_memory=True) as prof:
        fn()
    events = prof.profiler.kineto_results.events()
    changes = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in changes:
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20
