"""The LoRA terms of one decoding step, op by op: vLLM's CPU punica wrapper as shipped (its torch ops) vs our op
(routed_lora/integrations/vllm/cpu_lora.py), on the layer shapes of a model, beside the backbone GEMMs.

    .venv-vllm/bin/python benchmarks/vllm_cpu_lora_op.py [--model tiny|smollm2] [--tokens 256] [--calls 30]

For each LoRA layer kind of the model (packed q/k/v, o, packed gate/up, down; 3 slots, rank 8, fp32) and each
slot mix (one slot on every token: a plain-LoRA batch; a routed mix: slots 0 and 1, 60/40), the three are timed
in turn, call after call (interleaved, so other jobs on the machine hit all of them alike), and the median of
``--calls`` calls is kept, and the fastest (under load a long GEMM is interrupted far more often than a short
op, so the medians overstate the long ones; the minima are the least disturbed figures): the backbone GEMM ``x W^T``, vLLM's ``add_lora_linear``, ours (the slot plan, made once
per step in the plugin, made here once per call: an upper bound). Per step = sum over the model's layers. One
thread (``torch.set_num_threads(1)``): the figures are per core. Prints one JSON line per model and mix.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

SHAPES = {  # per LoRA layer kind (K, output slices): packed q/k/v, o, packed gate/up, down; and decoder layers
    "tiny": (((64, (64, 32, 32)), (64, (64,)), (64, (128, 128)), (128, (64,))), 2),
    "smollm2": (((576, (576, 192, 192)), (576, (576,)), (576, (1536, 1536)), (1536, (576,))), 30),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", choices=sorted(SHAPES))
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--slots", type=int, default=3)
    ap.add_argument("--rank", type=int, default=8)
    args = ap.parse_args()

    import torch
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU  # unpatched: the plugin is not registered

    from routed_lora.integrations.vllm import plugin
    from routed_lora.integrations.vllm.cpu_lora import SlotPlan, lora_linear_

    assert not plugin._registered, "the plugin must not be registered here (vLLM's own ops are the baseline)"
    torch.set_num_threads(1)
    layers, n_layers = SHAPES[args.model]
    T, L, R = args.tokens, args.slots, args.rank
    g = torch.Generator().manual_seed(0)
    mixes = {"one_slot": torch.zeros(T, dtype=torch.long),
             "routed_mix": (torch.rand(T, generator=g) < 0.4).long()}
    for mix, idx in mixes.items():
        w = PunicaWrapperCPU(T, 8, device="cpu")
        w._token_lora_indices[:T] = idx
        w.indices_len[:] = [T, T, T, T]
        w.is_prefill = False  # a decoding step: vLLM's per-token (bgmv) ops
        per_kind, tot = [], {"backbone": 0.0, "vllm_ops": 0.0, "our_op": 0.0}
        tot_min = dict(tot)
        for K, slices in layers:
            x = torch.randn(T, K, generator=g)
            W = torch.randn(sum(slices), K, generator=g)
            A = tuple(torch.randn(L, 1, R, K, generator=g) * 0.1 for _ in slices)
            B = tuple(torch.randn(L, 1, n, R, generator=g) * 0.1 for n in slices)
            y = x @ W.t()
            y1, y2 = y.clone(), y.clone()
            w.add_lora_linear(y1, x, A, B, 1.0, slices)
            lora_linear_(y2, x, A, B, 1.0, slices, SlotPlan(idx, L))
            assert (y1 - y2).abs().max() <= 1e-4, "our op and vLLM's disagree"
            fns = {"backbone": lambda: x @ W.t(),
                   "vllm_ops": lambda: w.add_lora_linear(y1, x, A, B, 1.0, slices),
                   "our_op": lambda: lora_linear_(y2, x, A, B, 1.0, slices, SlotPlan(idx, L))}
            times = {k: [] for k in fns}
            for _ in range(3):
                for f in fns.values():
                    f()
            for _ in range(args.calls):
                for k, f in fns.items():
                    t = time.perf_counter()
                    f()
                    times[k].append(time.perf_counter() - t)
            med = {k: statistics.median(v) * 1e6 for k, v in times.items()}
            best = {k: min(v) * 1e6 for k, v in times.items()}
            per_kind.append({"K": K, "slices": list(slices), **{k + "_us": round(v, 1) for k, v in med.items()},
                             **{k + "_min_us": round(v, 1) for k, v in best.items()}})
            for k in med:
                tot[k] += med[k] * n_layers / 1e3
                tot_min[k] += best[k] * n_layers / 1e3
        print(json.dumps({"model": args.model, "mix": mix, "tokens": T, "slots": L, "rank": R, "threads": 1,
                          "per_step_ms": {k: round(v, 2) for k, v in tot.items()},
                          "lora_over_backbone": {k: round(tot[k] / tot["backbone"], 3) for k in ("vllm_ops", "our_op")},
                          "per_step_min_ms": {k: round(v, 2) for k, v in tot_min.items()},
                          "lora_over_backbone_min": {k: round(tot_min[k] / tot_min["backbone"], 3)
                                                     for k in ("vllm_ops", "our_op")},
                          "layers": per_kind, "loadavg": os.getloadavg()[0]}), flush=True)


if __name__ == "__main__":
    main()
