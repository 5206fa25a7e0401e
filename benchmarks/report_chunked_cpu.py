"""Run the chunked backend's CPU benchmark and write its results: a Markdown table, a plot and the
raw pytest-benchmark JSON under benchmarks/results/ (chunked-cpu.md, .png, .json).

    python benchmarks/report_chunked_cpu.py --threads 1 --cpu-time   # as committed: one thread,
        # CPU time; runs benchmarks/test_chunked_cpu.py, writes results/chunked-cpu.*
    python benchmarks/report_chunked_cpu.py --from run.json   # only write, from an earlier run
    python benchmarks/report_chunked_cpu.py --quick   # SCE at M = 4096, eager only, to check the
        # script: it writes to a temporary folder, never to results/

Times are the minimum over the rounds (on a shared machine the least disturbed one); the JSON
keeps every statistic. On one thread, CPU time (--cpu-time) is what the step costs whatever else
the machine runs; wall-clock time is not, when other processes share the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from outputs import output

HERE = Path(__file__).resolve().parent
VARIANTS = ("reference", "reference-compiled", "chunked", "chunked-compiled", "gemms")
STYLES = {
    "reference": "--s",
    "reference-compiled": ":s",
    "chunked": "-o",
    "chunked-compiled": ":o",
    "gemms": "-.x",
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--from", dest="source", type=Path, help="a pytest-benchmark JSON file")
    parser.add_argument("--quick", action="store_true", help="SCE at M = 4096, eager only")
    parser.add_argument("--out", type=Path, help="default: results/ (--quick: a temporary folder)")
    parser.add_argument("--threads", type=int, help="torch's CPU threads (default: its choice)")
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time with time.process_time (CPU time) instead of wall-clock time",
    )
    args = parser.parse_args(argv)
    args.out = output(parser, args.out, "", check=args.quick)
    return args


def run(json_path: Path, threads: int | None, cpu_time: bool, quick: bool) -> dict:
    """Run the benchmark into ``json_path``; the machine's load before and after, for the record."""
    load_before = os.getloadavg()
    env = os.environ | ({"BENCHMARK_THREADS": str(threads)} if threads else {})
    timer = ["--benchmark-timer=time.process_time"] if cpu_time else []
    subset = ["-k", "sce and 4096 and not compiled"] if quick else []
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            str(HERE / "test_chunked_cpu.py"),
            "--benchmark-only",
            f"--benchmark-json={json_path}",
            "-q",
            "-p",
            "no:cacheprovider",
            *timer,
            *subset,
        ],
        check=True,
        env=env,
    )
    return dict(load_before=load_before, load_after=os.getloadavg())


def results(data: dict) -> dict:
    """{(loss, m): {variant: (min ms, peak extra MiB)}} from pytest-benchmark's JSON, by loss (in
    order of appearance) and M."""
    table = {}
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        table.setdefault((info["loss"], info["m"]), {})[info["variant"]] = (
            bench["stats"]["min"] * 1e3,
            info["peak_extra_mib"],
        )
    losses = list(dict.fromkeys(loss for loss, _ in table))
    return dict(sorted(table.items(), key=lambda item: (losses.index(item[0][0]), item[0][1])))


