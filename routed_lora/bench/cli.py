"""``routed-lora bench``: the throughput suite, its report, and the kernels' compile report.

    routed-lora bench [--quick] [--device cpu|cuda] [--out DIR] [--providers a,b] [--no-e2e] [--no-decode]
                      [--threads N]
    routed-lora bench report RESULTS.jsonl [--out DIR]
    routed-lora bench compile-report --json [--arch 80 --arch 90]
"""

from __future__ import annotations

import json
import sys

from routed_lora.argtypes import int_at_least

__all__ = ["register"]


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="run the throughput suite (layer and end to end), or print the kernels' compile report",
        description="Run the throughput suite: JSONL records, a markdown report and a plot in --out.",
    )
    p.add_argument("--quick", action="store_true", help="the quick CPU set (within 3 minutes on two idle cores)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available, else cpu)")
    p.add_argument("--out", default="runs/bench", help="output folder (default: runs/bench)")
    p.add_argument("--providers", default=None,
                   help="comma-separated subset of linear,routed_torch,routed_triton,naive,peft (default: all)")
    p.add_argument("--no-e2e", action="store_true", help="skip the end-to-end training step")
    p.add_argument("--no-decode", action="store_true",
                   help="skip the no-grad decode cases and the isolation-cost cases")
    p.add_argument("--threads", type=int_at_least(1), default=None,
                   help="torch.set_num_threads for CPU runs (recorded; 1 is steadier on a loaded machine)")
    p.set_defaults(func=_run_suite)
    sub = p.add_subparsers(dest="bench_command", metavar="SUBCOMMAND")

    c = sub.add_parser("compile-report", help="registers, spills and shared memory of each shipped kernel config")
    c.add_argument("--json", action="store_true", help="print a JSON list of records (the only format)")
    c.add_argument("--arch", type=int_at_least(10), action="append", default=None,
                   help="compute capability to compile for, e.g. 80 or 90 (repeatable; default: 80 and 90)")
    c.set_defaults(func=_run_compile_report)

    r = sub.add_parser("report", help="write report.md and the plot from a results JSONL")
    r.add_argument("results", help="a results.jsonl written by `routed-lora bench`")
    r.add_argument("--out", default=None, help="output folder (default: the JSONL's folder)")
    r.add_argument("--run-id", default=None, help="the run to report (default: the file's last run)")
    r.set_defaults(func=_run_report)


def _run_suite(args) -> int:
    import torch

    from routed_lora.errors import UsageError

    from .providers import PROVIDERS
    from .suite import run_suite

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise UsageError(f"--device: expected cpu or cuda[:N], got {device!r}") from None
    if kind not in ("cpu", "cuda"):
        raise UsageError(f"--device: expected cpu or cuda[:N], got {device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device: cuda asked for, but torch sees no CUDA device")
    providers = [p.strip() for p in args.providers.split(",") if p.strip()] if args.providers else None
    if providers is not None:
        unknown = [p for p in providers if p not in PROVIDERS]
        if unknown or not providers:
            raise UsageError(f"--providers: expected a comma-separated subset of {','.join(PROVIDERS)}, "
                             f"got {args.providers!r}")
    from pathlib import Path

    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out: {args.out} exists and is not a folder")
    if args.threads:
        torch.set_num_threads(args.threads)
    run_suite(device, quick=args.quick, out_dir=args.out, providers=providers, e2e=not args.no_e2e,
              decode=not args.no_decode)
    return 0


def _run_report(args) -> int:
    from pathlib import Path

    from routed_lora.errors import UsageError, for_flag

    from .report import write_report

    if not Path(args.results).is_file():
        raise UsageError(f"results: {args.results}: no such file (a results.jsonl written by `routed-lora bench`)")
    with for_flag("results", KeyError):
        if args.run_id is not None:
            runs = sorted({str(r["run_id"]) for r in _all_rows(args.results)})
            if args.run_id not in runs:
                raise UsageError(f"--run-id: no run {args.run_id!r} in {args.results} (runs: {runs[-5:]})")
        return _write_report(args, write_report)


def _all_rows(path) -> list[dict]:
    from routed_lora.state import read_jsonl_rows

    return [r for r in read_jsonl_rows(path)[0] if "run_id" in r]


def _write_report(args, write_report) -> int:
    md, png = write_report(args.results, args.out, run_id=args.run_id)
    print(md)
    if png:
        print(png)
    return 0


def _run_compile_report(args) -> int:
    import importlib

    from routed_lora.errors import UsageError

    try:
        aot = importlib.import_module("routed_lora.kernels.aot")
    except ImportError as exc:
        raise UsageError(
            "bench compile-report: the AOT compile module routed_lora.kernels.aot is not available "
            f"({type(exc).__name__}: {exc}); it ships with the Triton kernels (kernels/aot.py)") from exc
    if not hasattr(aot, "compile_report"):
        raise UsageError("bench compile-report: routed_lora.kernels.aot has no compile_report()")
    archs = tuple(args.arch) if args.arch else (80, 90)
    try:
        records = aot.compile_report(archs=archs)
    except Exception as exc:  # a missing ptxas/cuobjdump, an unsupported arch...
        print(f"routed-lora bench compile-report: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(records, indent=None if args.json else 2))
    return 0
