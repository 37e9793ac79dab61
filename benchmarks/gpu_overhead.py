"""Host (launch) overhead and steady-state time of the routed-LoRA layer, forward + backward, per variant.

    python benchmarks/gpu_overhead.py [--out DIR] [--cpu]

Two measurements, each over back-to-back calls with one synchronisation at the end (as in training, where the
host runs ahead of the GPU):
  * small shape (M = 16, K = N = 256): the GPU work is negligible, so time per call = host overhead per call;
  * issue 3's shape (bf16, M = 8192, K = N = 4096, r = 16, E = 2): steady-state time per call.
Providers: frozen F.linear (forward + dx), routed-lora ``torch`` / ``fused`` / ``cublas`` / ``auto``, and a
PEFT-style two-adapter layer. Then a cProfile of the ``fused`` small-shape calls (where the host time goes).
Writes ``gpu_overhead.json`` and ``gpu_overhead_profile.txt`` to --out. ``--cpu``: tiny self-test under the
Triton interpreter.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or "runs")
    p.add_argument("--cpu", action="store_true")
    args = p.parse_args(argv)
    if args.cpu:
        os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, str(ROOT))
    import torch
    import torch.nn.functional as F

    import routed_lora as rl
    from routed_lora.kernels import launch

    dev = "cpu" if args.cpu else "cuda"
    dt = torch.float32 if args.cpu else torch.bfloat16
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    shapes = {"small": (16, 256, 256), "issue3": (8192, 4096, 4096)} if not args.cpu else {"small": (16, 32, 32)}
    rows = []
    for label, (M, K, N) in shapes.items():
        layer = rl.RoutedLoRALinear(K, N, r=16, device=dev, dtype=dt)
        torch.nn.init.normal_(layer.lora_B, std=0.02)
        x = torch.randn(M, K, device=dev, dtype=dt, requires_grad=True)
        g = torch.randn(M, N, device=dev, dtype=dt)
        routes = torch.randint(0, 2, (M,), device=dev, dtype=torch.int32)
        rl.set_routes(layer, routes)  # checked once, as a model does
        A, B, s = layer.lora_A, layer.lora_B, layer.scaling

        def peft_style():
            y = F.linear(x, layer.weight, layer.bias)
            for e in range(2):
                d = F.linear(F.linear(x, A[e]), B[e]) * s
                y = y + d * (routes == e).unsqueeze(-1).to(d.dtype)
            y.backward(g)

        def routed(variant):
            def fn():
                launch.set_variant(variant if variant != "torch" else "auto")
                rl.set_backend("torch" if variant == "torch" else "triton")
                layer(x).backward(g)

            return fn

        providers = {
            "F.linear fwd+dx": lambda: F.linear(x, layer.weight, layer.bias).backward(g),
            "routed torch": routed("torch"),
            "routed fused": routed("fused"),
            "routed cublas": routed("cublas"),
            "routed auto": routed("auto"),
            "PEFT-style 2-adapter": peft_style,
        }
        calls = 200 if label == "small" else 30
        if args.cpu:
            calls = 2
        for name, fn in providers.items():
            try:
                for _ in range(3):
                    fn()
                sync()
                best = float("inf")
                for _ in range(3):
                    t0 = time.perf_counter()
                    for _ in range(calls):
                        fn()
                    sync()
                    best = min(best, (time.perf_counter() - t0) / calls * 1e3)
                rows.append({"shape": label, "M": M, "K": K, "N": N, "provider": name, "ms_per_call": best})
                print(f"{label:7s} {name:24s} {best:8.4f} ms/call", flush=True)
            except Exception as exc:  # noqa: BLE001 (report and go on)
                print(f"{label:7s} {name:24s} FAILED {type(exc).__name__}: {exc}", flush=True)
        if label == "small":
            fn = routed("fused")
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(calls):
                fn()
            sync()
            prof.disable()
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
            profile_text = buf.getvalue()
    rl.set_backend("auto")
    launch.set_variant("auto")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_overhead.json").write_text(json.dumps(rows, indent=1))
    (out / "gpu_overhead_profile.txt").write_text(profile_text)
    print(profile_text[:6000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
