"""``routed-lora bench``: the throughput suite, its report, and the kernels' compile report.

    routed-lora bench [--quick] [--device cpu|cuda] [--out DIR] [--providers a,b] [--no-e2e] [--no-decode]
                      [--threads N]
    routed-lora bench report RESULTS.jsonl [--out DIR]
    routed-lora bench compile-report --json [--arch 80 --arch 90]
    routed-lora bench e2e [--model smollm2-135m|FOLDER [--random-weights]] [--device cpu|cuda] [--batch 2 --seq 128]
                          [--budget 60] [--out DIR]
"""

from __future__ import annotations

import json
import sys

from routed_lora.argtypes import finite_float, int_at_least

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

    e = sub.add_parser("e2e", help="the end-to-end training step alone, routed-lora vs PEFT, on a model's real shapes")
    # dest e2e_model, not model: the command line resolves every `model` to a cached folder before the command
    # runs, which needs the model's package; --random-weights needs only the shapes (the GPU machine has no file)
    e.add_argument("--model", dest="e2e_model", metavar="MODEL", default=None,
                   help="smollm2-135m or a model folder (default: the suite's small Qwen2 from a config)")
    e.add_argument("--random-weights", action="store_true",
                   help="with --model: random weights of the model's config (same shapes and cost; no model file "
                        "needed for a registered name)")
    e.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available, else cpu)")
    e.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="default float32 on CPU, bfloat16 on CUDA")
    e.add_argument("--batch", type=int_at_least(1), default=None, help="sequences a step (default: 2 with --model)")
    e.add_argument("--seq", type=int_at_least(2), default=None, help="tokens a sequence (default: 128 with --model)")
    e.add_argument("--r", type=int_at_least(1), default=16, help="rank of each of the two adapters (default 16)")
    e.add_argument("--budget", type=finite_float(0, low_open=True), default=60.0,
                   help="seconds of timed, interleaved steps (at least 3 rounds; default 60)")
    e.add_argument("--threads", type=int_at_least(1), default=None)
    e.add_argument("--out", default="runs/bench", help="appends its rows to OUT/e2e.jsonl (default: runs/bench)")
    e.set_defaults(func=_run_e2e)

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

    device = _device(args.device)
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


def _device(name: str | None) -> str:
    import torch

    from routed_lora.errors import UsageError

    device = name or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise UsageError(f"--device: expected cpu or cuda[:N], got {device!r}") from None
    if kind not in ("cpu", "cuda"):
        raise UsageError(f"--device: expected cpu or cuda[:N], got {device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device: cuda asked for, but torch sees no CUDA device")
    return device


def _run_e2e(args) -> int:
    """One e2e case (:func:`routed_lora.bench.e2e.run_e2e`) with the model's shapes; rows printed as JSON and
    appended to ``OUT/e2e.jsonl`` with the machine's description."""
    import os
    from pathlib import Path

    import torch

    from routed_lora.errors import UsageError

    from .e2e import E2EConfig, e2e_config, run_e2e
    from .suite import machine_info

    device = _device(args.device)
    if args.random_weights and args.e2e_model is None:
        raise UsageError("--random-weights: only with --model (the default model has random weights already)")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out: {args.out} exists and is not a folder")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = args.dtype or ("float32" if torch.device(device).type == "cpu" else "bfloat16")
    if args.e2e_model is None:
        cfg = e2e_config(device)
        for k in ("batch", "seq"):
            if getattr(args, k):
                setattr(cfg, k, getattr(args, k))
        cfg.r, cfg.lora_alpha, cfg.dtype = args.r, 2 * args.r, dtype
    else:
        cfg = E2EConfig(model=args.e2e_model, random_weights=args.random_weights, batch=args.batch or 2,
                        seq=args.seq or 128, r=args.r, lora_alpha=2 * args.r, dtype=dtype)
    rows = run_e2e(device, cfg=cfg, budget_s=args.budget, min_repeats=3)
    info = {**machine_info(device), "loadavg": [round(x, 2) for x in os.getloadavg()]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "e2e.jsonl", "a") as fh:
        for row in rows:
            fh.write(json.dumps({**info, **row}) + "\n")
    for row in rows:
        print(f"{row['model']} {row['provider']}: {row['median_ms'] / 1e3:.3f} s a step "
              f"(p20 {row['p20_ms'] / 1e3:.3f}, p80 {row['p80_ms'] / 1e3:.3f}), {row['tokens_per_s']:.0f} tokens/s, "
              f"time / PEFT {row['time_ratio_to_peft']:.3f} (paired median), n={row.get('n', '?')}")
    print(f"rows appended to {out / 'e2e.jsonl'}")
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
