"""``routed-lora demo --model smollm2-135m``: the demo on a pretrained model (any folder with a chat template).

The tiny demo (:mod:`routed_lora.demo`) fully fine-tunes a 0.55M-parameter model, then trains fresh adapters with
GRPO. A pretrained model differs in three ways, each measured on SmolLM2-135M (docs/pretrained.md):

1. the prompt goes through its chat template (``chat:tiny``: the world's short prompt as the user message);
   zero-shot it writes no ``<answer>`` tag at all (EM 0);
2. the warm start is LoRA SFT of **both routed adapters** (``reasoning`` and ``tool``, rank r, the backbone
   frozen; :func:`routed_lora.env.lora_sft.lora_sft`), not a full fine-tune of 135M weights; GRPO then continues
   on the same adapters, and its reference policy (beta > 0) is the pretrained model with the adapters off;
3. GRPO settings from the measurements: a soft warm start (few steps, mostly 1-hop questions) so sampling still
   varies inside a group (after 30 SFT steps 75-100% of the groups had equal rewards and no signal), the field's
   learning rate (2e-5 instead of the tiny demo's 5e-4; 1e-4 lost the 2-hop questions in 3 steps), G = 8.

On 2 CPU cores a GRPO step costs 1.5-5 minutes, so the default run (about 20 minutes) holds only a few steps:
it shows the warm start's change with a paired test and reports honestly whatever GRPO did in its budget. Held-out
greedy EM is measured three times on the same questions (zero-shot, after the warm start, after GRPO), with exact
McNemar p-values for each pair (:func:`routed_lora.demo._paired`).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

# Sized for about 20 minutes on two idle cores (SFT 15-18 s a step at batch 8, an evaluation of 16 questions about
# 2 minutes, a GRPO step of 2 questions x G = 8 about 1.5-3 minutes); under load GRPO stops early by its budget.
PRETRAINED = dict(sft_steps=10, sft_batch=8, sft_lr=1e-3, two_hop_frac=0.1, grpo_steps=30, prompts=2, G=8,
                  lr=2e-5, eval_n=32, grpo_budget=600.0, time_limit=1320.0, max_turns=2, max_new_tokens=48)
PRETRAINED_QUICK = dict(sft_steps=2, sft_batch=2, sft_lr=1e-3, two_hop_frac=0.1, grpo_steps=1, prompts=1, G=2,
                        lr=2e-5, eval_n=2, grpo_budget=60.0, time_limit=400.0, max_turns=1, max_new_tokens=24)


def _load():
    return [round(x, 2) for x in os.getloadavg()]


def run_demo_pretrained(out: Path, model: str, *, quick: bool = False, threads: int = 1, progress: bool = True,
                        seed: int = 0, log=print, **overrides) -> dict:
    """The demo on a pretrained ``model`` (a folder, or a registered name already resolved or not). Writes under
    ``out``: ``world/``, ``warm_start/`` (the SFT adapters in PEFT format and their metrics), ``grpo/``
    (metrics, checkpoint), ``adapters/``, ``per_question.jsonl``, ``summary.json``. Returns the summary."""
    import routed_lora as rl
    from routed_lora.env.cli import build_default_world
    from routed_lora.env.data import load_qa
    from routed_lora.env.lora_sft import lora_sft, pretrained_template, sft_rows, write_prompt_template
    from routed_lora.env.retriever import BM25Retriever
    from routed_lora.env.trajectories import build_trajectories
    from routed_lora.grpo.evaluate import evaluate_em, format_eval
    from routed_lora.grpo.trainer import GRPOConfig, MetricsWriter, Trainer, build_policy, load_model_and_tokenizer
    from routed_lora.pretrained import resolve_model

    from .demo import _paired, _write_jsonl, balanced_rows, train_within

    p = dict(PRETRAINED_QUICK if quick else PRETRAINED)
    p.update({k: v for k, v in overrides.items() if v is not None})
    torch.set_num_threads(threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    timings: dict = {}
    loads: dict = {"start": _load()}
    limit = float(p["time_limit"])

    # 1. the world (its tiny model is not used) and the pretrained model through its chat template
    t = time.perf_counter()
    world_dir = out / "world"
    if not (world_dir / "train.jsonl").exists():
        build_default_world(world_dir, seed=seed)
    timings["world_s"] = time.perf_counter() - t
    t = time.perf_counter()
    folder = resolve_model(model)
    src = Path(folder) / "routed_lora_source.json"  # a registered model's cache: show its name, not the folder
    if src.is_file():
        model = json.loads(src.read_text()).get("name", model)
    net, tok = load_model_and_tokenizer(folder)
    timings["load_s"] = time.perf_counter() - t
    template = pretrained_template(tok)
    cfg = GRPOConfig(mode="dart", steps=p["grpo_steps"], prompts_per_step=p["prompts"], group_size=p["G"],
                     lr=p["lr"], max_turns=p["max_turns"], topk=3, max_new_tokens=p["max_new_tokens"],
                     max_total_tokens=400, temperature=1.0, beta=0.001, mini_batches=1, save_every=0, seed=seed,
                     # 4 rollouts a forward: with a 49152-token head, 16 held the process at 8.5 GB resident
                     micro_batch_size=4)
    torch.manual_seed(seed)
    net, router = build_policy(net, tok, cfg)
    retriever = BM25Retriever(world_dir / "corpus.jsonl")
    train_rows = load_qa(world_dir / "train.jsonl")
    eval_rows = balanced_rows(load_qa(world_dir / "test.jsonl"), p["eval_n"], seed=seed)
    n_train = sum(q.numel() for q in net.parameters() if q.requires_grad)
    log(f"[1/5] {model}: {sum(q.numel() for q in net.parameters()) / 1e6:.1f}M parameters loaded in "
        f"{timings['load_s']:.1f} s; prompt chat:tiny ({len(tok(template.format(question='x'))['input_ids'])} "
        f"tokens); DART adapters reasoning + tool, rank {cfg.r}, {n_train / 1e6:.2f}M trainable; "
        f"{len(eval_rows)} held-out questions; load average {loads['start']}", flush=True)

    evals: dict = {}
    records: dict = {}

    def evaluate(label: str) -> dict:
        recs: list = []
        t0 = time.perf_counter()
        ev = evaluate_em(net, tok, eval_rows, retriever, samples=0, greedy=True, max_turns=cfg.max_turns,
                         max_new_tokens=cfg.max_new_tokens, topk=cfg.topk, prompt_template=template,
                         seed=seed + 7919, records=recs)
        evals[label], records[label] = ev, recs
        loads[f"eval {label}"] = _load()
        log(f"      held-out {label}: {format_eval(ev)}, answered {ev['answered_greedy']:.2f}, "
            f"{ev['tool_calls_greedy']:.2f} searches ({time.perf_counter() - t0:.0f} s, load {_load()})", flush=True)
        return ev

    # 2. zero-shot, 3. the LoRA warm start of both routed adapters
    evaluate("zero-shot")
    t = time.perf_counter()
    warm_dir = out / "warm_start"
    warm_dir.mkdir(exist_ok=True)
    # a warm start of the same settings in this folder is reused (it is most of the demo's time on 2 cores)
    key = {k: p[k] for k in ("sft_steps", "sft_batch", "sft_lr", "two_hop_frac")} | {"seed": seed, "r": cfg.r,
                                                                                     "model": str(folder)}
    prev = warm_dir / "sft_summary.json"
    old = json.loads(prev.read_text()) if prev.is_file() else {}
    if old.get("key") == key and (warm_dir / "adapters" / "routed_lora.json").is_file():
        rl.load_adapters(net, warm_dir / "adapters")
        sft = old["sft"]
        timings["sft_reused"] = True
        how = f"reused from {warm_dir} (trained in {sft['train_seconds']:.0f} s; delete it to redo)"
    else:
        rows = sft_rows(train_rows, p["sft_steps"] * p["sft_batch"], two_hop_frac=p["two_hop_frac"], seed=seed)
        trajs = build_trajectories(tok, rows, retriever, prompt_template=template)
        sft = lora_sft(net, tok, trajs, steps=p["sft_steps"], batch_size=p["sft_batch"], lr=p["sft_lr"], seed=seed,
                       progress=progress, desc="warm start (LoRA, reasoning + tool)",
                       metrics_path=warm_dir / "sft_metrics.jsonl")
        sft["tokens_mean"] = sum(len(x["input_ids"]) for x in trajs) / len(trajs)
        rl.save_adapters(net, warm_dir / "adapters")
        write_prompt_template(warm_dir, template, model=str(model))
        prev.write_text(json.dumps({"key": key, "sft": sft}, indent=1))
        how = f"in {time.perf_counter() - t:.0f} s"
    timings["sft_s"] = time.perf_counter() - t
    loads["sft"] = _load()
    log(f"[2/5] warm start: {p['sft_steps']} LoRA SFT steps x {p['sft_batch']} trajectories "
        f"({sft['tokens_mean']:.0f} tokens on average) at lr {p['sft_lr']:g} {how} "
        f"({sft['step_seconds_median']:.1f} s a step); loss {sft['loss_first']:.3f} -> {sft['loss_last']:.3f}",
        flush=True)
    evaluate("after warm start")

    # 4. GRPO on the same adapters, stopped by its budget or the demo's time limit
    t = time.perf_counter()
    grpo_dir = out / "grpo"
    trainer = Trainer(cfg, net, tok, router, retriever, train_rows, out=grpo_dir, prompt_template=template,
                      progress=progress)
    budget = float(p["grpo_budget"])
    trainer.progress_desc = f"grpo dart (up to {cfg.steps} steps or {budget:.0f} s)"
    reserve = 1.3 * evals["after warm start"]["eval_seconds"] + 30.0
    step_rows: list = []
    # a step never starts when even one would overrun the time limit (the time is then left to the evaluation)
    if (time.perf_counter() - t_all) + reserve > limit:
        stopped = {"at": 0, "why": f"the {limit:.0f} s time limit of the demo (no time left for a step)"}
        steps_done = 0
    else:
        result, stopped = train_within(trainer, cfg, net, grpo_dir, budget=budget, limit=limit, t_all=t_all,
                                       reserve=reserve, on_step=lambda row: step_rows.append(dict(row)),
                                       evaluate_before=False, evaluate_after=False)
        steps_done = result["steps"]
    timings["grpo_train_s"] = time.perf_counter() - t
    loads["grpo"] = _load()
    how = f" (stopped early by {stopped['why']})" if stopped["at"] is not None else ""
    log(f"[3/5] GRPO (dart): {steps_done} steps x {cfg.prompts_per_step} questions x G={cfg.group_size} at lr "
        f"{cfg.lr:g} in {timings['grpo_train_s']:.0f} s{how}", flush=True)
    ev_after = evaluate("after GRPO")
    MetricsWriter(grpo_dir / "metrics.jsonl", resume_step=10**9).write({"eval": "after", "step": steps_done,
                                                                        **ev_after})

    # 5. save and summarise: three evaluations of the same questions, paired tests between each pair
    adapters_dir = rl.save_adapters(net, out / "adapters")
    _write_jsonl(out / "per_question.jsonl", [{"when": w, **r} for w, rs in records.items() for r in rs])
    timings["total_s"] = time.perf_counter() - t_all
    labels = list(evals)
    paired = {f"{a} -> {b}": _paired(records[a], records[b])
              for a, b in ((labels[0], labels[1]), (labels[1], labels[2]), (labels[0], labels[2]))}
    summary = {
        "model": str(model), "model_folder": str(folder), "quick": quick, "params": p, "timings": timings,
        "loadavg": loads, "threads": threads, "prompt": "chat:tiny", "sft": {k: v for k, v in sft.items()},
        "steps": steps_done, "stopped_early_at": stopped["at"], "stopped_early_by": stopped["why"],
        "config": cfg.to_dict(),
        "evals": {k: {m: v for m, v in e.items() if m.startswith(("em_", "n/", "tool_calls", "answered"))}
                  | {"eval_seconds": e["eval_seconds"]} for k, e in evals.items()},
        "paired": paired,
        "grpo_steps": [{k: r.get(k) for k in ("step", "reward_mean", "zero_std_frac", "rollout_s", "update_s",
                                             "kl", "clip_frac", "response_len_mean")} for r in step_rows],
        "paths": {"world": str(world_dir), "warm_start": str(warm_dir), "adapters": str(adapters_dir),
                  "grpo": str(grpo_dir), "per_question": str(out / "per_question.jsonl")},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    log(f"[4/5] adapters (PEFT format, one folder per adapter): {adapters_dir}; summary: {out / 'summary.json'}")
    log("")
    log(report(summary))
    return summary


def report(summary: dict) -> str:
    """The summary as text: EM at the three points, the paired tests, GRPO's steps, the time and the load."""
    from routed_lora.study.stats import format_p

    ev = summary["evals"]
    lines = [f"[5/5] Summary ({summary['model']}, held-out questions, greedy exact match, same questions each time):"]
    for label, e in ev.items():
        hops = ", ".join(f"{k.split('/')[1]} {v:.3f}" for k, v in sorted(e.items())
                         if k.startswith("em_greedy/") and not k.endswith("/all"))
        lines.append(f"  {label:17s} EM {e['em_greedy/all']:.3f} ({hops}; n={e['n/all']}; answered "
                     f"{e['answered_greedy']:.2f})")
    for pair, by_hop in summary["paired"].items():
        t = by_hop.get("all")
        if t:
            lines.append(f"  {pair}: exact McNemar p = {format_p(t['p'])} ({t['n01']} questions gained, "
                         f"{t['n10']} lost)")
    g = summary["grpo_steps"]
    if g:
        lines.append("  GRPO steps: reward (sampled) " + ", ".join(f"{r['reward_mean']:.2f}" for r in g)
                     + "; groups with equal rewards " + ", ".join(f"{r['zero_std_frac']:.2f}" for r in g
                                                                  if r.get("zero_std_frac") is not None))
    if summary["stopped_early_by"]:
        lines.append(f"  GRPO stopped after {summary['steps']} steps: {summary['stopped_early_by']}")
    tm = summary["timings"]
    lines.append(f"  wall time {tm['total_s']:.0f} s (load {tm['load_s']:.0f}, warm start {tm['sft_s']:.0f}, GRPO "
                 f"{tm['grpo_train_s']:.0f}, the rest evaluations); load average at the end "
                 f"{list(summary['loadavg'].values())[-1]} on {os.cpu_count()} CPUs")
    lines.append("  (a few GRPO steps on a handful of questions: read a change as noise unless its p-value is small)")
    return "\n".join(lines)
