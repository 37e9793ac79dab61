"""``routed-lora demo``: GRPO with two routed LoRA adapters (DART) on the built-in search world, on a CPU.

Steps (each writes under ``--out``, default ``runs/demo``):

1. ``world/``: a generated world (people, cities, countries, companies; one passage per fact), its BM25 corpus,
   1-hop and 2-hop questions with a held-out split, and a tiny randomly initialised Qwen2 with a word-level
   tokenizer (:mod:`routed_lora.env`);
2. ``sft/``: a short warm start on scripted expert trajectories (the model starts at zero reward, and GRPO alone
   does not cross the "copy from the retrieved text" jump, DESIGN.md §3b);
3. ``grpo/``: GRPO in DART mode: the backbone frozen, a ``reasoning`` and a ``tool`` LoRA adapter routed per token
   by the tag router (tool inside ``<search>`` ... ``</search>``), rollouts with the real tool loop;
4. held-out exact match before and after GRPO, greedy and sampled at the training temperature (mean over G
   samples), 1-hop and 2-hop apart, with the exact McNemar p-value of the greedy results (paired: the same
   questions before and after; :mod:`routed_lora.study.stats`); per-question results in
   ``per_question.jsonl``; adapters saved in PEFT format; ``metrics.jsonl`` and ``metrics.png``.

The whole run is sized for about 5-8 minutes on 2 CPU cores; ``--quick`` is a ~1 minute smoke version. The
GRPO phase stops early when ``--grpo-budget`` seconds are spent (the summary says so).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

# The warm start stops short of solving 2-hop questions so GRPO has room: with Search-R1's passage text
# (issue 14) 300 steps on 10% (or even 2%) of the 2-hop questions reach 2-hop greedy EM 0.97-1.00; 250 steps on
# 3% give 0.47 (1-hop 0.98), measured on the default world, seed 0.
FULL = dict(sft_steps=250, two_hop_frac=0.03, grpo_steps=200, prompts=32, G=8, eval_n=200, grpo_budget=330.0, lr=5e-4, people=400,
            time_limit=560.0)
QUICK = dict(sft_steps=250, two_hop_frac=0.1, grpo_steps=6, prompts=16, G=4, eval_n=40, grpo_budget=25.0, lr=5e-4, people=400,
             time_limit=110.0)


def warm_start(world_dir: Path, out: Path, *, steps: int, eval_n: int, two_hop_frac: float = 1.0, seed: int = 0,
               threads: int = 2, progress: bool = True) -> dict:
    """The env's SFT warm start (:func:`routed_lora.env.sft.run_sft`) on all 1-hop and ``two_hop_frac`` of the
    2-hop training questions (a partial warm start leaves 2-hop questions for GRPO)."""
    import inspect

    from routed_lora.env.sft import run_sft

    kw = dict(steps=steps, eval_n=eval_n, seed=seed, progress=progress, threads=threads)
    if "two_hop_frac" in inspect.signature(run_sft).parameters:
        kw["two_hop_frac"] = two_hop_frac
    return run_sft(world_dir, out, **kw)


class _Stop(Exception):
    """Raised by :func:`train_within`'s step callback to end training after a step."""


def train_within(trainer, cfg, model, grpo_dir: Path, *, budget: float, limit: float, t_all: float, reserve: float,
                 on_step=None, **train_kw) -> tuple[dict, dict]:
    """``trainer.train(**train_kw)``, stopped after a step (with a checkpoint) when the next step would overrun the
    GRPO ``budget`` (seconds from now) or the demo's time ``limit`` (seconds from ``t_all``) minus ``reserve`` (what
    the final evaluation and saving will take); a step's cost is taken as the last one's. ``on_step`` sees every
    step's metrics row first. Returns (the train result, or ``{"steps": n}`` when stopped; ``{"at": step or None,
    "why": reason}``)."""
    from routed_lora.grpo.trainer import save_checkpoint

    t0 = time.perf_counter()
    stopped = {"at": None, "why": None}

    def callback(row):
        if on_step is not None:
            on_step(row)
        now = time.perf_counter()
        step_s = row["rollout_s"] + row["update_s"]
        if row["step"] >= cfg.steps:
            return
        if now - t0 + step_s > budget:
            stopped.update(at=row["step"], why=f"the {budget:.0f} s GRPO budget")
        elif (now - t_all) + step_s + reserve > limit:
            stopped.update(at=row["step"], why=f"the {limit:.0f} s time limit of the demo")
        if stopped["at"]:
            raise _Stop

    try:
        result = trainer.train(callback=callback, **train_kw)
    except _Stop:
        save_checkpoint(grpo_dir, model=model, optimizer=trainer.optimizer, step=trainer.step, cfg=cfg)
        result = {"steps": trainer.step}
    return result, stopped


