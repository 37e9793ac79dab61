"""GPU check of the routed-LoRA Triton kernels: every correctness check, then the timing table of issue 3.

    PYTHONPATH=. python benchmarks/gpu_check.py [--out DIR] [--quick]

Works from a plain checkout (no installation, no network): the repository root is put on ``sys.path`` and
``kernels/`` is registered as ``routed_lora.kernels`` by path when the package is not installed.

Correctness (each a PASS/FAIL line, all in the JSON; the benchmark shape autotuned, the odd sizes with one
pinned config per kernel to keep the JIT compilations few): the Triton launchers, ``fused`` and ``cublas``
variants, against the float64 reference with the rule ``max|out - ref64| <= 2 max|ref_lowp - ref64| + atol``
for y, h, dx, dA, dB; bf16 / fp16 / fp32 (ieee); odd sizes (1, 17, 1000 tokens, K and N not multiples of
the tiles); routes random, all one adapter, with -1, an adapter with no tokens (exact zero gradient);
deterministic backward bit-for-bit reproducible; gradient isolation bit-for-bit; the public layer under
torch.compile and autocast.

Timing (bf16, M = 8192, K = N = 4096, r = 16, two adapters, routes random 50/50 and all one adapter):
fused forward, fused forward + backward, the cuBLAS-backbone variant, ``auto``, the PyTorch path, frozen
F.linear forward and forward + dx, a PEFT-style two-adapter layer, and a single-adapter layer. Median, p20,
p80 from ``triton.testing.do_bench`` (L2 flushed between runs). Prints a table and writes
``gpu_check.json`` (rows a script can plot) to ``--out`` (default: $OUT if set, else ``runs/``).

``--cpu`` runs the same code path on tiny shapes under the Triton interpreter (TRITON_INTERPRET=1) with
wall-clock timings, to test the script itself without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bootstrap(cpu: bool):
    if cpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import routed_lora  # noqa: F401

    try:
        import routed_lora.kernels  # noqa: F401  (installed: package_dir maps kernels/ here)
    except ImportError:
        # kernels/ is a namespace folder (no __init__.py; kernels/README.md says why): a module with its path
        mod = types.ModuleType("routed_lora.kernels")
        mod.__path__ = [str(ROOT / "kernels")]
        sys.modules["routed_lora.kernels"] = mod
        routed_lora.kernels = mod
    from routed_lora import backend

    backend._triton_import_error.cache_clear()


# ------------------------------------------------------------------------------------------------------------
# Correctness


def make_inputs(M, K, N, r, E, dtype, device, routes_kind="random", seed=0):
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, device=device)  # noqa: E731
    x = rnd(M, K).to(dtype)
    W = (rnd(N, K) / K**0.5).to(dtype)
    b = rnd(N).to(dtype)
    A = (rnd(E, r, K) / K**0.5).to(dtype)
    B = (rnd(E, N, r) / r**0.5).to(dtype)
    if routes_kind == "random":
        routes = torch.randint(0, E, (M,), generator=g, device=device)
    elif routes_kind == "minus1":
        routes = torch.randint(-1, E, (M,), generator=g, device=device)
    elif routes_kind == "one":
        routes = torch.full((M,), E - 1, device=device)
    elif routes_kind == "empty":  # adapter 0 owns no token
        routes = torch.randint(1, E, (M,), generator=g, device=device)
    else:
        raise ValueError(routes_kind)
    gy = rnd(M, N).to(dtype)
    return x, W, b, A, B, routes.to(torch.int32), gy


def _atol(dtype):
    import torch

    return {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]


def _err(name, got, ref64, low, atol):
    if got.dtype != low.dtype:
        return f"{name}: dtype {got.dtype} != {low.dtype}"
    if tuple(got.shape) != tuple(ref64.shape):
        return f"{name}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    err = (got.double() - ref64).abs().max().item() if got.numel() else 0.0
    bound = 2 * ((low.double() - ref64).abs().max().item() if got.numel() else 0.0) + atol
    if not err <= bound:
        return f"{name}: max |err| {err:.3g} > bound {bound:.3g}"
    return None


def check_launchers(M, K, N, r, E, dtype, routes_kind, variant, device):
    import torch

    from routed_lora.kernels import launch
    from routed_lora.reference import reference_backward, reference_forward

    launch.set_variant(variant)
    x, W, b, A, B, routes, gy = make_inputs(M, K, N, r, E, dtype, device, routes_kind)
    s = 2.0
    before = launch.CALLS.copy()
    y, h = launch.forward(x, W, b, A, B, routes, s)
    y64, h64 = reference_forward(x, W, b, A, B, routes, s, compute_dtype=torch.float64)
    yl, hl = reference_forward(x, W, b, A, B, routes, s)
    problems = []
    scale = max(1.0, y64.abs().max().item() / 8)
    problems += [_err("y", y, y64, yl, _atol(dtype) * scale), _err("h", h, h64, hl, _atol(dtype))]
    dx, dA, dB = launch.backward(gy, x, W, A, B, routes, hl, s, True)
    r64 = reference_backward(gy, x, W, A, B, routes, hl, s, True, compute_dtype=torch.float64)
    rlow = reference_backward(gy, x, W, A, B, routes, hl, s, True)
    for name, got, ref, low in zip(("dx", "dA", "dB"), (dx, dA, dB), r64, rlow):
        sc = max(1.0, ref.abs().max().item() / 8) * (1 if name == "dx" else 4)
        problems.append(_err(name, got, ref, low, _atol(dtype) * sc))
    for e in range(E):
        if not bool((routes == e).any()) and not (bool((dA[e] == 0).all()) and bool((dB[e] == 0).all())):
            problems.append(f"adapter {e} owns no token but its gradient is not exactly 0")
    calls = launch.CALLS - before
    if calls[f"forward_{variant}"] != 1 or calls[f"backward_{variant}"] != 1:
        problems.append(f"variant {variant} did not run: {dict(calls)}")
    again = launch.backward(gy, x, W, A, B, routes, hl, s, True)
    if not all(torch.equal(a, b_) for a, b_ in zip((dx, dA, dB), again)):
        problems.append("deterministic backward is not bit-for-bit reproducible")
    launch.set_variant("auto")
    return [p for p in problems if p]


def check_isolation(device, dtype):
    import torch

    from routed_lora.kernels import launch

    M, K, N = (1000, 512, 384) if device == "cuda" else (40, 20, 19)
    x, W, b, A, B, routes, gy = make_inputs(M, K, N, 8, 2, dtype, device)
    _, h = launch.forward(x, W, b, A, B, routes, 2.0)
    _, dA, dB = launch.backward(gy, x, W, A, B, routes, h, 2.0, False)
    gy2 = gy.clone()
    gy2[routes == 1] *= -3
    _, dA2, dB2 = launch.backward(gy2, x, W, A, B, routes, h, 2.0, False)
    ok = torch.equal(dA[0], dA2[0]) and torch.equal(dB[0], dB2[0])
    return [] if ok else ["changing g at adapter-1 tokens changed adapter 0's gradient"]


def check_layer_compile_autocast(device):
    import torch

    import routed_lora as rl
    from routed_lora.kernels import launch

    problems = []
    torch.manual_seed(0)
    layer = rl.RoutedLoRALinear(256, 192, r=8, device=device)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 33, 256, device=device, requires_grad=True)
    routes = torch.randint(-1, 2, (2, 33), device=device)
    rl.set_backend("torch")
    with torch.autocast(device, dtype=torch.bfloat16):
        y_ref = layer(x, routes)
    y_ref.float().square().sum().backward()
    ref = (y_ref.detach().float(), x.grad.clone(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone())
    x.grad = None
    layer.zero_grad(set_to_none=True)
    rl.set_backend("triton")
    before = launch.CALLS.copy()
    try:
        fn = torch.compile(layer, fullgraph=True) if device == "cuda" else layer
        with torch.autocast(device, dtype=torch.bfloat16):
            y = fn(x, routes)
        y.float().square().sum().backward()
    finally:
        rl.set_backend("auto")
    calls = launch.CALLS - before
    if calls["forward"] < 1 or calls["backward"] < 1:
        problems.append(f"the layer did not run the kernels: {dict(calls)}")
    if y.dtype != torch.bfloat16:
        problems.append(f"autocast output dtype {y.dtype}")
    got = (y.detach().float(), x.grad, layer.lora_A.grad, layer.lora_B.grad)
    for name, a, b_ in zip(("y", "dx", "dA", "dB"), got, ref):
        err = (a.float() - b_.float()).abs().max().item()
        tol = 0.05 * max(1.0, b_.float().abs().max().item())
        if not err <= tol:
            problems.append(f"layer {name}: triton vs torch backend max |err| {err:.3g} > {tol:.3g}")
    return problems


def _recorder(results):
    def record(name, fn, *args):
        t0 = time.perf_counter()
        try:
            problems = fn(*args)
        except Exception as exc:  # a crash is a failure with its traceback, the other checks still run
            problems = [f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=6)}"]
        status = "PASS" if not problems else "FAIL"
        print(f"[{status}] {name} ({time.perf_counter() - t0:.1f} s)" + "".join(f"\n    {p}" for p in problems),
              flush=True)
        results.append({"check": name, "ok": not problems, "problems": problems})

    return record


def run_big_checks(device, results):
    """The benchmark shape, autotuned (this also autotunes the kernels the timings use)."""
    import torch

    record = _recorder(results)
    M, K, N, r, E = (8192, 4096, 4096, 16, 2) if device == "cuda" else (130, 33, 18, 16, 2)
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    for variant in ("fused", "cublas"):
        for kind in ("random", "one"):
            name = f"{variant} {str(dt)[6:]} M={M} K={K} N={N} r={r} E={E} routes={kind} (autotuned)"
            record(name, check_launchers, M, K, N, r, E, dt, kind, variant, device)


def run_small_checks(device, quick, results):
    """Odd sizes, every dtype, every route pattern; one pinned config per kernel (fewer JIT compilations)."""
    import torch

    from routed_lora.kernels import launch

    record = _recorder(results)
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    if device == "cuda":
        cases = [
            (bf16, (1, 256, 384, 8, 2), "minus1"),
            (bf16, (17, 1000, 520, 16, 3), "empty"),
            (bf16, (1000, 512, 1000, 4, 2), "one"),
            (bf16, (333, 256, 256, 128, 8), "minus1"),
            (fp16, (17, 1000, 520, 16, 3), "random"),
            (fp32, (1000, 1000, 520, 16, 3), "minus1"),
        ]
    else:
        cases = [(fp32, (17, 40, 37, 8, 3), "minus1"), (fp16, (1, 24, 20, 4, 2), "empty")]
    if quick:
        cases = cases[:2]
    launch.pin_configs(True)
    try:
        for variant in ("fused", "cublas"):
            for dtype, (M, K, N, r, E), kind in cases:
                name = f"{variant} {str(dtype)[6:]} M={M} K={K} N={N} r={r} E={E} routes={kind} (pinned config)"
                record(name, check_launchers, M, K, N, r, E, dtype, kind, variant, device)
    finally:
        launch.pin_configs(False)
    record("gradient isolation bit-for-bit", check_isolation, device, fp32 if device == "cpu" else bf16)
    if device == "cuda":
        record("layer under torch.compile + autocast", check_layer_compile_autocast, device)


# ------------------------------------------------------------------------------------------------------------
# Timing


def _bench(fn, device, reps):
    """(median, p20, p80) in ms."""
    if device == "cuda":
        import triton.testing

        q = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=25, rep=reps)
        return tuple(float(v) for v in q)
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return statistics.median(times), times[0], times[-1]


def peft_style_layer(base_W, base_b, A, B, s):
    """Two-adapter PEFT-style layer: base(x) + sum_e s * lora_B_e(lora_A_e(x)) * [route == e]."""
    import torch.nn.functional as F

    def fwd(x, routes):
        y = F.linear(x, base_W, base_b)
        for e in range(A.shape[0]):
            delta = F.linear(F.linear(x, A[e]), B[e]) * s
            y = y + delta * (routes == e).unsqueeze(-1).to(delta.dtype)
        return y

    return fwd


def run_timings(device, M, K, N, r, E, reps):
    import torch
    import torch.nn.functional as F

    import routed_lora as rl
    from routed_lora.kernels import launch

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rows = []
    for routes_kind in ("random", "one"):
        x, W, b, A, B, routes, gy = make_inputs(M, K, N, r, E, dtype, device, routes_kind)
        s = 2.0
        xg = x.clone().requires_grad_(True)
        Ap, Bp = A.clone().requires_grad_(True), B.clone().requires_grad_(True)

        def routed(variant, backward, backend="triton", A_=Ap, B_=Bp, routes_=routes):
            def fn():
                launch.set_variant(variant)
                rl.set_backend(backend)
                try:
                    if backward:
                        y = rl.routed_lora_linear(xg, W, b, A_, B_, routes_, s, check_route_values=False)
                        y.backward(gy)
                        xg.grad = A_.grad = B_.grad = None
                    else:
                        with torch.no_grad():
                            rl.routed_lora_linear(x, W, b, A_, B_, routes_, s, check_route_values=False)
                finally:
                    rl.set_backend("auto")
                    launch.set_variant("auto")

            return fn

        def linear_fwd():
            with torch.no_grad():
                F.linear(x, W, b)

        def linear_fwd_dx():
            y = F.linear(xg, W, b)
            y.backward(gy)
            xg.grad = None

        peft = peft_style_layer(W, b, Ap, Bp, s)

        def peft_fwd():
            with torch.no_grad():
                peft(x, routes)

        def peft_fwd_bwd():
            y = peft(xg, routes)
            y.backward(gy)
            xg.grad = Ap.grad = Bp.grad = None

        A1, B1 = Ap[:1].detach().clone().requires_grad_(True), Bp[:1].detach().clone().requires_grad_(True)
        zeros = torch.zeros_like(routes)
        cases = [
            ("F.linear (frozen) fwd", linear_fwd),
            ("F.linear (frozen) fwd+dx", linear_fwd_dx),
            ("routed fused fwd", routed("fused", False)),
            ("routed fused fwd+bwd", routed("fused", True)),
            ("routed cublas-backbone fwd", routed("cublas", False)),
            ("routed cublas-backbone fwd+bwd", routed("cublas", True)),
            ("routed auto fwd", routed("auto", False)),
            ("routed auto fwd+bwd", routed("auto", True)),
            ("PyTorch path fwd", routed("auto", False, backend="torch")),
            ("PyTorch path fwd+bwd", routed("auto", True, backend="torch")),
            ("PEFT-style 2-adapter fwd", peft_fwd),
            ("PEFT-style 2-adapter fwd+bwd", peft_fwd_bwd),
            ("single adapter (E=1) auto fwd", routed("auto", False, A_=A1, B_=B1, routes_=zeros)),
            ("single adapter (E=1) auto fwd+bwd", routed("auto", True, A_=A1, B_=B1, routes_=zeros)),
        ]
        for name, fn in cases:
            try:
                med, p20, p80 = _bench(fn, device, reps)
                rows.append({"case": name, "routes": routes_kind, "median_ms": med, "p20_ms": p20, "p80_ms": p80})
            except Exception as exc:
                rows.append({"case": name, "routes": routes_kind, "error": f"{type(exc).__name__}: {exc}"})
            print(f"  {name:36s} {routes_kind:6s} " + (
                f"{rows[-1]['median_ms']:9.3f} ms  (p20 {rows[-1]['p20_ms']:.3f}, p80 {rows[-1]['p80_ms']:.3f})"
                if "median_ms" in rows[-1] else rows[-1]["error"]), flush=True)
    return rows


def targets(rows):
    t = {(r["case"], r["routes"]): r.get("median_ms") for r in rows}

    def ratio(a, b, routes="random"):
        x, y = t.get((a, routes)), t.get((b, routes))
        return None if not x or not y else x / y

    out = []
    for label, num, den, limit, routes in [
        ("fused fwd / F.linear fwd <= 1.05", "routed fused fwd", "F.linear (frozen) fwd", 1.05, "random"),
        ("auto fwd / F.linear fwd <= 1.05", "routed auto fwd", "F.linear (frozen) fwd", 1.05, "random"),
        ("fused fwd+bwd / F.linear fwd+dx <= 1.12", "routed fused fwd+bwd", "F.linear (frozen) fwd+dx", 1.12, "random"),
        ("auto fwd+bwd / F.linear fwd+dx <= 1.12", "routed auto fwd+bwd", "F.linear (frozen) fwd+dx", 1.12, "random"),
        ("auto fwd+bwd / PEFT-style fwd+bwd <= 1/1.3", "routed auto fwd+bwd", "PEFT-style 2-adapter fwd+bwd", 1 / 1.3,
         "random"),
        ("auto fwd / PyTorch path fwd <= 1.0", "routed auto fwd", "PyTorch path fwd", 1.0, "random"),
        ("auto fwd+bwd / PyTorch path fwd+bwd <= 1.0", "routed auto fwd+bwd", "PyTorch path fwd+bwd", 1.0, "random"),
        ("routed (random) fwd+bwd / single adapter fwd+bwd <= 1.02", "routed auto fwd+bwd",
         "single adapter (E=1) auto fwd+bwd", 1.02, "random"),
    ]:
        r = ratio(num, den, routes)
        out.append({"target": label, "ratio": r, "limit": limit, "met": None if r is None else r <= limit + 1e-9})
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or "runs")
    p.add_argument("--quick", action="store_true", help="fewer correctness shapes")
    p.add_argument("--cpu", action="store_true", help="tiny shapes under the Triton interpreter (script self-test)")
    p.add_argument("--skip-checks", action="store_true")
    p.add_argument("--reps", type=int, default=200, help="do_bench rep time in ms per case")
    args = p.parse_args(argv)

    _bootstrap(args.cpu)
    import torch
    import triton

    import routed_lora
    from routed_lora.kernels import launch

    device = "cpu" if args.cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --cpu for the interpreter self-test)", file=sys.stderr)
        return 2
    info = {
        "device": (torch.cuda.get_device_name() if device == "cuda"
                   else f"cpu (Triton interpreter, {platform.processor()})"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "routed_lora": getattr(routed_lora, "__version__", "?"),
        "cuda": torch.version.cuda,
        "deterministic": launch.get_deterministic(),
        "allow_tf32": torch.backends.cuda.matmul.allow_tf32,
    }
    print(json.dumps(info), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    checks, rows, tg = [], [], []
    t_start = time.perf_counter()

    def write(phase):
        best = {}
        for key, runner in launch._AUTOTUNERS.items():
            cfg = getattr(runner, "best_config", None)
            if cfg is not None:
                best[str(key)] = {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
        payload = {"info": info, "phase_done": phase, "elapsed_s": time.perf_counter() - t_start,
                   "checks": checks, "timings": rows, "targets": tg, "autotuned": best,
                   "variant_choice": {str(k): v for k, v in launch.VARIANT_CACHE.items()},
                   "variant_errors": {str(k): v for k, v in launch.VARIANT_ERRORS.items()}}
        (out / "gpu_check.json").write_text(json.dumps(payload, indent=2, default=str))

    # Order: the benchmark shape first (it autotunes what the timings use), the timings, then the other checks,
    # writing the JSON after each phase so a run cut short still leaves its results.
    if not args.skip_checks:
        run_big_checks(device, checks)
        write("big checks")
    M, K, N, r, E = (8192, 4096, 4096, 16, 2) if device == "cuda" else (64, 48, 40, 16, 2)
    print(f"timings: {info['device']}, {'bf16' if device == 'cuda' else 'fp32'}, M={M} K={K} N={N} r={r} E={E}",
          flush=True)
    rows += run_timings(device, M, K, N, r, E, args.reps)
    for row in rows:
        row.update({"M": M, "K": K, "N": N, "r": r, "E": E, "dtype": "bf16" if device == "cuda" else "fp32",
                    "device": info["device"], "version": info["routed_lora"]})
    tg += targets(rows)
    print("targets:")
    for t in tg:
        verdict = "n/a" if t["ratio"] is None else f"{t['ratio']:.3f}  {'MET' if t['met'] else 'NOT MET'}"
        print(f"  {t['target']:58s} {verdict}")
    write("timings")
    if not args.skip_checks:
        run_small_checks(device, args.quick, checks)
    write("all")
    n_fail = sum(not c["ok"] for c in checks)
    print(f"checks: {len(checks) - n_fail} passed, {n_fail} failed; {time.perf_counter() - t_start:.0f} s; "
          f"wrote {out / 'gpu_check.json'}")
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
