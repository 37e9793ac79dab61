"""Sub-commands ``routed-lora diagnose grad-angle``, ``routed-lora diagnose leas`` and ``routed-lora eval``.

Registered by :mod:`routed_lora.cli` through :func:`register`. See docs/diagnostics.md for worked commands.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from routed_lora.argtypes import finite_float, int_at_least
from routed_lora.errors import UsageError, for_flag

__all__ = ["register", "build_batch", "run_grad_angle", "run_eval", "run_leas"]


# ----------------------------------------------------------------------------------------------- shared


def _resolve_env(args):
    """(model_dir, datasets specs, corpus) from --world-dir / --model / --data / --corpus, each checked to exist."""
    w = Path(args.world_dir) if getattr(args, "world_dir", None) else None
    if w is not None and not w.is_dir():
        raise UsageError(f"--world-dir: {w}: no such folder (build one with `routed-lora world build --out {w}`)")
    model = args.model or (str(w / "model") if w else None)
    if model is None:
        raise UsageError("give --model DIR (an HF model folder) or --world-dir DIR (from `routed-lora world build`)")
    if not (Path(model) / "config.json").is_file():
        flag = "--model" if args.model else "--world-dir"
        raise UsageError(f"{flag}: {model} is not a model folder (no config.json)")
    data = list(args.data or [])
    if not data:
        if w is None:
            raise UsageError("give --data [NAME=]FILE (JSONL/parquet with question, golden_answers) or --world-dir")
        data = [f"{getattr(args, 'split', 'test')}={w / (getattr(args, 'split', 'test') + '.jsonl')}"]
    corpus = args.corpus or (str(w / "corpus.jsonl") if w else None)
    if getattr(args, "adapters", None) and not Path(args.adapters).exists():
        raise UsageError(f"--adapters: {args.adapters}: no such file or folder")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out: {out} exists and is not a folder")
    return model, data, corpus


def _retriever(args, corpus):
    from routed_lora.env.retriever import BM25Retriever, HTTPRetriever

    if getattr(args, "retriever_url", None):
        with for_flag("--retriever-url"):
            r = HTTPRetriever(args.retriever_url)
            r.search(["probe"], topk=1)  # reachable, and speaks the protocol
        return r
    if corpus is None:
        raise UsageError("give --corpus FILE (JSONL corpus), --retriever-url URL or --world-dir")
    with for_flag("--corpus"):
        return BM25Retriever(corpus)


def _threads(n):
    import torch

    if n:
        torch.set_num_threads(int(n))


def _add_env_args(p, *, split_default="test"):
    pos, nonneg = int_at_least(1), int_at_least(0)
    p.add_argument("--world-dir", default=None, help="built-in world folder (model/, corpus.jsonl, test.jsonl)")
    p.add_argument("--model", default=None,
                   help="HF model folder with its tokenizer, or smollm2-135m (default WORLD_DIR/model)")
    p.add_argument("--adapters", default=None,
                   help="trained adapters: a `routed-lora train` checkpoint (checkpoint.pt or its folder) or a "
                        "PEFT-style adapter folder; default: fresh adapters")
    p.add_argument("--data", action="append", default=None, metavar="[NAME=]FILE",
                   help="QA data set (JSONL/parquet, question + golden_answers); repeat for several")
    p.add_argument("--split", default=split_default, help="world split used when --data is not given")
    p.add_argument("--corpus", default=None, help="JSONL corpus for the in-process BM25 retriever")
    p.add_argument("--retriever-url", default=None, help="Search-R1 retrieval server (POST /retrieve)")
    p.add_argument("--limit", type=pos, default=None, help="first N questions of each data set")
    p.add_argument("--max-turns", type=nonneg, default=4)
    p.add_argument("--max-new-tokens", type=pos, default=64)
    p.add_argument("--max-length", type=pos, default=1024)
    p.add_argument("--topk", type=pos, default=3)
    p.add_argument("--temperature", type=finite_float(0, low_open=True), default=1.0)
    p.add_argument("--seed", type=nonneg, default=0)
    p.add_argument("--threads", type=nonneg, default=2)


# ----------------------------------------------------------------------------------------------- grad-angle


def _pad(seqs, pad_id):
    import torch

    T = max(len(s) for s in seqs)
    out = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    for b, s in enumerate(seqs):
        out[b, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def dart_router(tokenizer):
    """The DART tag router bound to (reasoning, tool): tool inside <search> ... </search>, reasoning elsewhere."""
    from routed_lora.router import TagRouter

    return TagRouter(tokenizer, spans={"tool": ("<search>", "</search>")}, default="reasoning",
                     adapters=("reasoning", "tool"))


def build_batch(model, tokenizer, rows, retriever, *, source="rollouts", group_size=4, temperature=1.0,
                max_turns=4, max_new_tokens=64, max_length=1024, topk=3, seed=0) -> tuple[dict, dict]:
    """A collated batch with ``advantages`` and DART ``routes`` (the role routes) from ``rows``.

    ``source="rollouts"``: ``group_size`` sampled rollouts per question with the agent loop, EM rewards and
    group-normalised advantages. ``source="expert"``: the scripted expert trajectory of each world question
    (rows need a ``plan``), advantages 1 (use with the ``logp`` objective). Returns (batch, info)."""
    import torch

    from routed_lora.grpo.loss import group_advantages, zero_std_fraction

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    info: dict = {"source": source, "questions": len(rows)}
    if source == "expert":
        from routed_lora.env.trajectories import build_trajectories

        trajs = build_trajectories(tokenizer, rows, retriever, topk=topk)
        ids = _pad([t["input_ids"] for t in trajs], pad)
        attn = _pad([[1] * len(t["input_ids"]) for t in trajs], 0)
        loss = _pad([t["loss_mask"] for t in trajs], 0).float()
        batch = {"input_ids": ids, "attention_mask": attn, "loss_mask": loss,
                 "advantages": torch.ones(len(trajs)), "group_ids": torch.arange(len(trajs))}
    elif source == "rollouts":
        from routed_lora.env.data import make_prompt
        from routed_lora.env.reward import compute_score
        from routed_lora.env.rollout import collate, generate_rollouts

        prompts = [make_prompt(r["question"]) for r in rows for _ in range(group_size)]
        gids = torch.tensor([i for i in range(len(rows)) for _ in range(group_size)])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            rolls = generate_rollouts(model, tokenizer, prompts, retriever, max_turns=max_turns,
                                      max_new_tokens=max_new_tokens, max_length=max_length, topk=topk,
                                      do_sample=True, temperature=temperature)
        rewards = torch.tensor([compute_score(ro.text, rows[i // group_size]["golden_answers"])
                                for i, ro in enumerate(rolls)], dtype=torch.float32)
        batch = collate(rolls, pad)
        batch["advantages"] = group_advantages(rewards, gids)
        batch["group_ids"] = gids
        info.update(group_size=group_size, reward_mean=float(rewards.mean()),
                    zero_std_group_fraction=zero_std_fraction(rewards, gids),
                    tool_calls_per_rollout=sum(r.num_tool_calls for r in rolls) / len(rolls))
    else:
        raise ValueError(f"source: expected 'rollouts' or 'expert', got {source!r}")
    batch["routes"] = dart_router(tokenizer)(batch["input_ids"], batch["attention_mask"])
    return batch, info


def run_grad_angle(args) -> dict:
    import torch

    from routed_lora.env.data import load_qa

    from .evaluate import load_policy
    from .grad_angle import grad_angle_from_batch, write_report

    _threads(args.threads)
    model_dir, data, corpus = _resolve_env(args)
    rows = []
    with for_flag("--data"):
        for spec in data:
            rows += load_qa(spec.split("=", 1)[-1])
    if args.hops:
        rows = [r for r in rows if r.get("hops") in args.hops]
    rows = rows[: args.questions]
    if not rows:
        raise UsageError(f"--hops: no question has {args.hops} hops")
    retriever = _retriever(args, corpus)
    if args.mode == "full":
        from routed_lora.grpo.logprobs import disable_dropout
        from routed_lora.grpo.trainer import load_model_and_tokenizer

        model, tok = load_model_and_tokenizer(model_dir)
        model.eval()
        disable_dropout(model)
        for p in model.parameters():
            p.requires_grad_(False)
    else:
        model, tok, _ = load_policy(model_dir, args.adapters, mode=args.mode, r=args.r, random_b=args.random_b,
                                    seed=args.seed)
    objective = args.objective or ("logp" if args.source == "expert" else "grpo")
    batch, info = build_batch(model, tok, rows, retriever, source=args.source, group_size=args.group_size,
                              temperature=args.temperature, max_turns=args.max_turns,
                              max_new_tokens=args.max_new_tokens, max_length=args.max_length, topk=args.topk,
                              seed=args.seed)
    routes = None
    if args.mode == "joint":
        routes = torch.where(batch["attention_mask"].bool(), 0, -1)
    report = grad_angle_from_batch(model, batch, which="full" if args.mode == "full" else "lora", routes=routes,
                                   objective=objective, temperature=args.temperature,
                                   max_rollouts=args.max_rollouts, max_pairs=args.max_pairs,
                                   paper=getattr(args, "paper", False), splits=getattr(args, "splits", 8),
                                   seed=args.seed)
    report["mode"] = args.mode
    report["batch_info"] = info
    report["config"] = {k: v for k, v in vars(args).items() if k != "func"}
    paths = write_report(report, args.out)
    b = report["batch"]
    w = report.get("within_rollout", {}).get("angle_deg", {})
    line = (f"grad-angle ({args.mode}, {objective}, {info['source']}): batch reasoning vs tool "
            f"{_fmt(b['angle_deg'])} deg; within rollouts median {_fmt(w.get('median'))} deg (n={w.get('n', 0)})")
    for role, blk in report.get("across_rollouts", {}).items():
        line += f"; across {role} median {_fmt(blk['angle_deg']['median'])} deg (n={blk['angle_deg']['n']})"
    print(line)
    pp = report.get("paper")
    if pp is not None:
        print(f"  the paper's way: {pp['rollouts_kept']} distinct rollouts ({pp['duplicates_removed']} duplicates "
              f"removed), {pp['groups_with_signal']} of {pp['groups']} groups with signal, {pp['splits']} splits "
              "into disjoint halves")
        for k in ("same_reasoning", "same_tool", "cross"):
            if k in pp:
                f, t = pp[k]["flat"]["angle_deg"], pp[k]["per_tensor"]["angle_deg"]
                print(f"    {k:15s} flattened median {_fmt(f['median'])} deg (IQR {_fmt(f['q3'])}-{_fmt(f['q1'])}); "
                      f"per tensor median {_fmt(t['median'])} deg (IQR {_fmt(t['q3'])}-{_fmt(t['q1'])})")
        if pp.get("note"):
            print(f"    {pp['note']}", file=sys.stderr)
    for a, ct in report.get("cross_talk", {}).items():
        print(f"  cross-talk {a}: {_fmt(ct['cross_talk'], 3)} (share {_fmt(ct['cross_talk_share'], 3)})")
    if objective == "grpo" and info.get("zero_std_group_fraction") == 1.0:
        print(f"  warning: every group got the same reward (mean {_fmt(info.get('reward_mean'), 3)}), so every "
              "advantage and every GRPO gradient is zero and no angle exists; use a warmer-started model, a "
              "larger --group-size, or --objective logp / --source expert", file=sys.stderr)
    if not report["roles"].get("tool"):
        print("  warning: the batch has no tool tokens (the model never searched); no reasoning-vs-tool angle",
              file=sys.stderr)
    print(f"wrote {paths['json']} and {paths['png']}")
    return report


def _fmt(x, nd=1):
    return "n/a" if x is None else f"{x:.{nd}f}"


# ----------------------------------------------------------------------------------------------- leas


def run_leas(args) -> dict:
    from .leas import leas, read_rates, write_leas

    for f in args.rates:
        if not Path(f).is_file():
            raise UsageError(f"--rates: {f}: no such file")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out: {args.out} exists and is not a folder")
    with for_flag("--rates"):
        rates, ids, n = read_rates(args.rates)
    n_samples = args.n_samples or n
    res = leas(rates, eps=args.eps, n_samples=n_samples, question_ids=ids)
    paths = write_leas(res, args.out)
    s = res.summary()
    print(f"LEAS: {s['kept']} questions kept, {s['dropped_never_solved']} dropped (no variant solved them), "
          f"eps {res.eps:g} ({res.method})")
    for name, c in s["columns"].items():
        print(f"  {name:15s} mean {_fmt(c['mean'], 3):>7s}  median {_fmt(c['median'], 3):>7s}  "
              f"positive {_fmt(c['share_positive'], 2)}")
    print(f"  negative tool*reasoning interaction on {_fmt(s['negative_interaction_share'], 3)} of kept questions")
    print(f"wrote {paths['csv']} and {paths['summary']}")
    return s


# ----------------------------------------------------------------------------------------------- eval


def run_paper_leas(args) -> dict:
    """``routed-lora eval leas --paper``: the six variants as separately trained models (leas_paper)."""
    from .evaluate import load_datasets
    from .leas import write_leas
    from .leas_paper import check_runs, paper_leas

    if not args.paper:
        raise SystemExit("eval leas: give --paper (separately trained M_Reas / M_Tool / M_Unified, the paper's "
                         "LEAS). The route-choice analysis on one DART model is `eval --variant all` followed by "
                         "`diagnose leas`.")
    runs = {"reasoning": args.reasoning_run, "tool": args.tool_run, "unified": args.unified_run}
    check_runs(runs)  # wrong rank / mode: an error before any model is loaded
    _threads(args.threads)
    model_dir, data, corpus = _resolve_env(args)
    datasets = load_datasets(data, limit=args.limit)
    rows = [dict(r, id=f"{name}/{r.get('id', i)}") for name, rs in datasets.items() for i, r in enumerate(rs)]
    retriever = _retriever(args, corpus)
    samples = 50 if args.samples is None else args.samples
    print(f"LEAS (paper): {len(rows)} questions x {samples} sampled decodes x 6 variants")
    out = paper_leas(model_dir, runs, rows, retriever, samples=samples, temperature=args.temperature,
                     batch_size=args.batch_size, max_turns=args.max_turns, max_new_tokens=args.max_new_tokens,
                     max_length=args.max_length, topk=args.topk, seed=args.seed, n_boot=args.bootstrap,
                     progress=print)
    res = out.pop("_result")
    d = Path(args.out)
    paths = write_leas(res, d)
    (d / "leas_paper.json").write_text(json.dumps(out, indent=1) + "\n")
    ci = out["negative_interaction_share_ci95"]
    share = out["negative_interaction_share"]
    print(f"  kept {out['leas']['kept']} of {len(rows)} questions ({out['leas']['dropped_never_solved']} never "
          f"solved); negative tool*reasoning interaction on {_fmt(share, 3)} of them"
          + (f" (95% bootstrap interval {ci[0]:.3f}-{ci[1]:.3f})" if ci else ""))
    for h, b in out["by_hops"].items():
        print(f"    {h}: {_fmt(b['negative_interaction_share'], 3)} of {b['kept']}")
    print(f"wrote {d / 'leas_paper.json'}, {paths['csv']} and {paths['summary']}")
    return out


def run_eval(args) -> dict:
    if getattr(args, "what", None) == "leas":
        return run_paper_leas(args)
    if args.samples is None:
        args.samples = 4
    from .evaluate import (VARIANTS, compare_two_agent, evaluate_variant, load_datasets, load_policy, summarize,
                           write_records)

    if args.samples == 0 and args.no_greedy:
        raise UsageError("--samples: 0 with --no-greedy leaves nothing to evaluate")
    _threads(args.threads)
    model_dir, data, corpus = _resolve_env(args)
    with for_flag("--data"):
        datasets = load_datasets(data, limit=args.limit)
    retriever = _retriever(args, corpus)
    variants = []
    for v in args.variant:
        variants += list(VARIANTS) if v == "all" else [v]
    dart = load_policy(model_dir, args.adapters, random_b=args.random_b, seed=args.seed)
    model, tok, router = dart
    kw = dict(samples=args.samples, greedy=not args.no_greedy, temperature=args.temperature,
              batch_size=args.batch_size, max_turns=args.max_turns, max_new_tokens=args.max_new_tokens,
              max_length=args.max_length, topk=args.topk, seed=args.seed)
    records, costs = [], {}
    for v in dict.fromkeys(variants):
        if v == "two-agent":
            recs, c = compare_two_agent(model_dir, args.adapters, datasets, retriever, dart=dart, **kw)
            costs.update({"two-agent": c["two-agent"], "unified (vs two-agent)": c["unified"]})
            recs = [r for r in recs if r["variant"] == "two-agent" or "unified" not in variants]
        else:
            recs, c = evaluate_variant(model, tok, router, datasets, retriever, v, **kw)
            costs[v] = c
        records += recs
    summary = {"em": summarize(records), "costs": costs,
               "config": {k: v for k, v in vars(args).items() if k != "func"}}
    out = Path(args.out)
    paths = write_records(records, out)
    (out / "eval_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    for v, per in summary["em"].items():
        parts = [f"{d} greedy {_fmt(m['em_greedy'], 3)} sampled {_fmt(m['em_sampled'], 3)} (n={m['n']})"
                 for d, m in per.items() if d != "all" or len(per) == 1]
        print(f"{v:16s} " + "; ".join(parts))
    if "two-agent" in costs:
        a, d = costs["two-agent"], costs["unified (vs two-agent)"]
        print("2-Agent vs DART on the same questions: "
              f"wall {a['wall_s']:.2f} s vs {d['wall_s']:.2f} s; model bytes {a['model_bytes']} vs {d['model_bytes']}; "
              f"cache rebuilds {a['cache_rebuilds']} vs {d['cache_rebuilds']}; prefill tokens {a['prefill_tokens']} "
              f"vs {d['prefill_tokens']}; hand-overs {a['handovers']}, foreign tokens {a['foreign_tokens']}")
    print(f"wrote {', '.join(str(p) for p in paths.values())} and {out / 'eval_summary.json'}")
    return summary


# ----------------------------------------------------------------------------------------------- registration


def register(subparsers) -> None:
    pos, nonneg = int_at_least(1), int_at_least(0)
    d = subparsers.add_parser("diagnose", help="DART diagnostics: gradient conflict, LEAS attribution")
    dsub = d.add_subparsers(dest="diagnose_command", metavar="ACTION", required=True)

    g = dsub.add_parser("grad-angle", help="angle between the gradients of reasoning and tool tokens",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_env_args(g, split_default="train")
    g.add_argument("--mode", choices=("dart", "joint", "full"), default="dart",
                   help="dart: the two routed adapters; joint: one shared LoRA on every token; full: every weight "
                        "of the model (no LoRA)")
    g.add_argument("--source", choices=("rollouts", "expert"), default="rollouts",
                   help="sampled rollouts with EM rewards, or the world's scripted expert trajectories")
    g.add_argument("--objective", choices=("grpo", "logp"), default=None,
                   help="GRPO policy loss at ratio 1 (default for rollouts) or per-token -log p (default for expert)")
    g.add_argument("--questions", type=pos, default=8)
    g.add_argument("--hops", type=pos, action="append", default=None, help="keep questions with these hop counts")
    g.add_argument("--group-size", type=int_at_least(2), default=4)
    g.add_argument("--max-rollouts", type=pos, default=16, help="rollouts used for the per-rollout pairs")
    g.add_argument("--max-pairs", type=pos, default=2000, help="across-rollout pairs per role")
    g.add_argument("--r", type=pos, default=8, help="rank of fresh adapters (ignored with --adapters)")
    g.add_argument("--random-b", type=finite_float(0), default=0.0,
                   help="fresh adapters: draw B ~ N(0, STD^2) so A gets gradients too (0: PEFT init, B = 0)")
    g.add_argument("--paper", action="store_true",
                   help="the paper's comparison: de-duplicated rollouts, same-role baseline from disjoint halves "
                        "of the groups, per-tensor cosines summarised (docs/diagnostics.md)")
    g.add_argument("--splits", type=int, default=8, help="random disjoint splits of the groups (--paper)")
    g.add_argument("--out", required=True, help="folder for grad_angle.json and grad_angle.png")
    g.set_defaults(func=lambda a: (run_grad_angle(a), 0)[1])

    lp = dsub.add_parser("leas", help="LEAS attribution from per-question rates of the six variants")
    lp.add_argument("--rates", nargs="+", required=True,
                    help="CSV/JSONL file(s): wide (a column per variant) or long (variant, id, rate or correct+n), "
                         "e.g. the eval_<variant>.jsonl files of `routed-lora eval`")
    lp.add_argument("--out", required=True, help="folder for leas.csv and leas_summary.json")
    lp.add_argument("--eps", type=finite_float(0, 0.5, low_open=True, high_open=True), default=None,
                    help="clip rates to [eps, 1 - eps] (default min(1/(2n), 1/4))")
    lp.add_argument("--n-samples", type=pos, default=None, help="samples per question (default: from the files)")
    lp.set_defaults(func=lambda a: (run_leas(a), 0)[1])

    e = subparsers.add_parser("eval", help="EM per data set with the tool loop: LEAS variants and the 2-Agent baseline",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("what", nargs="?", choices=("leas",), default=None,
                   help="'leas' with --paper: LEAS the paper's way (separately trained models, docs/diagnostics.md)")
    _add_env_args(e)
    e.add_argument("--paper", action="store_true", help="with 'leas': the paper's six variants")
    e.add_argument("--reasoning-run", default=None,
                   help="M_Reas: a `train --mode joint --loss-on reasoning --out` folder (or its adapters/)")
    e.add_argument("--tool-run", default=None, help="M_Tool: a `train --mode joint --loss-on tool` folder")
    e.add_argument("--unified-run", default=None, help="M_Unified: a `train --mode joint --loss-on all` folder")
    e.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples of the negative share")
    e.add_argument("--variant", nargs="+", default=["unified"],
                   choices=("base", "reasoning", "tool", "unified", "hybrid_tool", "hybrid_reasoning", "two-agent",
                            "all"),
                   help="route choices on the one routed model (see docs/diagnostics.md); 'all' = the six "
                        "route-choice LEAS variants (how two adapters combine at inference; the paper's LEAS is "
                        "`eval leas --paper`); two-agent also runs DART (unified) on the same questions")
    e.add_argument("--samples", type=nonneg, default=None,
                   help="sampled rollouts per question (correctness rate); default 4, 50 for leas --paper")
    e.add_argument("--no-greedy", action="store_true", help="skip the greedy rollout per question")
    e.add_argument("--batch-size", type=pos, default=64)
    e.add_argument("--random-b", type=finite_float(0), default=0.0,
                   help="without --adapters: fresh adapters with B ~ N(0, STD^2) (a diagnostic of the pipeline, "
                        "not a trained model)")
    e.add_argument("--out", required=True, help="folder for eval_<variant>.jsonl and eval_summary.json")
    e.set_defaults(func=lambda a: (run_eval(a), 0)[1])
