"""Every GPU target of issue 11 (item 6), measured by device time in one run; JSON + markdown table.

    PYTHONPATH=. python benchmarks/gpu_targets.py [--out DIR] [--docs docs] [--skip-e2e] [--cpu]

Targets (H100/H200, bf16, M = 8192, K = N = 4096, r = 16, E = 2, routes random over both adapters):

    fused forward                  <= 1.06 x F.linear forward
    fused forward + backward       <= 1.10 x F.linear forward + dx (g @ W)
    routed (E = 2, random routes)  <= 1.02 x one adapter (E = 1, every token routed to it), forward + backward
    training step, Qwen2.5-1.5B shape from its config (bf16, 8k tokens, all linear layers routed)
                                   >= 1.10 x PEFT's two-adapter tokens/s
    decode, M = 16 (no grad)       <= 1.00 x PEFT's two-adapter masked forward

Layer times are device times: ``launch.device_time_ms`` captures 10 calls in a CUDA graph and times replays
between events (no host time, however slow the host), repeated ``--repeats`` times (median, p20, p80 over the
repeats). Ratios compare runs of the same process, measured side by side. The training step is wall-clock
tokens/s over interleaved steps (``routed_lora.bench.e2e.run_e2e``), because a whole optimiser step is not
graph-captured. Decode is reported both in device time and in eager wall time per call (the host cost a
rollout pays).

Also recorded: launches per fused forward / backward (torch profiler kernel count), scratch bytes of the plan,
the variant ``auto`` chose, the versions. ``--cpu`` runs the script on tiny shapes under the interpreter with
wall-clock timing, to test the script itself.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _q(values, q):
    v = sorted(values)
    return v[min(len(v) - 1, max(0, round(q * (len(v) - 1))))]


def _timer(device):
    import torch

    from routed_lora.kernels import launch

    if device == "cuda":
        return lambda fn: launch.device_time_ms(fn, calls=10, replays=3)

    def wall(fn):
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    del torch
    return wall


def measure(fn, device, repeats):
    timer = _timer(device)
    ts = [timer(fn) for _ in range(repeats)]
    return {"median_ms": statistics.median(ts), "p20_ms": _q(ts, 0.2), "p80_ms": _q(ts, 0.8), "n": len(ts)}


def layer_inputs(M, K, N, r, E, dtype, device, seed=0):
    """x, W, b, A, B, routes (random over the adapters, int32), g: gpu_check.py's inputs (one definition)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from gpu_check import make_inputs
    finally:
        sys.path.pop(0)
    return make_inputs(M, K, N, r, E, dtype, device, "random", seed)


def count_kernels(fn, device):
    """Device kernels launched by one ``fn()`` (torch profiler), or None without CUDA."""
    if device != "cuda":
        return None
    import torch
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def layer_targets(device, dtype, shape, repeats, rows, info):
    import torch
    import torch.nn.functional as F

    from routed_lora.kernels import launch

    M, K, N, r, E = shape
    s = 2.0
    x, W, b, A, B, routes, gy = layer_inputs(M, K, N, r, E, dtype, device)
    A1, B1 = A[:1].contiguous(), B[:1].contiguous()  # one adapter, every token routed to it
    routes1 = torch.zeros_like(routes)

    def fwd(variant, A_=A, B_=B, rt=routes):
        def run():
            launch.set_variant(variant)
            return launch.forward(x, W, b, A_, B_, rt, s)

        return run

    def fwd_bwd(variant, A_=A, B_=B, rt=routes):
        def run():
            launch.set_variant(variant)
            _, h = launch.forward(x, W, b, A_, B_, rt, s)
            return launch.backward(gy, x, W, A_, B_, rt, h, s, True)

        return run

    def lin_fwd():
        return F.linear(x, W, b)

    def lin_fwd_dx():
        F.linear(x, W, b)
        return gy @ W

    cases = {"linear_fwd": lin_fwd, "linear_fwd_dx": lin_fwd_dx}
    for v in ("fused", "cublas", "torch", "auto"):
        cases[f"{v}_fwd"] = fwd(v)
        cases[f"{v}_fwd_bwd"] = fwd_bwd(v)
    cases["fused_fwd_bwd_one_adapter"] = fwd_bwd("fused", A1, B1, routes1)
    cases["auto_fwd_bwd_one_adapter"] = fwd_bwd("auto", A1, B1, routes1)
    res = {}
    for name, fn in cases.items():
        try:
            res[name] = measure(fn, device, repeats)
            rows.append({"kind": "layer", "case": name, "M": M, "K": K, "N": N, "r": r, "E": E,
                         "dtype": str(dtype), **res[name], **info})
            print(f"  {name:32s} {res[name]['median_ms']:.4f} ms", flush=True)
        except Exception as exc:  # keep going: one failing case must not hide the others
            rows.append({"kind": "layer", "case": name, "error": f"{type(exc).__name__}: {exc}"})
            print(f"  {name:32s} ERROR {type(exc).__name__}: {exc}", flush=True)
    launch.set_variant("auto")
    launches = {"fused_forward": count_kernels(fwd("fused"), device)}
    _, h = fwd("fused")()

    def bwd_only():
        launch.set_variant("fused")
        return launch.backward(gy, x, W, A, B, routes, h, s, True)

    launches["fused_backward"] = count_kernels(bwd_only, device)
    launch.set_variant("auto")
    return res, launches


