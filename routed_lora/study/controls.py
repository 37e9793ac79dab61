"""The study's controls beyond the arms (issue 21): retrieval held constant, and the 2-Agent baseline.

- **Retrieval held constant** (every arm): the arm's model is evaluated a second time, greedily on the same
  held-out questions, with every search answered by the gold documents of its hop whatever the query
  (:class:`routed_lora.env.held_constant.HeldConstantRetriever`). A difference between two arms that survives
  this is a difference in reasoning (and in deciding to search); one that vanishes came from the queries.
  Written to ``per_question_gold.jsonl``; ``result.json["eval_gold"]``.
- **2-Agent baseline** (the ``dart`` arm): the DART arm's two adapters run as two agents (the paper's
  baseline; :func:`routed_lora.diagnostics.evaluate.compare_two_agent`): one copy of the model with the reasoning
  adapter on every token writes until ``<search>``, one with the tool adapter on every token writes the query.
  Same questions, greedy. Written to ``per_question_two_agent.jsonl``; ``result.json["eval_two_agent"]``, with
  how many questions the DART run of the same comparison answered as the arm's own evaluation did
  (``dart_records_agree``: greedy decoding is deterministic, so all of them).

Both are also computed for arms that finished before the controls existed (:func:`ensure_controls`), from the
saved adapters, without training again.
"""

from __future__ import annotations

import json
from pathlib import Path

FILES = {"gold": "per_question_gold.jsonl", "two_agent": "per_question_two_agent.jsonl"}


def held_constant_eval(model, tok, rows, retriever, cfg, prompt_template: str | None = None) -> tuple[dict, list]:
    """Greedy EM of ``model`` on ``rows`` with retrieval held constant; returns (summary, per-question records).
    ``prompt_template``: the arm's prompt (a pretrained model's chat template; None: the plain one)."""
    from routed_lora.env.held_constant import HeldConstantRetriever
    from routed_lora.grpo.evaluate import evaluate_em

    records: list = []
    ev = evaluate_em(model, tok, rows, HeldConstantRetriever(retriever), samples=0, greedy=True,
                     max_turns=cfg.max_turns, max_new_tokens=cfg.max_new_tokens, topk=cfg.topk, records=records,
                     prompt_template=prompt_template)
    return ev, records


def two_agent_eval(warm_dir: Path, adapters: Path, rows, retriever, cfg, own_records: list | None = None,
                   prompt_template: str | None = None) -> tuple[dict, list]:
    """Greedy EM of the 2-Agent system built from a DART arm's saved ``adapters`` on ``rows``; returns (summary,
    per-question records in the arm's record format)."""
    from routed_lora.diagnostics.evaluate import compare_two_agent

    recs, cost = compare_two_agent(warm_dir, adapters, {"test": rows}, retriever, samples=0, greedy=True,
                                   max_turns=cfg.max_turns, max_new_tokens=cfg.max_new_tokens, topk=cfg.topk,
                                   prompt_template=prompt_template)
    by = {}
    for r in recs:
        by.setdefault(r["variant"], {})[r["id"]] = r
    out = []
    for i, row in enumerate(rows):
        r = by["two-agent"][row.get("id", i)]
        out.append({"id": row.get("id", i), "question": row["question"], "hops": row.get("hops"),
                    "greedy": int(r["greedy"]), "greedy_answer": r.get("greedy_answer")})
    summary = {"em_greedy/all": sum(r["greedy"] for r in out) / max(1, len(out))}
    for h in sorted({r["hops"] for r in out if r["hops"] is not None}):
        sel = [r["greedy"] for r in out if r["hops"] == h]
        summary[f"em_greedy/{h}hop"] = sum(sel) / len(sel)
    summary["cost"] = cost["two-agent"]
    if own_records is not None:  # DART run inside the comparison vs the arm's own greedy evaluation
        own = {r["id"]: r["greedy"] for r in own_records}
        summary["dart_records_agree"] = sum(int(by["unified"][k]["greedy"]) == v for k, v in own.items()
                                            if k in by["unified"])
        summary["dart_records"] = len(own)
    return summary, out


def write_jsonl(path: Path, rows) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


def run_controls(spec, cfg, model, tok, rows, retriever, *, warm_dir: Path, arm_dir: Path,
                 own_records: list | None = None, prompt_template: str | None = None) -> dict:
    """Both controls for one arm whose model (``model``, adapters saved under ``arm_dir/adapters``) is live.
    Writes the per-question files; returns the ``result.json`` entries."""
    out = {}
    ev, recs = held_constant_eval(model, tok, rows, retriever, cfg, prompt_template)
    write_jsonl(arm_dir / FILES["gold"], recs)
    out["eval_gold"] = ev
    if spec.arm == "dart":
        from routed_lora.diagnostics.two_agent import _single

        try:  # the 2-Agent hand-over works at single-token tags (the tiny tokenizer; not SmolLM2's text tags)
            _single(tok, "<search>"), _single(tok, "</search>"), _single(tok, "</answer>")
        except ValueError as exc:
            out["eval_two_agent"] = {"skipped": str(exc)}
            return out
        ev2, recs2 = two_agent_eval(warm_dir, arm_dir / "adapters", rows, retriever, cfg, own_records,
                                    prompt_template)
        write_jsonl(arm_dir / FILES["two_agent"], recs2)
        out["eval_two_agent"] = ev2
    return out


def missing(spec, arm_dir: Path) -> bool:
    if not (arm_dir / FILES["gold"]).exists():
        return True
    if spec.arm != "dart" or (arm_dir / FILES["two_agent"]).exists():
        return False
    res = arm_dir / "result.json"  # a 2-Agent run skipped for a reason (multi-token tags) is not redone
    return not (res.exists() and "skipped" in json.loads(res.read_text()).get("eval_two_agent", {}))


def ensure_controls(spec, cfg, *, arm_dir: Path, warm_dir: Path, world_dir: Path, rows, log=print) -> None:
    """Compute the controls of a finished arm that lacks them, from its saved adapters; updates result.json."""
    import routed_lora as rl
    from routed_lora.env.retriever import BM25Retriever
    from routed_lora.grpo.trainer import build_policy, load_model_and_tokenizer

    from .run import _grpo_config

    if not missing(spec, arm_dir):
        return
    retriever = BM25Retriever(world_dir / "corpus.jsonl")
    model, tok = load_model_and_tokenizer(warm_dir)
    if spec.mode != "none":
        model, _ = build_policy(model, tok, _grpo_config(cfg, spec))
        rl.load_adapters(model, arm_dir / "adapters")
    own = [json.loads(x) for x in (arm_dir / "per_question.jsonl").read_text().splitlines() if x.strip()]
    from routed_lora.env.lora_sft import prompt_template_of

    extra = run_controls(spec, cfg, model, tok, rows, retriever, warm_dir=warm_dir, arm_dir=arm_dir,
                         own_records=own, prompt_template=prompt_template_of(warm_dir))
    res_path = arm_dir / "result.json"
    res = json.loads(res_path.read_text())
    res.update(extra)
    tmp = res_path.with_name("result.json.tmp")
    tmp.write_text(json.dumps(res, indent=1))
    tmp.replace(res_path)
    two = extra.get("eval_two_agent", {})
    log(f"[study] {spec.key}: controls added (held constant 2-hop "
        f"{extra['eval_gold'].get('em_greedy/2hop', float('nan')):.3f}"
        + (f", 2-Agent skipped: {two['skipped']}" if "skipped" in two else
           f", 2-Agent 2-hop {two['em_greedy/2hop']:.3f}" if "em_greedy/2hop" in two else "") + ")")
