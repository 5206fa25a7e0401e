"""A sampled mutation run of both test tiers (docs/testing.md): cosmic-ray mutates reference.py,
chunked.py and functional.py one change at a time and reruns the default tier on each mutant;
then the slow tier (``-m slow``) runs on each mutant the default tier let survive, so that the
whole suite's kill count is measured, not argued.

Run it in a scratch clone, since cosmic-ray edits the files in place::

    git clone . /tmp/mutation && cd /tmp/mutation
    pip install cosmic-ray==8.7.0
    python tests/mutation/run.py --per-module 12 --seed 1

Mutations inside type annotations are left out (never evaluated under ``from __future__ import
annotations``: equivalent by construction). The default tier runs in the order of ``FIRST`` (the
quick tests of the mathematics first, so that most mutants fail within seconds; the set of tests is
the default tier's). Each module's session is ``mutation-<module>.sqlite`` (``cr-report`` reads
it); ``mutation-summary.md`` gets the table and every survivor's diff.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

MODULES = ("reference", "chunked", "functional")
FIRST = (
    "test_equations",
    "test_errors",
    "test_numerics",
    "test_chunked",
    "test_symmetric",
    "test_properties",
    "test_queue_and_modules",
    "test_relational",
    "test_backends_agree",
    "test_gradcheck",
    "test_higher_order",
)
PYTEST = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"]
CONFIG = """[cosmic-ray]
module-path = "sce_loss/{module}.py"
timeout = 1800.0
excluded-modules = []
test-command = "{command}"

[cosmic-ray.distributor]
name = "local"
"""


def ordered_tests() -> list[str]:
    """Every test file, those of FIRST first."""
    every = sorted(path.stem for path in Path("tests").glob("test_*.py"))
    return [f"tests/{name}.py" for name in [*FIRST, *(n for n in every if n not in FIRST)]]


def annotation_spans(path: Path) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(start, end) positions of every annotation in the module."""
    spans = []
    for node in ast.walk(ast.parse(path.read_text())):
        annotations = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            arguments = node.args
            every = [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs]
            every += [arguments.vararg, arguments.kwarg]
            annotations += [a.annotation for a in every if a is not None and a.annotation]
            annotations += [node.returns] if node.returns else []
        elif isinstance(node, ast.AnnAssign):
            annotations.append(node.annotation)
        spans += [((a.lineno, a.col_offset), (a.end_lineno, a.end_col_offset)) for a in annotations]
    return spans


def sample(session: Path, module: Path, count: int, seed: int) -> dict:
    """Keep ``count`` mutants of the session, drawn with ``seed`` outside the annotations."""
    spans = annotation_spans(module)
    with sqlite3.connect(session) as db:
        rows = db.execute(
            "select job_id, start_pos_row, start_pos_col, operator_name, occurrence "
            "from mutation_specs"
        ).fetchall()
        # Drawn in source order (job ids are random), so that a seed names the same mutants.
        outside = [
            job
            for job, row, col, *_ in sorted(rows, key=lambda r: r[1:])
            if not any(a <= (row, col) < b for a, b in spans)
        ]
        keep = set(random.Random(seed).sample(outside, min(count, len(outside))))
        drop = [(job,) for job, *_ in rows if job not in keep]
        db.executemany("delete from mutation_specs where job_id = ?", drop)
        db.executemany("delete from work_items where job_id = ?", drop)
    return dict(population=len(outside), annotated=len(rows) - len(outside), sampled=len(keep))


def survivors(session: Path) -> list[dict]:
    """The mutants the default tier let survive: operator, occurrence, line and diff."""
    with sqlite3.connect(session) as db:
        rows = db.execute(
            "select s.module_path, s.operator_name, s.occurrence, s.start_pos_row, r.diff "
            "from mutation_specs s join work_results r on s.job_id = r.job_id "
            "where r.test_outcome = 'SURVIVED' order by s.start_pos_row"
        ).fetchall()
    keys = ("module", "operator", "occurrence", "line", "diff")
    return [dict(zip(keys, row)) for row in rows]


