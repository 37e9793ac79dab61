"""Per-step cost of GRPO on the demo's configuration, this checkout against an older one, side by side.

    PYTHONPATH=. python benchmarks/grpo_step_cost.py --sft runs/demo/sft --world runs/demo/world \\
        --before /path/to/old/routed_lora --reps 3

One process loads both versions of ``env/rollout.py`` and ``grpo_update`` (``grpo/update.py``, or
``grpo/trainer.py`` before the trainer was split; the old files from ``--before``,
a ``routed_lora`` package folder of an older commit, e.g. ``git archive c86aac2 routed_lora | tar -x -C old``)
and alternates them on the same work, so a shared machine's drift biases neither:

- rollouts: one step's batch (32 questions x G = 8, the demo's settings) from the same RNG state; wall and CPU
  seconds, and prefill tokens (tokens fed in multi-token forward calls, padding included: the new loop's
  ``meters``; for the old one the ``input_ids`` of each ``model.generate`` call, which re-encodes the transcript);
- updates: ``grpo_update`` on one rollout batch from the same adapter and optimiser state, with the demo's two
  mini-batches and with one (the new code runs no old-policy pass in either: the first mini-batch's old
  log-probs are its own first forward, the later ones' the rollout's, ``GRPOConfig.old_logprobs``).

Prints JSON rows (one per timed run) and a summary with medians and new/old ratios.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _timed(fn):
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sft", required=True)
    ap.add_argument("--world", required=True)
    ap.add_argument("--before", required=True, help="routed_lora package folder of the older version")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    import routed_lora.env.rollout as new_ro
    import routed_lora.grpo.trainer as new_tr
    from routed_lora.env.data import load_qa, make_prompt
    from routed_lora.env.retriever import BM25Retriever
    from routed_lora.grpo.trainer import GRPOConfig, Trainer, adapter_state, build_policy, load_adapter_state
    from routed_lora.grpo.trainer import load_model_and_tokenizer

    before = Path(a.before)
    old_ro = _load(before / "env" / "rollout.py", "routed_lora.env._rollout_before")
    # grpo_update: in grpo/update.py since the trainer was split (issue 22), in grpo/trainer.py before
    old_update = before / "grpo" / "update.py"
    old_tr = _load(old_update if old_update.exists() else before / "grpo" / "trainer.py",
                   "routed_lora.grpo._trainer_before")

    cfg = GRPOConfig(mode="dart", prompts_per_step=32, group_size=8, lr=5e-4, max_turns=4, topk=3,
                     max_new_tokens=48, max_total_tokens=400, temperature=1.0, beta=0.001, mini_batches=2,
                     micro_batch_size=64, seed=a.seed)
    torch.manual_seed(a.seed)
    model, tok = load_model_and_tokenizer(a.sft)
    model, router = build_policy(model, tok, cfg)
    retriever = BM25Retriever(Path(a.world) / "corpus.jsonl")
    rows = load_qa(Path(a.world) / "train.jsonl")[: cfg.prompts_per_step]
    prompts = [make_prompt(r["question"]) for r in rows for _ in range(cfg.group_size)]
    plen = max(len(tok(p)["input_ids"]) for p in prompts)
    kw = dict(max_turns=cfg.max_turns, max_new_tokens=cfg.max_new_tokens, max_length=plen + cfg.max_total_tokens,
              topk=cfg.topk, do_sample=True, temperature=cfg.temperature, return_logprobs=True)
    model.eval()
    results = []

    def rollout(which):
        torch.manual_seed(a.seed + 1)
        if which == "new":
            m = {}
            rolls, wall, cpu = _timed(lambda: new_ro.generate_rollouts(model, tok, prompts, retriever, meters=m, **kw))
            pre = m["prefill_tokens"]
        else:
            count = {"n": 0}
            real = model.generate

            def gen(*args, **k):
                count["n"] += int(k["input_ids"].numel())
                return real(*args, **k)

            model.generate = gen
            try:
                rolls, wall, cpu = _timed(lambda: old_ro.generate_rollouts(model, tok, prompts, retriever, **kw))
            finally:
                del model.generate
            pre = count["n"]
        return rolls, {"phase": "rollout", "version": which, "wall_s": wall, "cpu_s": cpu, "prefill_tokens": pre,
                       "tokens": sum(len(r.completion_ids) for r in rolls),
                       "tool_calls": sum(r.num_tool_calls for r in rolls) / len(rolls)}

    for _ in range(a.reps):
        for which in ("old", "new"):
            _, row = rollout(which)
            results.append(row)
            print(json.dumps(row), flush=True)

    # one rollout batch for the updates (the trainer's own collect)
    trainer = Trainer(cfg, model, tok, router, retriever, rows, out=Path("/tmp/grpo_step_cost"), progress=False)
    torch.manual_seed(a.seed + 2)
    batch, routes, _ = trainer.collect(rows)
    state0 = adapter_state(model)
    opt0 = copy.deepcopy(trainer.optimizer.optimizer.state_dict())
    for _ in range(a.reps):
        for mb in (2, 1):
            for which, tr in (("old", old_tr), ("new", new_tr)):
                c = GRPOConfig.from_dict({**cfg.to_dict(), "mini_batches": mb})
                load_adapter_state(model, state0)
                trainer.optimizer.optimizer.load_state_dict(copy.deepcopy(opt0))
                model.train()
                _, wall, cpu = _timed(lambda: tr.grpo_update(model, model, trainer.optimizer, batch, routes, c))
                model.eval()
                row = {"phase": f"update_mb{mb}", "version": which, "wall_s": wall, "cpu_s": cpu}
                results.append(row)
                print(json.dumps(row), flush=True)

    summary = {}
    for phase in sorted({r["phase"] for r in results}):
        for key in ("wall_s", "cpu_s", "prefill_tokens"):
            med = {}
            for which in ("old", "new"):
                vals = [r[key] for r in results if r["phase"] == phase and r["version"] == which and key in r]
                if vals:
                    med[which] = statistics.median(vals)
            if len(med) == 2:
                summary[f"{phase}/{key}"] = {**med, "new/old": med["new"] / med["old"]}
    print(json.dumps({"summary": summary, "reps": a.reps, "threads": a.threads}, indent=1), flush=True)


if __name__ == "__main__":
    main()
