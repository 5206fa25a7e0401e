"""Several positives per row on this CPU: fwd+bwd time and extra peak memory of the chunked
backend against the eager and the compiled reference, N = 8192 samples, D = 128, float32, for
three calls:

- supcon: info_nce_loss(views, symmetric=True, labels=...), V = 2 views (16,384 rows), 100
  classes, positives="mean";
- sce-labels: sce_loss(views, symmetric=True, labels=...), the same views and labels;
- in-batch: info_nce_loss(query, key), both requiring grad, one positive per row.

Each backend runs in a fresh process. Time: the best of a few fwd+bwd calls. Extra memory: the
peak bytes of tensors allocated during one more fwd+bwd and alive at once (PyTorch's profiler:
the inputs are not counted, the gradients are).

    python benchmarks/supcon_cpu.py           # as committed: results/supcon-cpu.md
    python benchmarks/supcon_cpu.py --quick   # N = 128, to check the script: it writes to a
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

BACKENDS = ("chunked", "reference", "compiled reference")


CASES = ("supcon", "sce-labels", "in-batch")


def measure(case: str, backend: str, n: int, dim: int, classes: int, repeats: int) -> dict:
    """Run in the child: fwd+bwd seconds (best of ``repeats``) and extra peak MiB."""
    from sce_loss import info_nce_loss, sce_loss

    g = torch.Generator().manual_seed(0)
    views = torch.nn.functional.normalize(torch.randn(2, n, dim, generator=g), dim=-1)
    labels = torch.randint(classes, (n,), generator=g)
    chosen = "chunked" if backend == "chunked" else "reference"

    def step(x, y):
        if case == "in-batch":
            return info_nce_loss(x[0], x[1], temperature=0.1, backend=chosen)
        loss = info_nce_loss if case == "supcon" else sce_loss
        return loss(x, symmetric=True, labels=y, temperature=0.1, backend=chosen)

    fn = torch.compile(step, dynamic=True) if backend == "compiled reference" else step
    fn(views[:, :64].clone().requires_grad_(), labels[:64]).backward()  # warm-up (and compile)
    times = []
    for _ in range(repeats):
        x = views.clone().requires_grad_()
        start = time.perf_counter()
        fn(x, labels).backward()
        times.append(time.perf_counter() - start)
    x = views.clone().requires_grad_()
    extra = peak_allocated_mib(lambda: fn(x, labels).backward())
    return dict(case=case, backend=backend, seconds=min(times), extra_mib=extra)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=8192, help="samples (rows: 2N)")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="N = 128, to check the script")
    parser.add_argument(
        "--out", type=Path, help="default: results/supcon-cpu.md (--quick: a temporary one)"
    )
    # One measurement in a fresh process, as the script runs itself: not for users.
    parser.add_argument("--child", choices=BACKENDS, help=argparse.SUPPRESS)
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.repeats = 128, 1
    if not args.child:
        args.out = output(parser, args.out, "supcon-cpu.md", check=args.quick)
    return args


def main() -> None:
    args = parse_args()
    sizes = ["--n", str(args.n), "--dim", str(args.dim), "--classes", str(args.classes)]
    if args.child:
        result = measure(args.case, args.child, args.n, args.dim, args.classes, args.repeats)
        print(json.dumps(result))
        return
    out = args.out
    results = []
    for case in CASES:
        for backend in BACKENDS:
            command = [sys.executable, __file__, "--child", backend, "--case", case, *sizes]
            done = subprocess.run(
                [*command, "--repeats", str(args.repeats)],
                capture_output=True,
                text=True,
                check=True,
            )
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(results[-1], flush=True)
    lines = [
        "# Several positives per row on the CPU",
        "",
        f"N = {args.n}, D = {args.dim}, float32, fwd+bwd, best of {args.repeats}. supcon: "
        f"info_nce_loss(views, symmetric=True, labels), V = 2 ({2 * args.n} rows), "
        f"{args.classes} classes, positives='mean'; sce-labels: sce_loss with the same views and "
        "labels; in-batch: info_nce_loss(query, key), both requiring grad. Extra memory = peak "
        "bytes of tensors allocated during one fwd+bwd and alive at once (PyTorch profiler; the "
        "gradients included, the inputs not), each backend in its own process.",
        f"Machine: {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}. "
        f"Command: `python benchmarks/supcon_cpu.py{' --quick' if args.quick else ''}`.",
        "",
        "| call | backend | time (s) | × eager reference | extra memory (MiB) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in results:
        eager = next(e for e in results if e["case"] == r["case"] and e["backend"] == "reference")
        lines.append(
            f"| {r['case']} | {r['backend']} | {r['seconds']:.2f} | "
            f"{r['seconds'] / eager['seconds']:.2f} | {r['extra_mib']:.0f} |"
        )
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
