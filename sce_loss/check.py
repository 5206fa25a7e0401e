# This docstring is the --help text: plain text, no reST markup.
"""Do the backends agree on this machine, and how fast are they? Run as sce-loss-check, or as
python -m sce_loss.check.

On a CUDA GPU: the fused kernels against the float64 reference (loss, query, key and τ gradients)
for every loss, mode and input kind on ragged shapes, then fwd+bwd times of the fused kernels, the
eager reference, the compiled reference and the chunked backend at the headline shapes of the
design (CUDA events, L2 flushed before each run), a table and a one-line verdict. Without a GPU:
the chunked backend against the reference on the CPU, and the fused kernels through Triton's
interpreter on tiny shapes when Triton is installed. The interpreter converts float32 to
bfloat16 by truncation where a GPU rounds to nearest, so there a float32 queue read by bfloat16
kernels is compared with the reference given that queue as the interpreter converts it: the
check measures the kernels, not the interpreter's rounding. --out DIR writes check.json and
check.md there. Exit status 1 on any disagreement.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import inspect
import itertools
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .problem import DEFAULT_HYPER_PARAMETERS

MODES = ("in-batch", "queue", "queue+keys")
ERRORS = ("loss_error", "query_grad_error", "key_grad_error", "temperature_grad_error")
# (kind, input dtype, queue dtype, float32 matmul products: sce_loss.fused.plan.float32_products)
KINDS = {
    "fp32-ieee": (torch.float32, torch.float32, "fp32-ieee"),
    "fp32-tf32": (torch.float32, torch.float32, "fp32-tf32"),
    "bf16": (torch.bfloat16, torch.bfloat16, "fp32-ieee"),
    "bf16, fp32 queue": (torch.bfloat16, torch.float32, "fp32-ieee"),
    "fp16": (torch.float16, torch.float16, "fp32-ieee"),
}
# Ragged (crops, N, M, D): not multiples of the tiles, several row and column blocks and splits.
GPU_SHAPES = [(1, 19, 37, 20), (2, 100, 1000, 100), (1, 257, 3001, 128), (1, 130, 5000, 256)]
CPU_SHAPES = [(1, 19, 37, 20), (2, 50, 5000, 64)]
INTERPRETER_SHAPES = [(1, 19, 37, 20), (2, 5, 150, 8)]
# Headline timings (loss, N, D, M, kind): the design's bars.
TIMED = [
    ("sce", 256, 128, 65536, "bf16"),
    ("sce", 256, 128, 65536, "fp32-tf32"),
    ("sce", 4096, 256, 65536, "bf16"),
    ("sce", 256, 128, 1 << 20, "bf16"),
    ("info_nce", 256, 128, 65536, "bf16"),
    ("ressl", 256, 128, 65536, "bf16"),
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog=_prog(),
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--out", type=Path, metavar="DIR", help="folder for check.json and check.md"
    )
    parser.add_argument("--quick", action="store_true", help="fewer cases, no timings")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and importlib.util.find_spec("triton") is not None:
        # Triton reads this when first imported: the fused kernels run through its interpreter.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    report: dict[str, Any] = dict(machine=_machine(), agreement=[], timings=[])
    if cuda:
        print(f"GPU: {report['machine']['device']}")
        report["agreement"] = _agreement_on_gpu(args.quick)
        if not args.quick:
            report["timings"] = _timings()
    else:
        print(
            "No CUDA GPU: checking what runs on the CPU (the chunked backend against the "
            "reference; the fused kernels through Triton's interpreter, on tiny shapes)."
        )
        report["agreement"] = _agreement_on_cpu(args.quick)
    failures = [row for row in report["agreement"] if not row["ok"]]
    report["verdict"] = _verdict(report, failures, cuda)
    print(_markdown(report))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "check.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.out / "check.md").write_text(_markdown(report))
    return 1 if failures else 0


def _prog() -> str:
    """The command as it was typed: sce-loss-check, or python -m sce_loss.check."""
    name = Path(sys.argv[0]).name
    return "python -m sce_loss.check" if name in ("check.py", "__main__.py", "-c", "") else name


def _machine() -> dict:
    triton_version = None
    if importlib.util.find_spec("triton") is not None:
        import triton

        triton_version = triton.__version__
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor()
    return dict(
        device=device or platform.machine(),
        torch=torch.__version__,
        triton=triton_version,
        python=platform.python_version(),
    )


def make_problem(
    loss: str,
    mode: str,
    *,
    crops: int,
    n: int,
    m: int,
    d: int,
    dtype,
    queue_dtype,
    device,
    seed: int = 0,
):
    """A :class:`~sce_loss.problem.Problem` of unit vectors (the fixed hyper-parameters of
    ``DEFAULT_HYPER_PARAMETERS``)."""
    from .problem import Problem

    generator = torch.Generator().manual_seed(seed)

    def unit(*shape, dtype=dtype):
        vectors = torch.randn(*shape, d, dtype=torch.float64, generator=generator)
        return F.normalize(vectors, dim=-1).to(device=device, dtype=dtype)

    key = unit(n)
    queue = None if mode == "in-batch" else unit(m, dtype=queue_dtype)
    bank = key if mode in ("in-batch", "queue+keys") else None
    return Problem(
        loss=loss,
        query=unit(crops, n),
        key=key,
        bank=bank,
        queue=queue,
        offset=0,
        **DEFAULT_HYPER_PARAMETERS[loss],
    )


def _compare(
    backend: str, losses, problem, *, tolerance: float, label: dict, reference_problem=None
) -> dict:
    """One agreement row: the largest relative error of loss and gradients against float64 (the
    reference evaluated on ``reference_problem`` when given, else on ``problem``)."""
    from . import reference
    from .fused.first_use import evaluate, in_float64, relative_error

    row = dict(backend=backend, **label, tolerance=tolerance)
    try:
        got = evaluate(losses, problem, needed=(True, True, True))
    except Exception as error:  # report it as a disagreement, with its reason
        return row | dict(ok=False, error=f"{type(error).__name__}: {error}"[:300])
    want = evaluate(
        reference.losses, in_float64(reference_problem or problem), needed=(True, True, True)
    )
    errors = {name: relative_error(g, w) for name, g, w in zip(ERRORS, got, want)}
    return row | errors | dict(ok=all(e <= tolerance for e in errors.values()))


def _cases(kinds, shapes, device):
    for kind, loss, mode, (crops, n, m, d) in itertools.product(
        kinds, DEFAULT_HYPER_PARAMETERS, MODES, shapes
    ):
        dtype, queue_dtype, precision = KINDS[kind]
        if mode == "in-batch" and queue_dtype != dtype:
            continue  # no queue: the same case as the kind without "fp32 queue"
        yield (
            kind,
            precision,
            make_problem(
                loss,
                mode,
                crops=crops,
                n=n,
                m=m,
                d=d,
                dtype=dtype,
                queue_dtype=queue_dtype,
                device=device,
            ),
            dict(kind=kind, loss=loss, mode=mode, shape=[crops, n, m, d]),
        )


def _agreement_on_gpu(quick: bool) -> list[dict]:
    from . import fused
    from .fused.first_use import TOLERANCES

    rows: list[dict] = []
    if _fused_unavailable(fused):
        return rows
    shapes = GPU_SHAPES[:2] if quick else GPU_SHAPES
    for kind, precision, problem, label in _cases(KINDS, shapes, "cuda"):
        with _matmul_precision(precision):
            tolerance = TOLERANCES[kind.split(",")[0]]
            rows.append(
                _print(_compare("fused", fused.losses, problem, tolerance=tolerance, label=label))
            )
    return rows


def _fused_unavailable(fused) -> bool:
    """Whether the fused kernels cannot run here (Triton missing or unchecked), said if so."""
    reason = fused.triton_reason()
    if reason is not None:
        print(f"The fused kernels are not checked: {reason}.")
    return reason is not None


def _agreement_on_cpu(quick: bool) -> list[dict]:
    rows = []
    from . import chunked

    for _kind, _, problem, label in _cases(
        ("fp32-ieee",), CPU_SHAPES[:1] if quick else CPU_SHAPES, "cpu"
    ):
        rows.append(
            _print(_compare("chunked", chunked.losses, problem, tolerance=1e-5, label=label))
        )
    from . import fused
    from .fused.first_use import TOLERANCES

    if _fused_unavailable(fused):
        return rows

    kinds = ("fp32-ieee", "bf16") if quick else ("fp32-ieee", "bf16", "bf16, fp32 queue", "fp16")
    shapes = INTERPRETER_SHAPES[:1] if quick else INTERPRETER_SHAPES
    explained = False
    for kind, precision, problem, label in _cases(kinds, shapes, "cpu"):
        reference_problem = None
        if problem.queue is not None and problem.queue.dtype != problem.dtype:
            # The kernels convert the queue to the inputs' dtype as they read it: a GPU rounds
            # to nearest, the interpreter may not.
            queue = _as_the_interpreter_converts(problem.queue, problem.dtype)
            if not torch.equal(queue, problem.queue.to(problem.dtype)):
                if not explained:
                    print(INTERPRETER_QUEUE_NOTE)
                    explained = True
                label = label | dict(reference_queue=INTERPRETER_QUEUE)
                reference_problem = dataclasses.replace(problem, queue=queue)
        with _matmul_precision(precision):
            tolerance = TOLERANCES[kind.split(",")[0]]
            rows.append(
                _print(
                    _compare(
                        "fused (interpreter)",
                        fused.losses,
                        problem,
                        tolerance=tolerance,
                        label=label,
                        reference_problem=reference_problem,
                    )
                )
            )
    return rows


INTERPRETER_QUEUE = "converted as the interpreter does (truncated)"
INTERPRETER_QUEUE_NOTE = (
    "Triton's interpreter converts float32 to bfloat16 by truncation (a GPU rounds to nearest): "
    "the fused kernels reading a float32 queue as bfloat16 are compared with the reference given "
    "the queue as the interpreter converts it."
)


def _as_the_interpreter_converts(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``values`` converted to ``dtype`` by a Triton kernel, as the fused kernels' ``.to()``
    converts them: under the interpreter, the interpreter's own rounding."""
    import triton
    import triton.language as tl

    @triton.jit
    def convert(source, target, count, BLOCK: tl.constexpr):
        index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = index < count
        tl.store(
            target + index, tl.load(source + index, mask=ok).to(target.dtype.element_ty), mask=ok
        )

    source = values.contiguous()
    target = torch.empty(source.shape, dtype=dtype, device=source.device)
    count = source.numel()
    convert[(triton.cdiv(count, 1024),)](source, target, count, BLOCK=1024)
    return target


