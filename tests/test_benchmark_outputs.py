"""A benchmark's quick or smoke run (a check of the script) never writes into benchmarks/results,
where the committed tables are: every script in benchmarks/ has such a mode, sends it to a
temporary folder, refuses an --out under results/, and writes there only in a full run. The two
fastest quick runs run for real; results/ must be byte for byte as before."""

import hashlib
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
RESULTS = BENCHMARKS / "results"
# script: (its check flag, what a full run writes by default, relative to results/)
SCRIPTS = {
    "crossover_cpu": (["--quick"], "chunked-crossover-cpu.md"),
    "queue_throughput_cpu": (["--quick"], "chunked-queue-cpu.md"),
    "simclr_cpu": (["--quick"], "simclr-cpu.md"),
    "supcon_cpu": (["--quick"], "supcon-cpu.md"),
    "report_chunked_cpu": (["--quick"], ""),
    "gpu": (["--smoke", "--device", "cpu"], ""),
}


def snapshot() -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in RESULTS.iterdir()}


def script(name: str):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_every_script_is_listed():
    """A new script must say here how it is checked."""
    scripts = {p.stem for p in BENCHMARKS.glob("*.py") if not p.name.startswith("test_")}
    assert scripts - {"outputs", "profiling"} == set(SCRIPTS)


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_check_run_goes_to_a_temporary_folder_and_a_full_run_to_results(name):
    flags, default = SCRIPTS[name]
    module = script(name)
    checked = module.parse_args(flags).out
    assert not checked.resolve().is_relative_to(RESULTS)
    folder = checked.parent if default else checked
    assert (
        folder.is_dir() and not any(folder.iterdir()) and checked.name == (default or folder.name)
    )
    folder.rmdir()
    if name != "gpu":  # gpu.py's full run needs a CUDA GPU to parse its arguments
        assert module.parse_args([]).out == RESULTS / default if default else RESULTS


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_check_run_refuses_to_write_under_results(name, capsys):
    flags, default = SCRIPTS[name]
    with pytest.raises(SystemExit) as refused:
        script(name).parse_args([*flags, "--out", str(RESULTS / (default or "."))])
    assert refused.value.code == 2
    assert "never writes under" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["crossover_cpu", "queue_throughput_cpu"])
def test_the_quick_run_leaves_the_committed_results_alone(name):
    before = snapshot()
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / f"{name}.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "USDT" not in done.stderr and "profiler_start" not in done.stderr, done.stderr
    assert " 0 GFLOP/s" not in done.stdout
    written = Path(done.stdout.strip().splitlines()[-1].removeprefix("written to "))
    assert written.is_file() and "--quick" in written.read_text()
    assert not written.resolve().is_relative_to(RESULTS)
    assert snapshot() == before
    written.unlink()
    written.parent.rmdir()


@pytest.mark.parametrize("table", sorted(p.name for p in RESULTS.glob("*.md")))
def test_each_committed_table_is_documented_with_the_command_that_made_it(table):
    """docs/testing.md gives the command each table records, flags and all: the documented
    command makes a table in the committed one's layout."""
    import re

    recorded = re.search(r"[Cc]ommand: `([^`]+)`", (RESULTS / table).read_text())
    assert recorded, f"{table} records no command"
    documented = (BENCHMARKS.parent / "docs" / "testing.md").read_text()
    assert f"`{recorded[1]}`" in documented, recorded[1]
