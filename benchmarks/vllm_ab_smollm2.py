"""Routing overhead in one vLLM engine, interleaved (docs/vllm.md, "Measured here"): on a model folder (default the
float32 SmolLM2-135M of ``routed_lora.pretrained.resolve_model``), one LoRA engine serves in turn, round after
round with the order rotated: no-LoRA requests, one plain LoRA on vLLM's ops, one plain LoRA on our op
(``ROUTED_LORA_VLLM_CPU_OP=all``), routed requests (our op). One engine and one process, so all four share the
same slots, cores and moment; the per-round ratios routed / one plain LoRA are the routing overhead.

    .venv-vllm/bin/python benchmarks/vllm_ab_smollm2.py [--model FOLDER] [--seqs 16] [--tokens 32] [--rounds 5]

Adapters: reasoning and tool, r 8 on every projection, random weights; half the prompts end in ``<search>`` (so
about half the sampled tokens are routed to the tool adapter); 1 thread (VLLM_CPU_OMP_THREADS_BIND=0).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

for _k, _v in {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
               "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}.items():
    os.environ.setdefault(_k, _v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="/work/main/runs/test-cache/smollm2-135m")
    ap.add_argument("--seqs", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import routed_lora as rl

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    rl.apply_routed_lora(model, r=8, lora_alpha=16, router=rl.TagRouter(tok, default="reasoning"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in rl.hf.routed_layers(model):
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.1)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
    work = Path(tempfile.mkdtemp(prefix="vllm-ab-"))
    rl.save_adapters(model, work / "adapters")
    del model

    import vllm

    from routed_lora.integrations.vllm import RoutedLLM, engine_kwargs

    texts = ["who was born in paris ? <think>", "what river is in rome ? <search>"]
    prompts = [tok(texts[i % 2])["input_ids"] for i in range(args.seqs)]
    llm = vllm.LLM(model=args.model, **engine_kwargs(work / "adapters"), enforce_eager=True, seed=0,
                   max_model_len=max(map(len, prompts)) + args.tokens + 8, max_num_seqs=args.seqs,
                   enable_prefix_caching=False)
    r = RoutedLLM(llm, work / "adapters")
    sp = vllm.SamplingParams(max_tokens=args.tokens, temperature=1.0, ignore_eos=True, logprobs=0)
    variants = [("no_lora_requests", None, "routed"), ("one_lora_vllm_ops", "reasoning", "routed"),
                ("one_lora_our_op", "reasoning", "all"), ("routed_our_op", "routed", "routed")]
    res: dict[str, list[float]] = {}
    n_tok = args.seqs * args.tokens
    for rep in range(args.rounds + 1):  # round 0 warms up
        k = rep % len(variants)
        for name, adapter, mode in variants[k:] + variants[:k]:
            os.environ["ROUTED_LORA_VLLM_CPU_OP"] = mode  # read by the plugin every step (in-process engine core)
            t = time.perf_counter()
            outs = r.generate(prompts, sp, adapter=adapter)
            dt = time.perf_counter() - t
            if rep:
                res.setdefault(name, []).append(round(n_tok / dt, 1))
            if adapter == "routed" and rep == 1:
                gen = [x for o in outs for x in o.routes[len(o.prompt_ids):]]
                print("tool fraction of sampled tokens", sum(x == 1 for x in gen) / len(gen))
    for k, v in res.items():
        print(k, "tok/s median", statistics.median(v), "range", min(v), max(v), v)
    for a, b in (("routed_our_op", "one_lora_our_op"), ("routed_our_op", "no_lora_requests"),
                 ("one_lora_our_op", "one_lora_vllm_ops")):
        rr = [x / y for x, y in zip(res[a], res[b])]
        print(f"{a} / {b} per round", [round(x, 3) for x in rr], "median", round(statistics.median(rr), 3))
    print("loadavg", os.getloadavg())


if __name__ == "__main__":
    main()
