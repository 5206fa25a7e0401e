"""CPU benchmark of the chunked backend against the reference, eager and torch.compile'd
(inductor), with the matrix products that bound the streaming algorithm, and peak extra memory.

    python benchmarks/report_chunked_cpu.py --threads 1 --cpu-time   # runs this file, writes
                                                                      # results/chunked-cpu.*
    python -m pytest benchmarks/test_chunked_cpu.py --benchmark-only   # the timings alone

Each case times forward + backward of the mean loss in queue mode, N=256, D=128, float32 unit
vectors, the public functions' default hyper-parameters. The backends are called through their
seam (sce_loss.problem), without the argument checks of the public functions around them.
"gemms" times the products no implementation avoids: x·Qᵀ and P_a·Q, and for SCE and
ReSSL (which have a target) k·Qᵀ and P_b·Q too, each over the whole queue. Peak extra memory is
measured in a fresh process per case: after one warm-up step (compilation, lazy initialisation),
the growth of the resident set's high-water mark during one more step (Linux only).
BENCHMARK_THREADS=n sets torch's CPU threads (default: torch's choice).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from sce_loss import chunked, reference
from sce_loss.problem import Problem

LOSSES = {  # name in the results: (Problem.loss, the public functions' defaults)
    "sce": ("sce", dict(temperature=0.1, target_temperature=0.05, coeff=0.5)),
    "infonce": ("info_nce", dict(temperature=0.2)),
    "ressl": ("ressl", dict(temperature=0.1, target_temperature=0.04, coeff=0.0)),
}
BACKENDS = {"reference": reference, "chunked": chunked}
QUEUES = (4096, 65536, 262144)
N, D = 256, 128
VARIANTS = ("reference", "reference-compiled", "chunked", "chunked-compiled", "gemms")
if os.environ.get("BENCHMARK_THREADS"):
    torch.set_num_threads(int(os.environ["BENCHMARK_THREADS"]))


@pytest.fixture(autouse=True)
def _only_when_benchmarking(request):
    """A sweep of minutes: it runs with --benchmark-only, not with the tests."""
    if not request.config.getoption("benchmark_only"):
        pytest.skip("a benchmark: run with --benchmark-only")


def make_step(loss: str, m: int, variant: str):
    """One forward + backward of ``variant`` on fixed inputs, as a function of no argument."""
    g = torch.Generator().manual_seed(0)
    query = F.normalize(torch.randn(N, D, generator=g), dim=1).requires_grad_()
    key = F.normalize(torch.randn(N, D, generator=g), dim=1)
    queue = F.normalize(torch.randn(m, D, generator=g), dim=1)
    if variant == "gemms":
        rows = query.detach() if loss == "infonce" else torch.stack([query.detach(), key])
        return lambda: (rows @ queue.T) @ queue
    name, hyper = LOSSES[loss]
    backend = BACKENDS[variant.removesuffix("-compiled")]

    def fn(query, key, queue):
        return backend.losses(
            Problem(
                loss=name, query=query[None], key=key, bank=None, queue=queue, offset=0, **hyper
            )
        ).mean()

    if variant.endswith("-compiled"):
        fn = torch.compile(fn)

    def step():
        query.grad = None
        fn(query, key, queue).backward()

    return step


def rounds(m: int, variant: str) -> int:
    return 3 if m >= 65536 and variant.startswith("reference") else 5 if m >= 65536 else 20


@pytest.mark.parametrize("m", QUEUES)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_backward(benchmark, loss, m, variant):
    step = make_step(loss, m, variant)
    step()  # compile / warm up outside the timing
    benchmark.extra_info.update(
        loss=loss,
        m=m,
        variant=variant,
        n=N,
        d=D,
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        threads_set="BENCHMARK_THREADS" in os.environ,
        peak_extra_mib=peak_extra_mib_in_a_fresh_process(loss, m, variant),
    )
    benchmark.pedantic(step, rounds=rounds(m, variant), warmup_rounds=1)


def peak_extra_mib_in_a_fresh_process(loss: str, m: int, variant: str) -> float | None:
    if not sys.platform.startswith("linux") or variant == "gemms":
        return None
    done = subprocess.run(
        [sys.executable, __file__, loss, str(m), variant],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(done.stdout.splitlines()[-1])


def _kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.M).group(1))


def peak_extra_mib(loss: str, m: int, variant: str) -> float:
    """Growth of the resident set's high-water mark during one step, after a warm-up step."""
    step = make_step(loss, m, variant)
    step()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # give back what the warm-up freed
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset the high-water mark to the current resident set
    before = _kib("VmRSS")
    step()
    return (_kib("VmHWM") - before) / 1024


if __name__ == "__main__":
    # One memory measurement in a fresh process (peak_extra_mib), as the benchmarks run it.
    parser = argparse.ArgumentParser(description="One step's extra peak memory, in MiB.")
    parser.add_argument("loss")
    parser.add_argument("m", type=int, help="queue size")
    parser.add_argument("variant")
    args = parser.parse_args()
    print(json.dumps(peak_extra_mib(args.loss, args.m, args.variant)))
