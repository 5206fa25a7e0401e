"""Tabulate a study of several losses over several seeds, from each run's summary.json: a Markdown
table (per loss, the mean ± standard deviation over seeds of every top-1 metric, the untrained
network's beside it, and the median training time of a run) and one plot of kNN top-1 against
epoch per loss (the mean over seeds, with a band from the lowest to the highest seed).

    python examples/study_table.py          # the CIFAR-10 study of examples/study.sh
    python examples/study_table.py --runs 'cifar10-*-w16-k1000-seed*' --out examples/results/x
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

METRICS = {
    "knn_top1": "kNN top-1",
    "few_label_top1": "few-label linear probe",
    "linear_top1": "linear probe",
}


def load_runs(results: Path, pattern: str) -> dict[str, list[dict]]:
    """The finished runs' summaries under ``results`` whose folder matches ``pattern``, by loss,
    in seed order."""
    runs = defaultdict(list)
    for path in sorted(results.glob(f"{pattern}/summary.json")):
        summary = json.loads(path.read_text())
        runs[summary["loss"]].append(summary)
    return {loss: sorted(found, key=lambda s: s["seed"]) for loss, found in runs.items()}


def metrics_of(runs: dict[str, list[dict]]) -> list[str]:
    """The ``*_top1`` keys that every run reports, kNN first."""
    keys = set.intersection(*(set(s) for found in runs.values() for s in found))
    return sorted((k for k in keys if k.endswith("_top1")), key=lambda k: (k != "knn_top1", k))


def mean_std(values) -> str:
    """'83.8 ± 0.5' (the sample standard deviation), or the value alone for one run."""
    values = np.asarray(values, dtype=float)
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{values.mean():.1f} ± {values.std(ddof=1):.1f}"


def table(runs: dict[str, list[dict]]) -> str:
    metrics = metrics_of(runs)
    names = [METRICS.get(k, k.removesuffix("_top1").replace("_", " ")) for k in metrics]
    header = ["loss", "seeds", "epochs"]
    for name in names:
        header += [name, f"{name}, untrained"]
    header.append("training time per run, median")
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for loss, found in runs.items():
        row = [loss, ", ".join(str(s["seed"]) for s in found)]
        row.append(", ".join(sorted({str(s["epochs"]) for s in found})))
        for key in metrics:
            row.append(mean_std([s[key] for s in found]))
            row.append(mean_std([s["untrained"][key] for s in found]))
        row.append(f"{np.median([s['wall_s'] for s in found]):.0f} s")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot(runs: dict[str, list[dict]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axis = plt.subplots(figsize=(7, 4))
    for loss, found in runs.items():
        curves = [
            {h["epoch"]: h["knn_top1"] for h in s["history"] if "knn_top1" in h} for s in found
        ]
        epochs = sorted(set.intersection(*(set(c) for c in curves)))
        values = np.array([[c[e] for e in epochs] for c in curves])
        (line,) = axis.plot(
            epochs,
            values.mean(0),
            "o-",
            label=f"{loss} ({len(found)} seed{'s' * (len(found) > 1)})",
        )
        axis.fill_between(epochs, values.min(0), values.max(0), color=line.get_color(), alpha=0.2)
    axis.set(xlabel="epoch (0: untrained)", ylabel="kNN top-1 (%)", title=title)
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.legend(title="mean; band: lowest to highest seed")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--results", type=Path, default=Path("examples/results"))
    p.add_argument(
        "--runs", default="cifar10-*-w16-k1000-seed*", help="the run folders' glob pattern"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="writes OUT.md and OUT-knn.png (default RESULTS/cifar10-w16-k1000-study)",
    )
    args = p.parse_args(argv)
    runs = load_runs(args.results, args.runs)
    if not runs:
        p.error(f"no finished run (a summary.json) under {args.results}/{args.runs}")
    out = args.out or args.results / "cifar10-w16-k1000-study"
    markdown, figure = out.with_name(out.name + ".md"), out.with_name(out.name + "-knn.png")
    markdown.write_text(table(runs))
    plot(runs, figure, f"kNN top-1 per epoch: {args.runs}")
    print(f"wrote {markdown} and {figure}")


if __name__ == "__main__":
    main()