def decode_targets(device, dtype, repeats, rows, info, K=4096, N=4096, r=16, M=16):
    import torch
    from torch import nn

    import routed_lora as rl
    from routed_lora.bench.providers import ADAPTER_NAMES, peft_lora_linear, peft_masked_forward

    torch.manual_seed(0)
    layer = rl.RoutedLoRALinear(K, N, r=r, lora_alpha=2 * r, device=device, dtype=dtype)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.02)
    base = nn.Linear(K, N, device=device, dtype=dtype)
    with torch.no_grad():
        base.weight.copy_(layer.weight)
        base.bias.copy_(layer.bias)
    peft = peft_lora_linear(base, r, 2 * r, ADAPTER_NAMES).to(device=device, dtype=dtype)
    with torch.no_grad():
        for e, a in enumerate(ADAPTER_NAMES):
            peft.lora_A[a].weight.copy_(layer.lora_A[e])
            peft.lora_B[a].weight.copy_(layer.lora_B[e])
    x = torch.randn(M, K, device=device, dtype=dtype)
    routes = torch.randint(-1, 2, (M,), device=device, dtype=torch.int32)
    rl.set_routes(layer, routes)
    masks = {a: (routes == e).to(dtype).unsqueeze(-1) for e, a in enumerate(ADAPTER_NAMES)}

    def routed():
        with torch.no_grad():
            return layer(x)

    def peft_fwd():
        with torch.no_grad():
            return peft_masked_forward(peft, x, masks)

    def linear():
        with torch.no_grad():
            return base(x)

    res = {}
    for name, fn in (("decode_routed", routed), ("decode_peft", peft_fwd), ("decode_linear", linear)):
        res[name] = measure(fn, device, repeats)
        # eager wall time per call (host cost included), median of 200 calls after a warm-up
        for _ in range(10):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        n = 200 if device == "cuda" else 5
        for _ in range(n):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        res[name]["eager_wall_us"] = (time.perf_counter() - t0) / n * 1e6
        rows.append({"kind": "decode", "case": name, "M": M, "K": K, "N": N, "r": r, "E": 2, "dtype": str(dtype),
                     **res[name], **info})
        print(f"  {name:32s} {res[name]['median_ms'] * 1e3:.1f} us device, {res[name]['eager_wall_us']:.1f} us "
              "eager wall", flush=True)
    return res


def e2e_target(device, rows, info, cpu):
    from routed_lora.bench.e2e import E2EConfig, run_e2e

    if cpu:
        cfg = E2EConfig(hidden=64, intermediate=128, layers=1, heads=4, kv_heads=2, vocab=128, batch=1, seq=32,
                        dtype="float32")
    else:  # Qwen2.5-1.5B's shape (hidden 1536, MLP 8960, 28 layers, 12 / 2 heads, vocab 151936), 8k tokens
        cfg = E2EConfig(hidden=1536, intermediate=8960, layers=28, heads=12, kv_heads=2, vocab=151936, batch=4,
                        seq=2048, r=16, lora_alpha=32, dtype="bfloat16")
    out = run_e2e(device, cfg=cfg, budget_s=2.0 if cpu else 40.0, min_repeats=2 if cpu else 6)
    for r in out:
        rows.append({**r, **info})
    return {r["provider"]: r for r in out}


def _ratio(res, a, b):
    if a in res and b in res and "median_ms" in res[a] and "median_ms" in res[b]:
        return res[a]["median_ms"] / res[b]["median_ms"]
    return None


def build_targets(layer, decode, e2e):
    t = []

    def add(name, value, bound, kind="<="):
        met = None if value is None else (value <= bound if kind == "<=" else value >= bound)
        t.append({"target": name, "value": value, "bound": f"{kind} {bound}", "met": met})

    if layer is not None:
        add("fused fwd / F.linear fwd", _ratio(layer, "fused_fwd", "linear_fwd"), 1.06)
        add("auto fwd / F.linear fwd", _ratio(layer, "auto_fwd", "linear_fwd"), 1.06)
        add("fused fwd+bwd / F.linear fwd+dx", _ratio(layer, "fused_fwd_bwd", "linear_fwd_dx"), 1.10)
        add("auto fwd+bwd / F.linear fwd+dx", _ratio(layer, "auto_fwd_bwd", "linear_fwd_dx"), 1.10)
        add("routed (E=2 random) / one adapter, fused fwd+bwd",
            _ratio(layer, "fused_fwd_bwd", "fused_fwd_bwd_one_adapter"), 1.02)
        add("fused fwd+bwd / PyTorch path fwd+bwd", _ratio(layer, "fused_fwd_bwd", "torch_fwd_bwd"), 1.0)
    if e2e is not None and "routed_lora" in e2e and "peft" in e2e:
        add("training step tokens/s: routed / PEFT two-adapter",
            e2e["routed_lora"]["tokens_per_s"] / e2e["peft"]["tokens_per_s"], 1.10, ">=")
    if decode is not None:
        add("decode M=16 device time: routed / PEFT", _ratio(decode, "decode_routed", "decode_peft"), 1.0)
        if "decode_routed" in decode and "decode_peft" in decode:
            add("decode M=16 eager wall: routed / PEFT",
                decode["decode_routed"]["eager_wall_us"] / decode["decode_peft"]["eager_wall_us"], 1.0)
    return t


