"""Rollout throughput side by side on the same cores (docs/vllm.md): HF routed ``generate`` (our patched model),
vLLM without LoRA, vLLM with one plain LoRA on every request, vLLM routed (the routed-lora plugin).

    .venv-vllm/bin/python benchmarks/vllm_rollout.py [--prompts 32] [--group 8] [--tokens 64] [--repeats 3]
        [--out runs/bench/vllm_rollout.jsonl]

Tiny Qwen2 built from a config (hidden 64, 2 layers, head size 32; no download), fp32, random adapters, sampled
at temperature 1 with EOS ignored (every sequence is ``--tokens`` long). Rows (JSON lines): engine, median and
p20/p80 of the decode throughput in generated tokens/s over ``--repeats`` timed runs after one warm-up, with the
shapes, dtype, threads, package/vLLM versions and the load average. Run on an otherwise idle machine; vLLM binds
its threads with VLLM_CPU_OMP_THREADS_BIND (default here 0-1), HF uses ``torch.set_num_threads(--threads)``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path


def _quantiles(xs):
    xs = sorted(xs)
    q = lambda f: xs[min(len(xs) - 1, max(0, round(f * (len(xs) - 1))))]  # noqa: E731
    return statistics.median(xs), q(0.2), q(0.8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--engines", default="hf,vllm_nolora,vllm_lora,vllm_routed")
    ap.add_argument("--out", default="runs/bench/vllm_rollout.jsonl")
    args = ap.parse_args()
    for k, v in {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": f"0-{args.threads - 1}",
                 "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}.items():
        os.environ.setdefault(k, v)

    import torch

    import routed_lora as rl
    from routed_lora.testing import tiny_model, tiny_tokenizer

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="vllm-bench-"))
    tok = tiny_tokenizer()
    model = tiny_model("qwen2", vocab_size=len(tok), hidden=64, layers=2, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=32)
    model.save_pretrained(work / "model")
    tok.save_pretrained(work / "model")
    router = rl.TagRouter(tok, default="reasoning")
    rl.apply_routed_lora(model, r=8, lora_alpha=16, router=router)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in rl.hf.routed_layers(model):
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.1)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
    rl.save_adapters(model, work / "adapters")
    texts = ["who was born in paris ? <think>", "the capital of france is", "what river is in rome ? <search>",
             "who founded the company ? <think> bob"]
    prompts = [tok(texts[i % len(texts)])["input_ids"] for i in range(args.prompts) for _ in range(args.group)]
    n_seq, n_tok = len(prompts), len(prompts) * args.tokens
    engines = args.engines.split(",")
    rows = []

    def record(engine, times, **extra):
        med, p20, p80 = _quantiles([n_tok / t for t in times])
        import vllm

        row = dict(engine=engine, tok_per_s_median=round(med, 1), tok_per_s_p20=round(p20, 1),
                   tok_per_s_p80=round(p80, 1), sequences=n_seq, new_tokens=args.tokens, dtype="float32",
                   model="tiny qwen2 h64 l2", threads=args.threads, repeats=args.repeats,
                   routed_lora=rl.__version__, vllm=vllm.__version__, torch=torch.__version__,
                   loadavg=os.getloadavg()[0], device="cpu", **extra)
        rows.append(row)
        print(json.dumps(row), flush=True)

    if "hf" in engines:
        from transformers import GenerationConfig

        ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(p[::-1]) for p in prompts], batch_first=True,
                                              padding_value=tok.pad_token_id).flip(1)
        att = (ids != tok.pad_token_id).long()
        gc = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=args.tokens,
                              min_new_tokens=args.tokens, pad_token_id=tok.pad_token_id, eos_token_id=None)
        times = []
        for i in range(args.repeats + 1):
            t = time.perf_counter()
            with torch.no_grad():
                model.generate(input_ids=ids, attention_mask=att, generation_config=gc)
            if i:
                times.append(time.perf_counter() - t)
        record("hf_routed_generate", times)

    import gc

    import vllm

    from routed_lora.integrations.vllm import RoutedLLM, engine_kwargs

    kw = dict(max_num_seqs=n_seq, enforce_eager=True, enable_prefix_caching=False, seed=0, max_model_len=256)
    sp = vllm.SamplingParams(max_tokens=args.tokens, temperature=1.0, ignore_eos=True, logprobs=0)

    def timed(fn):
        times = []
        for i in range(args.repeats + 1):  # the first run warms up
            t = time.perf_counter()
            fn()
            if i:
                times.append(time.perf_counter() - t)
        return times

    def close(llm):
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:  # noqa: BLE001
            pass
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        gc.collect()
        destroy_model_parallel()
        destroy_distributed_environment()

    if "vllm_nolora" in engines:
        llm = vllm.LLM(model=str(work / "model"), dtype="float32", **kw)
        toks = [vllm.inputs.TokensPrompt(prompt_token_ids=p) for p in prompts]
        record("vllm_no_lora", timed(lambda: llm.generate(toks, sp, use_tqdm=False)))
        close(llm)
        del llm
    if "vllm_lora" in engines or "vllm_routed" in engines:
        # one LoRA engine for both: the same slots and cores
        llm = vllm.LLM(model=str(work / "model"), **engine_kwargs(work / "adapters"), **kw)
        routed = RoutedLLM(llm, work / "adapters")
        if "vllm_lora" in engines:
            record("vllm_one_lora", timed(lambda: routed.generate(prompts, sp, adapter="reasoning")))
        if "vllm_routed" in engines:
            record("vllm_routed", timed(lambda: routed.generate(prompts, sp, adapter="routed")))
        close(llm)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"rows appended to {out}")


if __name__ == "__main__":
    main()
