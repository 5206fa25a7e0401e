"""A sampled mutation run of the default test tier (docs/testing.md): cosmic-ray mutates
reference.py, chunked.py and functional.py one change at a time and reruns the tests on each.

Run it in a scratch clone, since cosmic-ray edits the files in place::

    git clone . /tmp/mutation && cd /tmp/mutation
    pip install cosmic-ray==8.7.0
    python tests/mutation/run.py --per-module 10 --seed 0

Mutations inside type annotations are left out (never evaluated under ``from __future__ import
annotations``: equivalent by construction). Each module's session is ``mutation-<module>.sqlite``;
``cr-report`` reads it.
"""

from __future__ import annotations

import argparse
import ast
import os
import random
import sqlite3
import subprocess
import sys
from pathlib import Path

MODULES = ("reference", "chunked", "functional")
CONFIG = """[cosmic-ray]
module-path = "sce_loss/{module}.py"
timeout = 1800.0
excluded-modules = []
test-command = "{python} -m pytest -x -q -p no:cacheprovider {tests}"

[cosmic-ray.distributor]
name = "local"
"""


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


def sample(session: Path, module: Path, count: int, seed: int) -> None:
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
    annotated = len(rows) - len(outside)
    print(f"{module}: {len(rows)} mutants, {annotated} in annotations, {len(keep)} sampled")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-module", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tests", default="", help="pytest arguments (default: the default tier)")
    args = parser.parse_args()
    os.environ["PYTHONPATH"] = str(Path.cwd())  # the mutated sources, also in subprocesses
    for module in MODULES:
        config, session = Path(f"mutation-{module}.toml"), Path(f"mutation-{module}.sqlite")
        config.write_text(CONFIG.format(module=module, python=sys.executable, tests=args.tests))
        session.unlink(missing_ok=True)
        subprocess.run(["cosmic-ray", "init", str(config), str(session)], check=True)
        sample(session, Path(f"sce_loss/{module}.py"), args.per_module, args.seed)
        subprocess.run(["cosmic-ray", "exec", str(config), str(session)], check=True)
        subprocess.run(["cr-report", str(session)], check=True)


if __name__ == "__main__":
    main()
