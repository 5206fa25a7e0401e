"""Where the chunked backend overtakes the reference on this CPU: forward+backward time of both over
a grid of sizes, for the rule backend="auto" follows off the fused path.

    python benchmarks/crossover_cpu.py --threads 1 --cpu-time   # as committed, in
        # results/chunked-crossover-cpu.md: one thread, CPU time (robust to other processes)
    python benchmarks/crossover_cpu.py --quick   # two points, to check the script: it writes to
        # a temporary folder, never to results/

Each point is SCE (D = 32, 128, 512) or InfoNCE (D = 128) with N rows and K candidates per row:
in-batch (K = N, the keys get gradients too) or queue mode (K = M + 1); float32 or float64; the
mean loss, the backends called through their seam (sce_loss.problem), without the checks
of the public functions.
Times are the minimum over repetitions (at least 3, and as many as fit in about a second): on a
shared machine, the least disturbed one; on one thread, CPU time (--cpu-time) is what a step
costs whatever else the machine runs.
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from outputs import output

from sce_loss import chunked, reference
from sce_loss.problem import Problem

LOSSES = {  # name in the results: (Problem.loss, the public functions' defaults)
    "sce": ("sce", dict(temperature=0.1, target_temperature=0.05, coeff=0.5)),
    "infonce": ("info_nce", dict(temperature=0.2)),
}
BACKENDS = {"reference": reference, "chunked": chunked}
DTYPES = {"float32": torch.float32, "float64": torch.float64}
MAX_PAIRS = 1 << 23  # N·K: above this the reference needs gigabytes and is far behind anyway


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="two points, to check the script")
    parser.add_argument("--threads", type=int, help="torch's CPU threads (default: its choice)")
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time with time.process_time (CPU time) instead of wall-clock time",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="default: results/chunked-crossover-cpu.md (--quick: a temporary one)",
    )
    args = parser.parse_args(argv)
    args.out = output(parser, args.out, "chunked-crossover-cpu.md", check=args.quick)
    return args


def grid(quick: bool):
    """(loss, dtype, mode, N, K, D) points, N·K ≤ MAX_PAIRS."""
    if quick:
        return [
            ("sce", "float32", "queue", 64, 1025, 32),
            ("sce", "float64", "in-batch", 64, 64, 32),
        ]
    points = []
    for loss, dtype in itertools.product(LOSSES, DTYPES):
        dims = (32, 128, 512) if loss == "sce" else (128,)
        for n, d in itertools.product((16, 64, 256, 1024), dims):
            points.append((loss, dtype, "in-batch", n, n, d))
            points += [
                (loss, dtype, "queue", n, k + 1, d)
                for k in (256, 1024, 4096, 16384, 65536)
                if n * k <= MAX_PAIRS
            ]
    return points


def seconds(loss, dtype, mode, n, k, d, backend, clock, budget: float = 1.0) -> float:
    g = torch.Generator().manual_seed(n + k + d)
    make = lambda rows: F.normalize(torch.randn(rows, d, generator=g), dim=1).to(DTYPES[dtype])  # noqa: E731
    query, key = make(n).requires_grad_(), make(n).requires_grad_()
    queue = None if mode == "in-batch" else make(k - 1)
    name, hyper = LOSSES[loss]

    def step():
        query.grad = key.grad = None
        problem = Problem(
            loss=name,
            query=query[None],
            key=key,
            bank=key if queue is None else None,
            queue=queue,
            offset=0,
            **hyper,
        )
        BACKENDS[backend].losses(problem).mean().backward()

    step()
    times, begin = [], time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - begin < budget and len(times) < 50):
        start = clock()
        step()
        times.append(clock() - start)
    return min(times)


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.cpu_time else time.perf_counter
    flags = (
        (f" --threads {args.threads}" if args.threads else "")
        + (" --cpu-time" if args.cpu_time else "")
        + (" --quick" if args.quick else "")
    )
    lines = [
        "# Chunked against reference on the CPU: where chunked is faster",
        "",
        f"- command: `python benchmarks/crossover_cpu.py{flags}`; torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s); load average before: "
        + ", ".join(f"{v:.1f}" for v in os.getloadavg()),
        f"- forward+backward, minimum over repetitions, ms, "
        f"{'CPU' if args.cpu_time else 'wall-clock'} time; K: candidates per row "
        "(in-batch: K = N, queue mode: K = M + 1)",
        "",
        "| loss | dtype | mode | N | K | D | N·K | reference | chunked | chunked / reference |",
        "|" + "---|" * 10,
    ]
    for point in grid(args.quick):
        budget = 0.05 if args.quick else 1.0
        ref = seconds(*point, "reference", clock, budget) * 1e3
        chunk = seconds(*point, "chunked", clock, budget) * 1e3
        loss, dtype, mode, n, k, d = point
        lines.append(
            f"| {loss} | {dtype} | {mode} | {n} | {k} | {d} | {n * k} | {ref:.2f} | "
            f"{chunk:.2f} | {chunk / ref:.2f} |"
        )
        print(lines[-1], flush=True)
    lines.append("\nload average after: " + ", ".join(f"{v:.1f}" for v in os.getloadavg()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
