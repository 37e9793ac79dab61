"""GRPO step time of two whole versions of the package on the demo's configuration, alternated in fresh processes.

    git archive c86aac2 | tar -x -C /tmp/old          # any older commit, whole
    PYTHONPATH=. python benchmarks/grpo_step_versions.py --sft runs/demo/sft --world runs/demo/world \\
        --before /tmp/old --reps 3 --steps 3 --threads 2

Unlike ``grpo_step_cost.py`` (which swaps only ``rollout.py`` and ``grpo_update`` inside one process, so both
sides share today's layer, log-prob and router code), each run here imports one version's whole ``routed_lora``
in its own process and trains ``--steps`` GRPO steps from the same warm start with the same seed (the demo's
GRPOConfig: 32 questions x G = 8, 2 mini-batches, beta = 0.001), with no evaluation. Versions alternate
run by run (old, new, old, new, ...) so a shared machine's drift biases neither. A step's time is the trainer's
own ``rollout_s + update_s`` (rollouts, reward, old/reference/update passes and the optimiser steps). The two
versions sample different tokens from the same seed (the rollout loop changed), so the responses differ in
length: the summary also gives the step time per 1,000 response tokens.

Prints one JSON row per run and a summary: the median step time of each version and new/old.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

# the demo's GRPO settings (routed_lora/demo.py), fixed here so that both versions get the same ones
DEMO = dict(mode="dart", prompts_per_step=32, group_size=8, lr=5e-4, max_turns=4, topk=3, max_new_tokens=48,
            max_total_tokens=400, temperature=1.0, beta=0.001, mini_batches=2, micro_batch_size=64, seed=0)


def worker(a) -> None:
    """Train ``a.steps`` steps with the ``routed_lora`` found first on sys.path; print the steps' rows."""
    import torch

    torch.set_num_threads(a.threads)
    from routed_lora.env.data import load_qa
    from routed_lora.env.retriever import BM25Retriever
    from routed_lora.grpo.trainer import GRPOConfig, Trainer, build_policy, load_model_and_tokenizer
    import routed_lora

    cfg = GRPOConfig(**DEMO, steps=a.steps, save_every=10 ** 6)
    torch.manual_seed(0)
    model, tok = load_model_and_tokenizer(a.sft)
    model, router = build_policy(model, tok, cfg)
    retriever = BM25Retriever(Path(a.world) / "corpus.jsonl")
    rows = load_qa(Path(a.world) / "train.jsonl")
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(cfg, model, tok, router, retriever, rows, out=Path(out) / "grpo", progress=False)
        trainer.train(evaluate_before=False, evaluate_after=False)
        steps = [json.loads(line) for line in (Path(out) / "grpo" / "metrics.jsonl").read_text().splitlines()
                 if line.strip()]
    steps = [s for s in steps if "rollout_s" in s]
    print(json.dumps({"package": str(Path(routed_lora.__file__).parent),
                      "rollout_s": [s["rollout_s"] for s in steps], "update_s": [s["update_s"] for s in steps],
                      "reward_mean": [s["reward_mean"] for s in steps],
                      "response_tokens": [round(s["response_len"] * s["rollouts"]) for s in steps]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sft", required=True, help="the warm start (the demo's runs/demo/sft)")
    ap.add_argument("--world", required=True, help="the built-in world (the demo's runs/demo/world)")
    ap.add_argument("--before", required=True, help="root of the older checkout (holding routed_lora/)")
    ap.add_argument("--after", default=str(Path(__file__).resolve().parents[1]), help="root of the newer one")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a)
    for name, root in (("before", a.before), ("after", a.after)):
        if not (Path(root) / "routed_lora" / "__init__.py").exists():
            sys.exit(f"--{name}: no routed_lora package under {root}")
    runs = {"old": [], "new": []}
    for rep in range(a.reps):
        for which, root in (("old", a.before), ("new", a.after)):
            env = {**os.environ, "PYTHONPATH": str(Path(root).resolve())}
            cmd = [sys.executable, __file__, "--worker", "--sft", a.sft, "--world", a.world, "--before", a.before,
                   "--steps", str(a.steps), "--threads", str(a.threads)]
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tempfile.gettempdir())
            if res.returncode:
                sys.exit(f"{which} run failed:\n{res.stderr[-3000:]}")
            row = json.loads(res.stdout.strip().splitlines()[-1])
            row["step_s"] = [r + u for r, u in zip(row["rollout_s"], row["update_s"])]
            row["step_ms_per_1k_tokens"] = [1e6 * t / n for t, n in zip(row["step_s"], row["response_tokens"])]
            runs[which].append(row)
            print(json.dumps({"rep": rep, "version": which, **row}), flush=True)
    summary = {}
    for key in ("step_s", "rollout_s", "update_s", "step_ms_per_1k_tokens"):
        med = {w: statistics.median(v for r in runs[w] for v in r[key]) for w in runs}
        summary[key] = {**med, "new/old": med["new"] / med["old"]}
    same = all(o["reward_mean"] == n["reward_mean"] for o, n in zip(runs["old"], runs["new"]))
    print(json.dumps({"summary": summary, "steps": a.steps, "reps": a.reps, "threads": a.threads,
                      "same_rewards": same}, indent=1), flush=True)


if __name__ == "__main__":
    main()