def _print(row: dict) -> dict:
    worst = max((row[k] for k in ERRORS if k in row), default=None)
    status = "ok  " if row["ok"] else "FAIL"
    detail = row.get("error") or (
        f"max relative error {worst:.1e} (tolerance {row['tolerance']:.0e})"
    )
    kind = row["kind"] + (" †" if "reference_queue" in row else "")
    print(
        f"{status} {row['backend']:20} {kind:19} {row['loss']:9} {row['mode']:11} "
        f"{str(row['shape']):22} {detail}",
        flush=True,
    )
    return row


def _matmul_precision(products: str):
    from .fused import plan

    return plan.float32_products(products)


def _timings() -> list[dict]:
    """fwd+bwd milliseconds of each backend at the headline shapes (median of CUDA events)."""
    from . import functional

    rows = []
    for loss, n, d, m, kind in TIMED:
        dtype, queue_dtype, precision = KINDS[kind]
        problem = make_problem(
            loss,
            "queue",
            crops=1,
            n=n,
            m=m,
            d=d,
            dtype=dtype,
            queue_dtype=queue_dtype,
            device="cuda",
        )
        function = getattr(functional, f"{loss}_loss")
        options = {
            k: v for k, v in DEFAULT_HYPER_PARAMETERS[loss].items() if k in _parameters(function)
        }
        row = dict(loss=loss, n=n, d=d, m=m, kind=kind)
        with _matmul_precision(precision):
            for backend in ("fused", "reference", "compiled reference", "chunked"):
                name = "reference" if backend == "compiled reference" else backend

                def step(query, key, queue, name=name):
                    # Called within this iteration only: the loop's function and options.
                    return function(query, key, queue, backend=name, **options)  # noqa: B023

                run = torch.compile(step) if backend == "compiled reference" else step
                row[backend] = _time(run, problem.query[0], problem.key, problem.queue)
        rows.append(row)
        print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    return rows