def outcomes(session: Path) -> dict:
    """Mutants per outcome: killed, survived, incompetent (timed out or failed to run)."""
    with sqlite3.connect(session) as db:
        rows = db.execute("select test_outcome, count(*) from work_results group by 1").fetchall()
    return {str(outcome).lower(): count for outcome, count in rows}


def slow_tier_kills(mutant: dict) -> bool:
    """Apply the mutant, run the slow tier on it, restore the module."""
    apply = ["cosmic-ray", "apply", mutant["module"], mutant["operator"], str(mutant["occurrence"])]
    subprocess.run(apply, check=True)
    try:
        result = subprocess.run([*PYTEST, "-m", "slow", "tests"], capture_output=True, text=True)
    finally:
        subprocess.run(["git", "checkout", "--", mutant["module"]], check=True)
    return result.returncode != 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-module", type=int, default=12)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--survivors-only",
        action="store_true",
        help="keep the sessions of an earlier run; rerun the slow tier on their survivors",
    )
    args = parser.parse_args()
    if subprocess.run(["git", "diff", "--quiet", "sce_loss"]).returncode:
        sys.exit("sce_loss/ has uncommitted changes: run this in a clean scratch clone")
    os.environ["PYTHONPATH"] = str(Path.cwd())  # the mutated sources, also in subprocesses
    command = " ".join([*PYTEST, *ordered_tests()])
    earlier = json.loads(Path("mutation-summary.json").read_text()) if args.survivors_only else {}
    report = {}
    for module in MODULES:
        started = time.monotonic()
        config, session = Path(f"mutation-{module}.toml"), Path(f"mutation-{module}.sqlite")
        if args.survivors_only:
            counts = {k: earlier[module][k] for k in ("population", "annotated", "sampled")}
        else:
            config.write_text(CONFIG.format(module=module, command=command))
            session.unlink(missing_ok=True)
            subprocess.run(["cosmic-ray", "init", str(config), str(session)], check=True)
            counts = sample(session, Path(f"sce_loss/{module}.py"), args.per_module, args.seed)
            subprocess.run(["cosmic-ray", "exec", str(config), str(session)], check=True)
        left = survivors(session)
        for mutant in left:
            mutant["slow tier kills"] = slow_tier_kills(mutant)
        counts.update(outcomes(session), survivors=left, seconds=round(time.monotonic() - started))
        report[module] = counts
        Path("mutation-summary.json").write_text(json.dumps(report, indent=1))
    Path("mutation-summary.md").write_text(summary(report, args))
    print(Path("mutation-summary.md").read_text())


def summary(report: dict, args) -> str:
    lines = [
        f"Sample: {args.per_module} mutants per module, seed {args.seed}.",
        "",
        "| module | population (+ in annotations) | sampled | killed: default tier | "
        "killed: whole suite | survived both | seconds |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for module, r in report.items():
        by_slow = sum(m["slow tier kills"] for m in r["survivors"])
        default = r.get("killed", 0)
        lines.append(
            f"| `{module}.py` | {r['population']} (+{r['annotated']}) | {r['sampled']} | "
            f"{default} | {default + by_slow} | {len(r['survivors']) - by_slow} | {r['seconds']} |"
        )
    for module, r in report.items():
        other = {k: v for k, v in r.items() if k in ("incompetent", "none")}
        if other:
            lines += ["", f"`{module}.py`: also {other} (timed out or failed to run)"]
        for m in r["survivors"]:
            verdict = "killed by the slow tier" if m["slow tier kills"] else "survived both tiers"
            lines += ["", f"`{module}.py` line {m['line']}, {m['operator']}: {verdict}", ""]
            lines += ["```diff", m["diff"].strip(), "```"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