def balanced_rows(rows, n: int, seed: int = 0) -> list[dict]:
    """Up to ``n`` rows, half 1-hop and half 2-hop, deterministic."""
    import random

    rng = random.Random(seed)
    by = {}
    for r in rows:
        by.setdefault(int(r.get("hops", 0)), []).append(r)
    out = []
    for h in sorted(by):
        g = by[h][:]
        rng.shuffle(g)
        out += g[: max(1, n // len(by))]
    return out


def run_demo(out: Path, *, quick: bool = False, threads: int = 2, progress: bool = True, seed: int = 0,
             **overrides) -> dict:
    from routed_lora.env.cli import build_default_world
    from routed_lora.env.data import load_qa
    from routed_lora.env.retriever import BM25Retriever
    from routed_lora.grpo.evaluate import format_eval
    from routed_lora.grpo.plot import plot_metrics
    from routed_lora.grpo.trainer import GRPOConfig, Trainer, build_policy, load_model_and_tokenizer

    import routed_lora as rl

    p = dict(QUICK if quick else FULL)
    p.update({k: v for k, v in overrides.items() if v is not None})
    torch.set_num_threads(threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    timings = {}

    # 1. the world
    t = time.perf_counter()
    world_dir = out / "world"
    if not (world_dir / "model" / "config.json").exists():
        build_default_world(world_dir, seed=seed, people=p["people"])
    timings["world_s"] = time.perf_counter() - t
    print(f"[1/4] world: {world_dir} ({timings['world_s']:.1f} s)", flush=True)

    # 2. warm start
    t = time.perf_counter()
    sft_dir = out / "sft"
    prev = sft_dir / "sft_summary.json"
    sft = json.loads(prev.read_text()) if prev.exists() else None
    if sft is not None and (sft.get("steps"), sft.get("two_hop_frac", 1.0)) == (p["sft_steps"], p["two_hop_frac"]) \
            and (sft_dir / "config.json").exists():
        print(f"      (reusing the warm start in {sft_dir}; delete it to redo)")
        timings["sft_reused"] = True
    else:
        sft = warm_start(world_dir, sft_dir, steps=p["sft_steps"], eval_n=p["eval_n"], two_hop_frac=p["two_hop_frac"],
                         seed=seed, threads=threads, progress=progress)
    timings["sft_s"] = time.perf_counter() - t
    ev = sft["eval"]
    took = f"reused, trained in {sft.get('train_seconds', float('nan')):.1f} s" if timings.get("sft_reused") \
        else f"in {timings['sft_s']:.1f} s"
    print(f"[2/4] warm start: {p['sft_steps']} SFT steps ({took}); held-out greedy EM "
          f"{ev['em']:.3f} (1-hop {ev.get('em_1hop', float('nan')):.3f}, 2-hop {ev.get('em_2hop', float('nan')):.3f})"
          f" -> {sft_dir}", flush=True)

    # 3. GRPO, DART mode
    t = time.perf_counter()
    cfg = GRPOConfig(mode="dart", steps=p["grpo_steps"], prompts_per_step=p["prompts"], group_size=p["G"],
                     lr=p["lr"], max_turns=4, topk=3, max_new_tokens=48, max_total_tokens=400, temperature=1.0,
                     beta=0.001, mini_batches=2, micro_batch_size=64, save_every=25, seed=seed)
    torch.manual_seed(seed)
    model, tok = load_model_and_tokenizer(sft_dir)
    model, router = build_policy(model, tok, cfg)
    retriever = BM25Retriever(world_dir / "corpus.jsonl")
    train_rows = load_qa(world_dir / "train.jsonl")
    eval_rows = balanced_rows(load_qa(world_dir / "test.jsonl"), p["eval_n"], seed=seed)
    grpo_dir = out / "grpo"
    trainer = Trainer(cfg, model, tok, router, retriever, train_rows, out=grpo_dir, eval_rows=eval_rows,
                      eval_samples=cfg.group_size, progress=progress)

    def evaluate(records: list) -> dict:  # the trainer's evaluation, with per-question records
        from routed_lora.grpo.evaluate import evaluate_em

        return evaluate_em(model, tok, eval_rows, retriever, samples=trainer.eval_samples,
                           temperature=cfg.temperature, max_turns=cfg.max_turns, max_new_tokens=cfg.max_new_tokens,
                           topk=cfg.topk, prompt_template=trainer.template, seed=cfg.seed + 7919, records=records)

    recs_before, recs_after = [], []
    ev_before = evaluate(recs_before)
    print(f"      held-out before GRPO: {format_eval(ev_before)} ({ev_before['eval_seconds']:.0f} s)", flush=True)

    # stop GRPO early (with a checkpoint and the same final evaluation) when the time runs out: the GRPO budget,
    # or the whole demo's time limit minus what the final evaluation and saving will take
    budget = float(p["grpo_budget"])
    limit = float(p["time_limit"])
    trainer.progress_desc = f"grpo {cfg.mode} (up to {cfg.steps} steps or {budget:.0f} s)"
    reserve = 1.3 * ev_before["eval_seconds"] + 15.0

    from routed_lora.grpo.trainer import MetricsWriter

    result, stopped_early = train_within(trainer, cfg, model, grpo_dir, budget=budget, limit=limit, t_all=t_all,
                                         reserve=reserve, evaluate_before=ev_before, evaluate_after=False)
    ev_after = evaluate(recs_after)
    MetricsWriter(grpo_dir / "metrics.jsonl", resume_step=10**9).write({"eval": "after", "step": trainer.step,
                                                                        **ev_after})
    result["evals"] = {"before": ev_before, "after": ev_after}
    _write_jsonl(out / "per_question.jsonl",
                 [{"when": w, **r} for w, rs in (("before", recs_before), ("after", recs_after)) for r in rs])
    timings["grpo_s"] = time.perf_counter() - t
    steps_done = result["steps"]
    print(f"[3/4] GRPO (dart): {steps_done} steps x {cfg.prompts_per_step} questions x G={cfg.group_size} in "
          f"{timings['grpo_s']:.1f} s incl. evaluations"
          + (f" (stopped early by {stopped_early['why']})" if stopped_early["at"] else ""),
          flush=True)

    # 4. save, plot, summarise
    adapters_dir = rl.save_adapters(model, out / "adapters")
    png = plot_metrics(grpo_dir / "metrics.jsonl", out / "metrics.png",
                       title=f"routed-lora demo: GRPO, DART mode ({steps_done} steps)")
    (out / "metrics.jsonl").write_text((grpo_dir / "metrics.jsonl").read_text())
    before, after = result["evals"]["before"], result["evals"]["after"]
    train_rows_m = [json.loads(x) for x in (grpo_dir / "metrics.jsonl").read_text().splitlines()
                    if x.strip() and "eval" not in json.loads(x)]
    timings["total_s"] = time.perf_counter() - t_all
    summary = {
        "quick": quick, "params": p, "timings": timings, "steps": steps_done, "stopped_early_at": stopped_early["at"],
        "stopped_early_by": stopped_early["why"],
        "config": cfg.to_dict(), "sft_eval": sft["eval"],
        "before": {k: v for k, v in before.items() if k.startswith(("em_", "n/", "tool_calls"))},
        "after": {k: v for k, v in after.items() if k.startswith(("em_", "n/", "tool_calls"))},
        "paired": _paired(recs_before, recs_after),
        "train_reward_first": _mean([r["reward_mean"] for r in train_rows_m[:5]]),
        "train_reward_last": _mean([r["reward_mean"] for r in train_rows_m[-5:]]),
        "paths": {"world": str(world_dir), "sft_model": str(sft_dir), "adapters": str(adapters_dir),
                  "metrics": str(out / "metrics.jsonl"), "plot": str(png), "checkpoint": str(grpo_dir / "checkpoint.pt"),
                  "per_question": str(out / "per_question.jsonl")},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"[4/4] adapters (PEFT format, one folder per adapter): {adapters_dir}")
    print(f"      metrics: {out / 'metrics.jsonl'}   plot: {png}   summary: {out / 'summary.json'}")
    print()
    print(_report(summary, before, after, format_eval))
    return summary


def _mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def _write_jsonl(path: Path, rows) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


def _paired(before: list, after: list) -> dict:
    """Exact McNemar p-value of greedy EM before vs after, per hop count and overall (same questions, paired)."""
    from routed_lora.study.stats import mcnemar_exact

    out = {}
    for h in ("1hop", "2hop", "all"):
        sel = [i for i, r in enumerate(before) if h == "all" or f"{r.get('hops')}hop" == h]
        if sel:
            out[h] = mcnemar_exact([before[i]["greedy"] for i in sel], [after[i]["greedy"] for i in sel])
    return out


def _report(summary, before, after, format_eval) -> str:
    lines = ["Summary (held-out questions, exact match):",
             f"  before GRPO: {format_eval(before)}",
             f"  after GRPO:  {format_eval(after)}"]
    from routed_lora.study.stats import format_p

    paired = summary.get("paired", {})
    for kind in ("greedy", "sampled"):
        for h in ("1hop", "2hop", "all"):
            k = f"em_{kind}/{h}"
            if k in before and k in after:
                d = after[k] - before[k]
                n = before.get(f"n/{h}", 0)
                if kind == "greedy" and h in paired:  # paired exact test on the same questions
                    t = paired[h]
                    extra = (f"exact McNemar p = {format_p(t['p'])}: {t['n01']} questions gained, {t['n10']} lost; "
                             f"n={n}")
                else:
                    extra = f"mean over {summary['config']['group_size']} samples a question; n={n}"
                lines.append(f"  {kind:7s} {h}: {before[k]:.3f} -> {after[k]:.3f} ({d:+.3f}; {extra})")
    lines.append(f"  training reward (sampled, first 5 -> last 5 steps): {summary['train_reward_first']:.3f} -> "
                 f"{summary['train_reward_last']:.3f}")
    lines.append(f"  wall time: {summary['timings']['total_s']:.0f} s (world {summary['timings']['world_s']:.0f}, "
                 f"SFT {summary['timings']['sft_s']:.0f}, GRPO + evals {summary['timings']['grpo_s']:.0f})")
    return "\n".join(lines)


def _run(args) -> int:
    from .errors import UsageError

    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out: {args.out} exists and is not a folder")
    common = dict(sft_steps=args.sft_steps, two_hop_frac=args.two_hop_frac, grpo_steps=args.grpo_steps,
                  grpo_budget=args.grpo_budget, lr=args.lr, time_limit=args.time_limit, eval_n=args.eval_n,
                  G=args.group_size, prompts=args.prompts_per_step)
    if args.model is None:  # the tiny built-in model (`make demo`)
        only = [f for f, v in (("--sft-batch", args.sft_batch), ("--sft-lr", args.sft_lr)) if v is not None]
        if only:
            raise UsageError(f"{', '.join(only)}: only with --model (the pretrained path's LoRA warm start); the "
                             "tiny model's warm start is `routed-lora sft`'s full fine-tune")
        run_demo(Path(args.out), quick=args.quick, threads=args.threads or 2, progress=not args.no_progress,
                 seed=args.seed, **common)
        return 0
    # main() has resolved a registered name (smollm2-135m) to its cached folder already
    from .env.lora_sft import check_pretrained
    from .demo_pretrained import run_demo_pretrained

    check_pretrained(args.model)

    run_demo_pretrained(Path(args.out), args.model, quick=args.quick, threads=args.threads or 1,
                        progress=not args.no_progress, seed=args.seed, sft_batch=args.sft_batch, sft_lr=args.sft_lr,
                        **common)
    return 0


def register(sub) -> None:
    from .argtypes import finite_float, int_at_least

    pos, pos_f = int_at_least(1), finite_float(0, low_open=True)
    p = sub.add_parser("demo", help="GRPO with routed LoRA (DART) on the built-in search world, on a CPU")
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--model", default=None,
                   help="a pretrained model: smollm2-135m or a folder with a chat template (default: the tiny "
                        "built-in model). Pretrained: chat:tiny prompt, LoRA warm start of both routed adapters, "
                        "GRPO at lr 2e-5, G=8, about 20 minutes on 2 cores (docs/pretrained.md)")
    p.add_argument("--quick", action="store_true", help="a ~1 minute smoke version (pretrained: a few minutes)")
    p.add_argument("--threads", type=pos, default=None,
                   help="torch threads (default 2; pretrained 1: on 2 shared cores under load 3.5-5, one thread "
                        "decoded SmolLM2 9x faster than two)")
    p.add_argument("--seed", type=int_at_least(0), default=0)
    p.add_argument("--sft-steps", type=pos, default=None, help="warm start steps (default 250; pretrained 10)")
    p.add_argument("--sft-batch", type=pos, default=None, help="with --model: warm start batch (default 8)")
    p.add_argument("--sft-lr", type=pos_f, default=None, help="with --model: warm start learning rate (default 1e-3)")
    p.add_argument("--two-hop-frac", type=finite_float(0, 1), default=None,
                   help="fraction of the 2-hop training questions in the warm start (default 0.03; pretrained 0.1)")
    p.add_argument("--grpo-steps", type=pos, default=None)
    p.add_argument("--grpo-budget", type=pos_f, default=None,
                   help="seconds of GRPO training before stopping early (default 330; pretrained 600)")
    p.add_argument("--time-limit", type=pos_f, default=None,
                   help="seconds for the whole demo; GRPO stops early to finish within it (default 560, quick 110; "
                        "pretrained 1320)")
    p.add_argument("--lr", type=pos_f, default=None, help="GRPO learning rate of both adapters (default 5e-4; "
                                                          "pretrained 2e-5)")
    p.add_argument("--group-size", "-G", type=int_at_least(2), default=None,
                   help="GRPO rollouts per question (default 8)")
    p.add_argument("--prompts-per-step", type=pos, default=None,
                   help="GRPO questions per step (default 32; pretrained 2)")
    p.add_argument("--eval-n", type=int_at_least(2), default=None,
                   help="held-out questions, half 1-hop, half 2-hop (default 200; pretrained 32)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run)