def _parameters(function) -> set[str]:
    return set(inspect.signature(function).parameters)


def _time(step, query, key, queue, repeats: int = 20) -> float | str:
    """Median milliseconds of loss + backward, the L2 cache flushed before each run."""
    query = query.detach().requires_grad_()
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    times = []
    try:
        for i in range(repeats + 3):
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(query, key, queue).backward()
            end.record()
            torch.cuda.synchronize()
            if i >= 3:  # warm-up (compilation) excluded
                times.append(start.elapsed_time(end))
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "out of memory"
    return sorted(times)[len(times) // 2]


def _verdict(report: dict, failures: list[dict], cuda: bool) -> str:
    checked = len(report["agreement"])
    if failures:
        backends = ", ".join(sorted({row["backend"] for row in failures}))
        return (
            f"DISAGREEMENT: {len(failures)} of {checked} cases ({backends}) exceed their "
            "tolerance: see the table."
        )
    if not cuda:
        return (
            f"All {checked} CPU cases agree with the reference. No GPU here: run this on a "
            "CUDA machine to check and time the fused kernels."
        )
    headline = next((t for t in report["timings"] if isinstance(t.get("fused"), float)), None)
    if headline is None:
        return f"The fused kernels agree with the reference in all {checked} cases."
    speed = ""
    if isinstance(headline.get("reference"), float):
        speed = f" ({headline['reference'] / headline['fused']:.1f}× the eager reference)"
    return (
        f"The fused kernels agree with the reference in all {checked} cases; "
        f"{headline['loss']} N={headline['n']} D={headline['d']} M={headline['m']} "
        f"{headline['kind']} fwd+bwd: {headline['fused']:.3f} ms{speed}."
    )


def _markdown(report: dict) -> str:
    machine = report["machine"]
    lines = [
        f"# sce_loss check: {machine['device']}",
        "",
        f"torch {machine['torch']}, triton {machine['triton']}, Python {machine['python']}",
        "",
        "## Agreement with the float64 reference",
        "",
        "| backend | kind | loss | mode | (V, N, M, D) | loss | query grad | key grad "
        "| τ grad | tolerance | ok |",
        "|" + " --- |" * 11,
    ]
    for row in report["agreement"]:
        errors = [row.get(k) for k in ERRORS]
        cells = [f"{e:.1e}" if isinstance(e, float) else row.get("error", "")[:60] for e in errors]
        kind = row["kind"] + (" †" if "reference_queue" in row else "")
        lines.append(
            f"| {row['backend']} | {kind} | {row['loss']} | {row['mode']} | "
            f"{tuple(row['shape'])} | "
            + " | ".join(cells)
            + f" | {row['tolerance']:.0e} | {'yes' if row['ok'] else '**no**'} |"
        )
    if report["timings"]:
        backends = ("fused", "reference", "compiled reference", "chunked")
        lines += [
            "",
            "## fwd+bwd time (ms, median, L2 flushed)",
            "",
            "| loss | N | D | M | kind | " + " | ".join(backends) + " |",
            "|" + " --- |" * (5 + len(backends)),
        ]
        for row in report["timings"]:
            cells = [f"{row[b]:.3f}" if isinstance(row[b], float) else row[b] for b in backends]
            lines.append(
                f"| {row['loss']} | {row['n']} | {row['d']} | {row['m']} | "
                f"{row['kind']} | " + " | ".join(cells) + " |"
            )
    converted = {row["reference_queue"] for row in report["agreement"] if "reference_queue" in row}
    if converted:
        lines += [
            "",
            f"Rows marked † give the reference the queue {', '.join(converted)}: "
            + INTERPRETER_QUEUE_NOTE.split(": ")[0]
            + ".",
        ]
    lines += ["", f"**Verdict:** {report['verdict']}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
