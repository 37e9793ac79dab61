"""Per-kernel GPU time of the routed-LoRA layer's forward + backward (torch.profiler), one table per variant.

    python benchmarks/gpu_profile.py [--M 8192 --K 4096 --N 4096 --r 16 --E 2] [--out DIR]

Shows where a forward + backward spends its time (backbone GEMMs, shrink, G + dB, dA, the fp32 partial sums),
for the ``fused``, ``cublas`` and ``torch`` variants, bf16, random routes. Writes ``gpu_profile.txt`` to --out;
``--cpu`` runs the script itself on tiny shapes under the Triton interpreter (a self-test, CPU times only).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in (("M", 8192), ("K", 4096), ("N", 4096), ("r", 16), ("E", 2)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--out", default=os.environ.get("OUT") or "runs")
    p.add_argument("--cpu", action="store_true", help="self-test on CPU under the Triton interpreter, tiny shapes")
    args = p.parse_args(argv)
    if args.cpu:
        os.environ["TRITON_INTERPRET"] = "1"
        args.M, args.K, args.N, args.iters = 40, 24, 20, 1
    sys.path.insert(0, str(ROOT))
    import torch
    from torch.profiler import ProfilerActivity, profile

    import routed_lora as rl
    from routed_lora.kernels import launch

    if not torch.cuda.is_available() and not args.cpu:
        print("gpu_profile: needs a CUDA device (or --cpu for a self-test)")
        return 1
    dev, dt = ("cpu", torch.float32) if args.cpu else ("cuda", torch.bfloat16)
    layer = rl.RoutedLoRALinear(args.K, args.N, r=args.r, adapters=[f"a{i}" for i in range(args.E)],
                                device=dev, dtype=dt)
    torch.nn.init.normal_(layer.lora_B, std=0.02)
    x = torch.randn(args.M, args.K, device=dev, dtype=dt, requires_grad=True)
    routes = torch.randint(0, args.E, (args.M,), device=dev, dtype=torch.int32)
    g = torch.randn(args.M, args.N, device=dev, dtype=dt)
    lines = []
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    for variant in ("fused", "cublas", "torch"):
        launch.set_variant(variant)
        rl.set_backend("triton" if variant != "torch" else "torch")

        def step():
            y = layer(x, routes)
            y.backward(g)

        for _ in range(3):
            step()
        sync()
        with profile(activities=acts) as prof:
            for _ in range(args.iters):
                step()
            sync()
        avg = prof.key_averages()
        table = None
        keys = ("self_device_time_total", "self_cuda_time_total") if dev == "cuda" else ("self_cpu_time_total",)
        for key in keys:
            try:
                table = avg.table(sort_by=key, row_limit=14, max_name_column_width=60)
                break
            except Exception:  # noqa: BLE001 (older / newer profiler key names)
                continue
        shape = f"M={args.M} K={args.K} N={args.N} r={args.r} E={args.E}"
        head = f"== variant {variant}: {shape} {str(dt)[6:]}, {args.iters} iters"
        lines += [head, table or "(no table)"]
        print(head, flush=True)
        print(table, flush=True)
    rl.set_backend("auto")
    launch.set_variant("auto")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_profile.txt").write_text("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
