"""Fused kernels vs eager reference vs torch.compile'd reference: forward+backward time, peak extra
memory and agreement, in one run.

    python benchmarks/gpu.py                          # the grid of the design, on CUDA
    python benchmarks/gpu.py --losses sce --n 256 --d 128 --m 65536 --dtypes bf16
    python benchmarks/gpu.py --smoke --device cpu     # tiny shapes, checks the script itself
                                                      # (writes to a temporary folder)

Timing: CUDA events around forward+backward of the mean loss (query requires grad, queue mode),
the L2 cache flushed before every repetition, warm-up first, median of --reps. Memory: peak bytes
allocated during one forward+backward beyond what was allocated before it (inputs and query grad
buffer included in the baseline). Agreement: relative error of the loss and of dL/dquery against
the reference computed in float64 on the same (rounded) inputs. Writes a Markdown table, a JSON
file and a log-log plot of time against M under --out.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from outputs import output

from sce_loss import info_nce_loss, ressl_loss, sce_loss

LOSSES = {"sce": sce_loss, "infonce": info_nce_loss, "ressl": ressl_loss}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BACKENDS = ("fused", "eager", "compile")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=list(LOSSES))
    parser.add_argument("--n", nargs="+", type=int, default=[256, 1024, 4096])
    parser.add_argument("--d", nargs="+", type=int, default=[128, 256])
    parser.add_argument("--m", nargs="+", type=int, default=[4096, 65536, 1048576])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument(
        "--tf32", action="store_true", help="float32 matmul precision 'high' (TF32)"
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, few repetitions")
    parser.add_argument(
        "--out", type=Path, help="default: benchmarks/results, or a temporary folder with --smoke"
    )
    args = parser.parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error(
            f"--device {args.device}: no CUDA GPU is available here "
            "(torch.cuda.is_available() is False); run it on a machine with an NVIDIA "
            "GPU, or check the script with --smoke --device cpu"
        )
    if args.smoke:
        args.n, args.d, args.m, args.reps = [16], [16], [64, 256], 3
    args.out = output(parser, args.out, "", check=args.smoke)
    return args


class Timer:
    """Median forward+backward time in µs: CUDA events with an L2 flush, or perf_counter on CPU."""

    def __init__(self, device: torch.device, reps: int):
        self.device, self.reps = device, reps
        cuda = device.type == "cuda"
        l2 = torch.cuda.get_device_properties(device).L2_cache_size if cuda else 0
        self.flush = torch.empty(max(2 * l2, 1), dtype=torch.int8, device=device)

    def __call__(self, step) -> float:
        for _ in range(3):
            step()
        times = []
        for _ in range(self.reps):
            self.flush.zero_()
            if self.device.type == "cuda":
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                step()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) * 1e3)
            else:
                begin = time.perf_counter()
                step()
                times.append((time.perf_counter() - begin) * 1e6)
        return statistics.median(times)


def peak_extra_bytes(device: torch.device, step) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(device) - before


def relative_error(got, want) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


def measure(loss_name, n, d, m, dtype, backends, timer, device):
    g = torch.Generator(device="cpu").manual_seed(n + d + m)
    make = lambda rows: F.normalize(torch.randn(rows, d, generator=g), dim=1).to(device, dtype)  # noqa: E731
    query, key, queue = make(n).requires_grad_(), make(n), make(m)
    fn = LOSSES[loss_name]
    with torch.no_grad():
        exact_query = query.detach().double().requires_grad_()
    with torch.enable_grad():
        exact = fn(exact_query, key.double(), queue.double(), backend="reference")
        (exact_grad,) = torch.autograd.grad(exact, exact_query)
    rows = []
    for backend in backends:
        call = (
            functools.partial(fn, backend="fused")
            if backend == "fused"
            else functools.partial(fn, backend="reference")
            if backend == "eager"
            else torch.compile(functools.partial(fn, backend="reference"))
        )

        step = _step(call, query, key, queue)
        row = dict(
            loss=loss_name, n=n, d=d, m=m, dtype=str(dtype).removeprefix("torch."), backend=backend
        )
        try:
            loss = step()
            row["loss_rel_err"] = relative_error(loss.detach(), exact.detach())
            row["grad_rel_err"] = relative_error(query.grad, exact_grad)
            row["time_us"] = timer(step)
            extra = peak_extra_bytes(device, step)
            row["peak_extra_mib"] = None if extra is None else extra / 2**20
        except torch.OutOfMemoryError:
            row["error"] = "out of memory"
        except Exception as error:  # a failed backend is reported, the sweep goes on
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
        query.grad = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=(
            torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else platform.processor() or "cpu"
        ),
        torch=torch.__version__,
        triton=triton_version,
        float32_matmul_precision=torch.get_float32_matmul_precision(),
        command="python " + " ".join(os.sys.argv),
    )


def markdown(rows, env) -> str:
    lines = [
        f"# Fused vs eager vs torch.compile: {env['device']}",
        "",
        f"- command: `{env['command']}`",
        f"- date: {env['date']}; torch {env['torch']}; triton {env['triton']}; "
        f"float32 matmul precision: {env['float32_matmul_precision']}",
        "- time: median forward+backward (µs), L2 flushed; memory: peak extra MiB; "
        "speed-up: eager time / fused time and compile time / fused time",
        "",
        "| loss | dtype | N | D | M | fused µs | eager µs | compile µs | × eager | × compile "
        "| fused MiB | eager MiB | compile MiB | fused loss err | fused grad err |",
        "|" + "---|" * 15,
    ]
    grouped = {}
    for row in rows:
        point = (row["loss"], row["dtype"], row["n"], row["d"], row["m"])
        grouped.setdefault(point, {})[row["backend"]] = row

    def cell(row, field, fmt):
        if row is None:
            return "–"
        if "error" in row:
            return "OOM" if row["error"] == "out of memory" else "error"
        value = row.get(field)
        return "–" if value is None else format(value, fmt)

    for (loss, dtype, n, d, m), by in grouped.items():
        fused, eager, compiled = by.get("fused"), by.get("eager"), by.get("compile")
        lines.append(
            f"| {loss} | {dtype} | {n} | {d} | {m} | {cell(fused, 'time_us', '.1f')} | "
            f"{cell(eager, 'time_us', '.1f')} | {cell(compiled, 'time_us', '.1f')} | "
            f"{_speedup(fused, eager)} | "
            f"{_speedup(fused, compiled)} | {cell(fused, 'peak_extra_mib', '.2f')} | "
            f"{cell(eager, 'peak_extra_mib', '.1f')} | "
            f"{cell(compiled, 'peak_extra_mib', '.1f')} | "
            f"{cell(fused, 'loss_rel_err', '.1e')} | "
            f"{cell(fused, 'grad_rel_err', '.1e')} |"
        )
    return "\n".join(lines) + "\n"


def _step(call, query, key, queue):
    """One forward+backward of ``call`` on the inputs, returning the loss."""

    def step():
        query.grad = None
        loss = call(query, key, queue)
        loss.backward()
        return loss

    return step


def _speedup(fused, other) -> str:
    """other's time / fused's time, or – when either is missing."""
    if fused and other and "time_us" in fused and "time_us" in other:
        return f"{other['time_us'] / fused['time_us']:.1f}"
    return "–"


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {}
    for row in rows:
        if "time_us" in row:
            label = f"{row['loss']} {row['dtype']} N={row['n']} D={row['d']} {row['backend']}"
            series.setdefault(label, []).append((row["m"], row["time_us"]))
    fig, ax = plt.subplots(figsize=(9, 6))
    styles = {"fused": "-o", "eager": "--s", "compile": ":^"}
    for label, points in sorted(series.items()):
        points.sort()
        ax.plot(*zip(*points), styles[label.split()[-1]], label=label, markersize=3)
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="queue size M",
        ylabel="forward+backward time (µs)",
        title="Contrastive loss forward+backward time vs queue size",
    )
    ax.legend(fontsize=5, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=150)


def main():
    args = parse_args()
    if args.tf32:
        torch.set_float32_matmul_precision("high")
    device = torch.device(args.device)
    timer = Timer(device, args.reps)
    rows = []
    for loss in args.losses:
        for dtype in args.dtypes:
            for n in args.n:
                for d in args.d:
                    for m in args.m:
                        rows += measure(loss, n, d, m, DTYPES[dtype], args.backends, timer, device)
    env = environment(device)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = (
        "smoke" if args.smoke else env["device"].replace(" ", "-") + ("-tf32" if args.tf32 else "")
    )
    (args.out / f"{stem}.json").write_text(json.dumps(dict(environment=env, rows=rows), indent=1))
    table = markdown(rows, env)
    (args.out / f"{stem}.md").write_text(table)
    plot(rows, args.out / f"{stem}.png")
    print(table)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