def markdown(table: dict, data: dict, load: dict | None) -> str:
    machine = data["machine_info"]
    info = data["benchmarks"][0]["extra_info"]
    lines = [
        "# Chunked backend on the CPU: forward+backward time and peak extra memory",
        "",
        f"- command: `python benchmarks/report_chunked_cpu.py{_flags(data)}`; "
        f"{data['datetime'][:10]}",
        f"- machine: {machine.get('cpu', {}).get('brand_raw', machine['processor'])}, "
        f"{info['threads']} thread{'s' if info['threads'] > 1 else ''}; torch {info['torch']}; "
        f"python {machine['python_version']}",
        f"- queue mode, N={info['n']}, D={info['d']}, float32; times: minimum over the rounds, "
        f"ms, {_timer(data)}; memory: growth of the peak resident set during one step after a "
        "warm-up, in a fresh process, MiB",
        "- gemms: x·Qᵀ, P_a·Q (and k·Qᵀ, P_b·Q for SCE and ReSSL) over the whole queue, the "
        "products no implementation avoids",
    ]
    if load:
        lines.append(
            f"- load average (1, 5, 15 min) before: {_load(load['load_before'])}, "
            f"after: {_load(load['load_after'])} (the machine is shared)"
        )
    lines += [
        "",
        "| loss | M | reference | ref. compiled | chunked | chunked compiled | gemms "
        "| chunked / reference | chunked / ref. compiled | chunked / gemms "
        "| MiB reference | MiB ref. compiled | MiB chunked | MiB chunked compiled |",
        "|" + "---|" * 14,
    ]
    for (loss, m), by in table.items():
        time = {v: by[v][0] for v in by}
        memory = [by.get(v, (None, None))[1] for v in VARIANTS[:4]]
        lines.append(
            f"| {loss} | {m} | "
            + " | ".join(_cell(time.get(v), ".1f") for v in VARIANTS)
            + " | "
            + " | ".join(
                _ratio(time, "chunked", other)
                for other in ("reference", "reference-compiled", "gemms")
            )
            + " | "
            + " | ".join(_cell(mib, ".1f") for mib in memory)
            + " |"
        )
    return "\n".join(lines) + "\n"


def plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = list(dict.fromkeys(loss for loss, _ in table))
    fig, axes = plt.subplots(2, len(losses), figsize=(4.5 * len(losses), 7), squeeze=False)
    for column, loss in enumerate(losses):
        queues = sorted(m for name, m in table if name == loss)
        for row, (index, label) in enumerate(
            [(0, "forward+backward (ms)"), (1, "peak extra memory (MiB)")]
        ):
            ax = axes[row][column]
            for variant in VARIANTS:
                points = [
                    (m, table[loss, m][variant][index])
                    for m in queues
                    if variant in table[loss, m] and table[loss, m][variant][index]
                ]
                if points:
                    ax.plot(*zip(*points), STYLES[variant], label=variant, markersize=4)
            ax.set(
                xscale="log",
                yscale="log",
                xlabel="queue size M",
                ylabel=label,
                title=loss if row == 0 else None,
            )
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _cell(value, fmt) -> str:
    return "–" if value is None else format(value, fmt)


def _ratio(time: dict, variant: str, other: str) -> str:
    if variant not in time or other not in time:
        return "–"
    return f"{time[variant] / time[other]:.2f}"


def _flags(data: dict) -> str:
    info = data["benchmarks"][0]["extra_info"]
    cpu_time = "process_time" in data["benchmarks"][0]["options"]["timer"]
    return (
        (f" --threads {info['threads']}" if info.get("threads_set") else "")
        + (" --cpu-time" if cpu_time else "")
        + (" --quick" if data.get("quick") else "")
    )


def _timer(data: dict) -> str:
    timer = data["benchmarks"][0]["options"]["timer"]
    return "CPU time" if "process_time" in timer else f"wall-clock ({timer})"


def _load(values) -> str:
    return ", ".join(f"{v:.1f}" for v in values)


def main():
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / "chunked-cpu.json"
    load = None
    if args.source is None:
        load = run(json_path, args.threads, args.cpu_time, args.quick)
        data = json.loads(json_path.read_text())
        data["load"] = load
        data["quick"] = args.quick
        json_path.write_text(json.dumps(data, indent=1))
    else:
        data = json.loads(args.source.read_text())
        load = data.get("load")
    table = results(data)
    (args.out / "chunked-cpu.md").write_text(markdown(table, data, load))
    plot(table, args.out / "chunked-cpu.png")
    print((args.out / "chunked-cpu.md").read_text())
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
