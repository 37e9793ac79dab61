"""LEAS the paper's way (DART, arXiv 2602.00994; DESIGN.md §5): ``routed-lora eval leas --paper``.

An interaction term is 1 only when two abilities were *trained jointly in the same parameters*. So the six
variants are separately trained models (and compositions of them at decoding time), not route choices on one
DART model:

    variant            x                       what it is here
    base               [1, 0, 0, 0, 0, 0]      M_Base: the starting model (the warm start), no adapter
    reasoning          [1, 0, 1, 0, 1, 0]      M_Reas: one adapter, GRPO with the loss on reasoning tokens only
                                               (``routed-lora train --mode joint --loss-on reasoning``)
    tool               [1, 1, 0, 1, 0, 0]      M_Tool: one adapter, GRPO with the loss on tool tokens only
                                               (``--loss-on tool``)
    unified            [1, 1, 1, 1, 1, 1]      M_Unified: one adapter, GRPO on every token (``--loss-on all``)
    hybrid_tool        [1, 1, 0, 0, 0, 0]      H_Tool: M_Base writes the reasoning tokens, M_Tool the tool tokens
    hybrid_reasoning   [1, 0, 1, 0, 0, 0]      H_Reas: M_Reas writes the reasoning tokens, M_Base the tool tokens

The hybrids are decoded by the 2-Agent loop (:func:`routed_lora.diagnostics.evaluate.two_agent_rollouts`):
each model reads the whole transcript with its own weights and writes its role's tokens, which is what
composing two separately trained models at decoding time means. (Routing both adapters inside one model would
encode the other role's context tokens with the other adapter, a different system.)

Each variant answers every question with N sampled decodes (default 50, temperature 1); the rate s_qv is the
fraction correct; lambda_q = X^-1 logit(s_q) (:func:`routed_lora.diagnostics.leas.leas`, questions no variant
solves dropped); the negative-interaction share is the share of kept questions with lambda_tool*reasoning < 0,
with a bootstrap interval over questions.

This differs from ``routed-lora eval --variant all`` + ``diagnose leas`` (kept, "route-choice LEAS"): there the
six variants are route choices on one DART model, which measures how the two adapters combine at inference, not
joint-training interference; its shares are not comparable with the paper's 42-67%.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .leas import VARIANTS, leas

ROLES = {"reasoning": "reasoning", "tool": "tool", "unified": "all"}  # variant -> the --loss-on it was trained with


def _adapter_dir(path: Path) -> tuple[Path, dict | None]:
    """(the save_adapters folder, the training config beside it or None) for a train --out folder or an
    adapters folder."""
    path = Path(path)
    if (path / "adapters" / "routed_lora.json").exists():
        cfg = path / "config.json"
        return path / "adapters", json.loads(cfg.read_text()) if cfg.exists() else None
    if (path / "routed_lora.json").exists():
        cfg = path.parent / "config.json"
        return path, json.loads(cfg.read_text()) if cfg.exists() else None
    raise FileNotFoundError(f"{path}: neither a `routed-lora train --out` folder (with adapters/) nor an adapters "
                            "folder (with routed_lora.json)")


def check_runs(runs: dict[str, str | Path]) -> dict[str, Path]:
    """Check the three trained models before anything is decoded: one adapter each (joint layout), the same
    rank, alpha and modules, and, where the training config is beside it, ``mode = joint`` and the expected
    ``loss_on``. Returns {variant: adapters folder}."""
    out, seen = {}, {}
    for variant, expect in ROLES.items():
        if runs.get(variant) is None:
            raise ValueError(f"--{variant}: missing; LEAS --paper needs the M_{variant.capitalize()} run "
                             f"(`routed-lora train --mode joint --loss-on {expect} --out DIR`)")
        d, cfg = _adapter_dir(runs[variant])
        man = json.loads((d / "routed_lora.json").read_text())
        names = list(man.get("model_adapters") or man.get("adapters") or [])
        if len(names) != 1:
            raise ValueError(f"--{variant} {runs[variant]}: expected one adapter (a --mode joint run), got {names}")
        if cfg is not None:
            if cfg.get("mode") != "joint":
                raise ValueError(f"--{variant} {runs[variant]}: trained with mode {cfg.get('mode')!r}, expected "
                                 "'joint' (one adapter on every token)")
            if cfg.get("loss_on", "all") != expect:
                raise ValueError(f"--{variant} {runs[variant]}: trained with loss_on {cfg.get('loss_on', 'all')!r}, "
                                 f"expected {expect!r}")
        layout = (int(man["r"]), float(man["lora_alpha"]), tuple(sorted(man.get("modules") or [])))
        seen[variant] = layout
        out[variant] = d
    if len(set(seen.values())) != 1:
        detail = ", ".join(f"{v}: r={lay[0]}, alpha={lay[1]:g}, {len(lay[2])} modules" for v, lay in seen.items())
        raise ValueError(f"the three runs must have adapters of one size (equal parameters): {detail}")
    return out


def _load(model_dir, adapters: Path | None):
    import routed_lora as rl
    from routed_lora.grpo.logprobs import disable_dropout
    from routed_lora.grpo.trainer import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(model_dir)
    model.eval()
    disable_dropout(model)
    if adapters is not None:
        rl.load_adapters(model, adapters)
        rl.set_routes(model, 0)  # the one adapter on every token
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok


def paper_leas(model_dir, runs: dict[str, str | Path], rows: Sequence[dict], retriever, *, samples: int = 50,
               temperature: float = 1.0, batch_size: int = 200, max_turns: int = 4, max_new_tokens: int = 64,
               max_length: int = 1024, topk: int = 3, seed: int = 0, n_boot: int = 2000,
               prompt_template: str | None = None, progress=None) -> dict:
    """Rates of the six paper variants on ``rows`` and their LEAS (module doc). Returns a JSON-ready dict with
    per-question ``rates``, the LEAS summary and ``negative_interaction_share`` with its bootstrap interval."""
    from routed_lora.env.data import TINY_PROMPT, make_prompt
    from routed_lora.env.reward import exact_match, extract_answer
    from routed_lora.env.rollout import generate_rollouts
    from routed_lora.study.stats import paired_bootstrap

    from .evaluate import two_agent_rollouts

    if samples < 1:
        raise ValueError(f"samples: expected >= 1 sampled decodes per question, got {samples}")
    if not rows:
        raise ValueError("questions: the evaluation set is empty")
    dirs = check_runs(runs)
    base, tok = _load(model_dir, None)
    models = {"base": base}
    for v in ROLES:
        models[v] = _load(model_dir, dirs[v])[0]
    systems = {
        "base": ("one", models["base"], None),
        "reasoning": ("one", models["reasoning"], None),
        "tool": ("one", models["tool"], None),
        "unified": ("one", models["unified"], None),
        "hybrid_tool": ("two", models["base"], models["tool"]),
        "hybrid_reasoning": ("two", models["reasoning"], models["base"]),
    }
    template = prompt_template or TINY_PROMPT
    kw = dict(max_turns=max_turns, max_new_tokens=max_new_tokens, max_length=max_length, topk=topk,
              do_sample=True, temperature=temperature)
    rates = {}
    expanded = [i for i in range(len(rows)) for _ in range(samples)]
    for v in VARIANTS:
        kind, a, b = systems[v]
        correct = np.zeros(len(rows))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the same seed for every variant
            for s in range(0, len(expanded), batch_size):
                idx = expanded[s: s + batch_size]
                prompts = [make_prompt(rows[i]["question"], template) for i in idx]
                if kind == "one":
                    rolls = generate_rollouts(a, tok, prompts, retriever, **kw)
                else:
                    rolls, _ = two_agent_rollouts(a, b, tok, prompts, retriever, **kw)
                for i, ro in zip(idx, rolls):
                    correct[i] += exact_match(extract_answer(ro.text), rows[i]["golden_answers"])
        rates[v] = correct / samples
        if progress:
            progress(f"  {v:16s} mean rate {rates[v].mean():.3f}")
    ids = [r.get("id", i) for i, r in enumerate(rows)]
    res = leas(rates, n_samples=samples, question_ids=ids)
    neg = (res.column("tool*reasoning") < 0).astype(float)
    ci = paired_bootstrap([0.0] * len(neg), list(neg), n_boot=n_boot, seed=seed) if len(neg) else None
    hops = [rows[i].get("hops") for i in res.kept]
    by_hops = {}
    for h in sorted({h for h in hops if h is not None}):
        sel = [k for k, hh in enumerate(hops) if hh == h]
        by_hops[f"{h}hop"] = {"kept": len(sel), "negative_interaction_share": float(neg[sel].mean())}
    return {
        "method": "paper", "samples": samples, "temperature": temperature, "questions": len(rows),
        "runs": {v: str(d) for v, d in dirs.items()},
        "mean_rates": {v: float(rates[v].mean()) for v in VARIANTS},
        "leas": res.summary(),
        "negative_interaction_share": res.negative_interaction_share,
        "negative_interaction_share_ci95": None if ci is None else [ci["lo"], ci["hi"]],
        "by_hops": by_hops,
        "per_question": [{"id": ids[i], "hops": rows[i].get("hops"), **{v: float(rates[v][i]) for v in VARIANTS}}
                         for i in range(len(rows))],
        "_result": res,
    }
