"""The symmetric (SimCLR) form on this CPU: fwd+bwd time and extra peak memory of the chunked
backend against the eager and the compiled reference, SCE at 2N = 16384, D = 128, float32.

Each backend runs in a fresh process. Time: the best of a few fwd+bwd calls. Extra memory: the
peak of the bytes of tensors allocated during one more fwd+bwd and still alive, from PyTorch's
profiler (so the inputs are not counted; the gradients it leaves, 2N × D, are).

    python benchmarks/simclr_cpu.py           # as committed: results/simclr-cpu.md
    python benchmarks/simclr_cpu.py --quick   # 2N = 256, to check the script: it writes to a
        # temporary folder, never to results/
"""

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from outputs import output
from profiling import peak_allocated_mib


def measure(backend: str, rows: int, dim: int, repeats: int) -> dict:
    """Run in the child: fwd+bwd seconds (best of ``repeats``) and extra peak MiB."""
    from sce_loss import sce_loss

    g = torch.Generator().manual_seed(0)
    z1, z2 = (
        torch.nn.functional.normalize(torch.randn(rows // 2, dim, generator=g), dim=-1)
        for _ in range(2)
    )
    compiled = backend == "compiled reference"

    def step(a, b):
        return sce_loss(
            a, b, symmetric=True, backend="chunked" if backend == "chunked" else "reference"
        )

    fn = torch.compile(step, dynamic=True) if compiled else step
    small = [x[:64].clone().requires_grad_() for x in (z1, z2)]
    fn(*small).backward()  # warm-up (and the compile, with dynamic shapes, on a small batch)
    times = []
    for _ in range(repeats):
        a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
        start = time.perf_counter()
        fn(a, b).backward()
        times.append(time.perf_counter() - start)
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    extra = peak_allocated_mib(lambda: fn(a, b).backward())
    return dict(backend=backend, seconds=min(times), extra_mib=extra)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=16384, help="2N")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="2N = 256, to check the script")
    parser.add_argument(
        "--out", type=Path, help="default: results/simclr-cpu.md (--quick: a temporary one)"
    )
    # One measurement in a fresh process, as the script runs itself: not for users.
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.repeats = 256, 1
    if not args.child:
        args.out = output(parser, args.out, "simclr-cpu.md", check=args.quick)
    return args


def main() -> None:
    args = parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.rows, args.dim, args.repeats)))
        return
    results = []
    for backend in ("chunked", "reference", "compiled reference"):
        command = [sys.executable, __file__, "--child", backend, "--rows", str(args.rows)]
        command += ["--dim", str(args.dim), "--repeats", str(args.repeats)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(results[-1], flush=True)
    eager = next(r for r in results if r["backend"] == "reference")
    lines = [
        "# The symmetric (SimCLR) form on the CPU",
        "",
        f"SCE, symmetric=True, 2N = {args.rows}, D = {args.dim}, float32, fwd+bwd, best of "
        f"{args.repeats}; extra memory = peak bytes of tensors allocated during one fwd+bwd and "
        "alive at once (PyTorch profiler; the 2N × D gradients included, the inputs not), each "
        "backend in its own process.",
        f"Machine: {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}. "
        f"Command: `python benchmarks/simclr_cpu.py{' --quick' if args.quick else ''}`.",
        "",
        "| backend | time (s) | × eager reference | extra memory (MiB) |",
        "| --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r['backend']} | {r['seconds']:.2f} | {r['seconds'] / eager['seconds']:.2f} | "
            f"{r['extra_mib']:.0f} |"
        )
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