def markdown(info, targets, layer, launches, scratch, decode, e2e) -> str:
    lines = [f"## GPU targets (issue 11, item 6): {info.get('device_name', '?')}", "",
             f"{info.get('date')}; torch {info.get('torch')}, triton {info.get('triton')}; "
             f"bf16, M = 8192, K = N = 4096, r = 16, E = 2 unless noted; device time by CUDA-graph replay.", "",
             "| target | measured | bound | met |", "|---|---|---|---|"]
    for t in targets:
        v = "n/a" if t["value"] is None else f"{t['value']:.3f}"
        m = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
        lines.append(f"| {t['target']} | {v} | {t['bound']} | {m} |")
    if layer:
        lines += ["", "| layer case | median ms | p20 | p80 |", "|---|---|---|---|"]
        for k, v in layer.items():
            lines.append(f"| {k} | {v['median_ms']:.4f} | {v['p20_ms']:.4f} | {v['p80_ms']:.4f} |")
    if launches:
        lines += ["", f"Kernels per fused call (torch profiler): forward {launches.get('fused_forward')}, "
                      f"backward {launches.get('fused_backward')}. Scratch (plan): {scratch} bytes."]
    if decode:
        lines += ["", "| decode M=16 | device us | eager wall us |", "|---|---|---|"]
        for k, v in decode.items():
            lines.append(f"| {k} | {v['median_ms'] * 1e3:.1f} | {v['eager_wall_us']:.1f} |")
    if e2e:
        lines += ["", "| training step | tokens/s | p20 | p80 |", "|---|---|---|---|"]
        for k, v in e2e.items():
            lines.append(f"| {k} | {v['tokens_per_s']:.0f} | {v['tokens_per_s_p20']:.0f} | "
                         f"{v['tokens_per_s_p80']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu")
    p.add_argument("--docs", default=str(ROOT / "docs"), help="where gpu_targets.md / .json go ('' to skip)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--cpu", action="store_true", help="tiny shapes under the Triton interpreter (self-test)")
    args = p.parse_args(argv)
    if args.cpu:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import triton

    import routed_lora as rl
    from routed_lora.kernels import launch

    device = "cpu" if args.cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_targets: no CUDA device (use --cpu for the self-test)")
    rl.set_backend("triton")
    info = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
            "triton": triton.__version__, "python": platform.python_version(),
            "device_name": torch.cuda.get_device_name(0) if device == "cuda" else "cpu (interpreter)"}
    if device == "cuda":
        info["tma"] = launch._device_tma(0)
    shape = (8192, 4096, 4096, 16, 2) if device == "cuda" else (40, 48, 40, 4, 2)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    scratch = launch.scratch_bytes(*shape, dtype=dtype, sm_count=launch._sm_count(0) if device == "cuda" else 132)
    rows, layer, launches, decode, e2e = [], None, None, None, None
    sections = [("layer", lambda: layer_targets(device, dtype, shape, args.repeats, rows, info))]
    sections.append(("decode", lambda: decode_targets(device, dtype, args.repeats, rows, info,
                                                      *((4096, 4096, 16, 16) if device == "cuda" else (48, 40, 4, 16)))))
    if not args.skip_e2e:
        sections.append(("e2e", lambda: e2e_target(device, rows, info, args.cpu)))
    errors = {}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def write(final):
        targets = build_targets(layer, decode, e2e)
        md = markdown(info, targets, layer, launches, scratch, decode, e2e)
        payload = {"info": info, "complete": final, "targets": targets, "layer": layer, "launches": launches,
                   "scratch_bytes": scratch, "decode": decode, "e2e": e2e, "rows": rows, "errors": errors,
                   "variant_choice": {str(k): v for k, v in launch.VARIANT_CACHE.items()},
                   "variant_errors": {str(k): v for k, v in launch.VARIANT_ERRORS.items()}}
        text = json.dumps(payload, indent=2, default=str)
        (out / "gpu_targets.json").write_text(text)
        (out / "gpu_targets.md").write_text(md)
        if args.docs and not args.cpu:  # written after every section: a run cut short keeps what it measured
            (Path(args.docs) / "gpu_targets.json").write_text(text)
            (Path(args.docs) / "gpu_targets.md").write_text(md)
        return md

    for name, fn in sections:
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        try:
            result = fn()
        except Exception as exc:
            errors[name] = traceback.format_exc()
            print(f"{name} failed: {type(exc).__name__}: {exc}", flush=True)
            write(False)
            continue
        if name == "layer":
            layer, launches = result
        elif name == "decode":
            decode = result
        else:
            e2e = result
        print(f"   ({time.perf_counter() - t0:.0f} s)", flush=True)
        write(False)
    print(write(True))
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
