"""``routed-lora eval``: exact match per data set with the full tool loop, for the six LEAS variants of one routed
model and for the paper's 2-Agent baseline.

Variants as route choices on one routed model (adapters ``reasoning`` = R and ``tool`` = T; -1 = the backbone).
The DART tag router (DESIGN.md §2) splits positions into *tool positions* (from the one holding ``<search>`` up
to, not including, the one holding ``</search>``) and *context positions* (everything else: prompt,
``<think>``, ``<answer>``, ``<information>``). Each variant picks a route for each kind:

    variant            tool positions   context positions   LEAS design vector
    base               -1               -1                  [1, 0, 0, 0, 0, 0]
    reasoning          R                R                   [1, 0, 1, 0, 1, 0]
    tool               T                T                   [1, 1, 0, 1, 0, 0]
    unified            T                R                   [1, 1, 1, 1, 1, 1]   (DART as trained)
    hybrid_tool        T                -1                  [1, 1, 0, 0, 0, 0]
    hybrid_reasoning   -1               R                   [1, 0, 1, 0, 0, 0]

(:data:`VARIANT_ROUTES`). The routes are applied by :class:`VariantRouter`, which wraps the DART router and
remaps its output, so the model routes by itself in ``generate`` exactly as in training. A ``joint`` checkpoint
(one adapter on every token) supports ``base`` and ``unified`` only.

Scoring. For every question: ``samples`` rollouts at ``temperature`` (the correctness rate = the fraction whose
last ``<answer>`` exact-matches a gold answer, normalised as in DESIGN.md §3), and, with ``greedy``, one greedy
rollout. EM per data set is the mean greedy score and the mean rate. One JSONL line per (variant, question):
``variant, dataset, id, question, golden_answers, hops, n, correct (list of 0/1), rate, greedy, answers,
tool_calls`` -- the long form that ``routed-lora diagnose leas`` reads.

2-Agent baseline (``two-agent``). Two copies of the model are loaded, each holding the adapters; copy "R"
routes every position to R (the reasoning agent), copy "T" every position to T (the tool agent). The reasoning
agent writes until it emits ``<search>`` (or ``</answer>`` / eos); the turn passes to the tool agent, which reads
the whole transcript and writes the query up to ``</search>``; the passages are spliced in as ids and the turn
returns to the reasoning agent. So every token is produced by the same adapter as in DART (the position holding
``<search>`` predicts the first query token with T in both), but each agent encodes the whole context with its
own adapter and its own KV cache.

Cost accounting (the same agent loop and HF ``generate`` for both systems, same questions, seed and settings):

- ``wall_s``: wall-clock time of all rollouts of the system;
- ``generate_calls``: prefill calls. DART keeps one KV cache per rollout across its turns
  (:func:`routed_lora.env.rollout.generate_rollouts`): one call per turn feeds the prompt, then each tool
  result. The 2-Agent loop calls ``model.generate`` per turn, and each call builds a KV cache from scratch over
  the whole transcript of each of its rows; ``cache_rebuilds``: summed over rollouts, the calls after a
  rollout's first one (its context re-encoded; 0 for DART, which never re-encodes);
- ``prefill_tokens``: real (non-pad) tokens encoded by those prefills, the compute the rebuilds cost;
- ``handovers`` and ``foreign_tokens`` (2-Agent): turn changes between agents, and the tokens an agent must
  encode that the other agent wrote since its last turn (with persistent per-agent caches, the least extra
  prefill a 2-Agent system pays; DART pays none, its one cache holds every token);
- ``model_bytes``: parameter and buffer bytes of the models held (two copies for 2-Agent);
  ``kv_cache_bytes_peak``: the largest KV cache of one ``generate`` call (2 x layers x kv_heads x head_dim x
  rows x tokens x element size) times the caches a persistent implementation holds at once (1 for DART, 2 for
  2-Agent); on CUDA also ``cuda_peak_bytes`` (model bytes + the largest rise of allocated memory in one chunk).

The two systems alternate over chunks of questions with the same seed per chunk, so the drift of a shared
machine's speed biases neither wall time.

The pieces: :mod:`.variants` (the variants as routes, :class:`VariantRouter`) and :mod:`.two_agent` (the 2-Agent
decoding loop); this module re-exports their names (for reading; patch a name where it is read)
and keeps loading, scoring, cost metering, the comparison and the records. Must not grow the pieces back.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch


from . import two_agent, variants  # noqa: F401  (the pieces, as attributes)
from .leas import VARIANTS
from .two_agent import _single, two_agent_rollouts  # noqa: F401  (re-exported; tests patch two_agent_rollouts here)
from .variants import VARIANT_ROUTES, VariantRouter, _VariantStream, variant_route_pair  # noqa: F401

__all__ = [
    "VARIANTS",
    "ALL_VARIANTS",
    "VARIANT_ROUTES",
    "variant_route_pair",
    "VariantRouter",
    "load_policy",
    "evaluate_variant",
    "two_agent_rollouts",
    "compare_two_agent",
    "summarize",
    "write_records",
    "load_datasets",
]

ALL_VARIANTS = VARIANTS + ("two-agent",)


# ----------------------------------------------------------------------------------------------- loading


def _read_adapter_checkpoint(path: Path) -> dict:
    if path.is_dir():
        path = path / "checkpoint.pt"
    state = torch.load(path, map_location="cpu", weights_only=False)
    if "adapters" not in state:
        raise ValueError(f"{path}: not a routed-lora training checkpoint (no 'adapters' entry)")
    return state


def load_policy(model_dir: str | Path, adapters: str | Path | None = None, *, variant: str = "unified",
                mode: str = "dart", r: int = 8, lora_alpha: float = 16.0, target_modules=None,
                random_b: float = 0.0, seed: int = 0):
    """Load the backbone from ``model_dir`` (an HF folder with its tokenizer), patch it with routed LoRA and a
    :class:`VariantRouter`, and load ``adapters``: a training checkpoint (``checkpoint.pt`` or its folder; the
    layout, rank, alpha and target modules come from its config), a folder written by
    ``routed_lora.save_adapters`` (its ``routed_lora.json`` gives the layout), or one PEFT LoRA folder (loaded
    as a single ``joint`` adapter). Without ``adapters`` the adapters are fresh for ``mode`` ("dart": reasoning
    and tool of rank r; "joint": one adapter ``joint`` of rank 2r, alpha 2 * lora_alpha, as the trainer builds
    it), with B = 0 (every variant is the backbone) unless ``random_b`` > 0 draws B ~ N(0, random_b^2) (seeded
    by ``seed``; for diagnostics of untrained adapters). Returns ``(model, tokenizer, router)``; set
    ``router.variant`` to switch variants."""
    import routed_lora as rl
    from routed_lora.grpo.logprobs import disable_dropout
    from routed_lora.grpo.trainer import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(model_dir)
    model.eval()
    disable_dropout(model)
    if mode not in ("dart", "joint"):
        raise ValueError(f"mode: expected 'dart' or 'joint', got {mode!r}")
    names, state, adapter_dir = ("reasoning", "tool"), None, None
    if mode == "joint":
        names, r, lora_alpha = ("joint",), 2 * r, 2 * lora_alpha
    targets, use_rslora = target_modules, False
    if adapters is not None:
        p = Path(adapters)
        if not p.exists():
            raise FileNotFoundError(f"adapters: {p} does not exist (expected a checkpoint.pt, its folder, a "
                                    "save_adapters folder or a PEFT LoRA folder)")
        if (p / "routed_lora.json").exists():  # save_adapters' folder: the manifest gives the layout
            man = json.loads((p / "routed_lora.json").read_text())
            names = tuple(man.get("model_adapters") or man["adapters"])
            r, lora_alpha, use_rslora = int(man["r"]), float(man["lora_alpha"]), bool(man.get("use_rslora"))
            targets = targets or man.get("modules") or man.get("target_modules")
            adapter_dir = p
        elif (p / "adapter_config.json").exists():  # one PEFT LoRA folder: a single (joint) adapter
            cfg = json.loads((p / "adapter_config.json").read_text())
            names, r, lora_alpha = ("joint",), int(cfg["r"]), float(cfg["lora_alpha"])
            use_rslora = bool(cfg.get("use_rslora"))
            targets = targets or cfg["target_modules"]
            adapter_dir = p
        else:
            state = _read_adapter_checkpoint(p)
            cfg = state.get("config", {})
            mode = cfg.get("mode", "dart")
            r_cfg, alpha = int(cfg.get("r", r)), float(cfg.get("lora_alpha", lora_alpha))
            if mode == "joint":
                names, r, lora_alpha = ("joint",), 2 * r_cfg, 2 * alpha
            else:
                names, r, lora_alpha = ("reasoning", "tool"), r_cfg, alpha
            targets = targets or tuple(cfg.get("target_modules") or ()) or None
    from routed_lora.hf import DEFAULT_TARGET_MODULES

    targets = targets or DEFAULT_TARGET_MODULES
    inner = rl.TagRouter(tok, spans={names[-1]: ("<search>", "</search>")}, default=names[0])
    router = VariantRouter(inner, variant, tool_adapter=names[-1])
    if isinstance(targets, list):
        targets = tuple(targets)
    rl.apply_routed_lora(model, target_modules=targets, r=r, lora_alpha=lora_alpha, adapters=names,
                         use_rslora=use_rslora, router=router)
    if adapter_dir is not None:
        rl.load_adapters(model, adapter_dir, adapter="joint" if names == ("joint",) else None)
    else:
        if state is not None:
            from routed_lora.grpo.trainer import load_adapter_state

            load_adapter_state(model, state["adapters"])
        elif random_b > 0:
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for m in model.modules():
                    if hasattr(m, "lora_B") and hasattr(m, "adapter_names"):
                        m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * random_b)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok, router


def load_datasets(specs: Sequence[str], limit: int | None = None) -> dict[str, list[dict]]:
    """``NAME=PATH`` or ``PATH`` (name = file stem) -> rows (``question``, ``golden_answers``, ...)."""
    from routed_lora.env.data import load_qa

    out = {}
    for s in specs:
        name, path = s.split("=", 1) if "=" in s else (Path(s).stem, s)
        if name in out:
            raise ValueError(f"data set name {name!r} given twice; use NAME=PATH")
        out[name] = load_qa(path, limit=limit)
    return out


# ----------------------------------------------------------------------------------------------- cost meter


@dataclass
class _Meter:
    """Counts ``generate`` calls, prefill tokens and the largest KV cache of a call."""

    kv_bytes_per_token: int
    calls: int = 0
    row_calls: int = 0
    prefill_tokens: int = 0
    kv_peak: int = 0
    per_row_calls: list = field(default_factory=list)

    def wrap(self, model):
        orig = model.generate
        meter = self

        def generate(*args, **kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            attn = kwargs.get("attention_mask")
            out = orig(*args, **kwargs)
            meter.calls += 1
            meter.row_calls += int(ids.shape[0])
            meter.prefill_tokens += int(attn.sum()) if attn is not None else int(ids.numel())
            seqs = out.sequences if hasattr(out, "sequences") else out
            meter.kv_peak = max(meter.kv_peak, int(seqs.numel()) * meter.kv_bytes_per_token)
            return out

        return generate


def _kv_bytes_per_token(model) -> int:
    cfg = getattr(model, "config", None)
    try:
        layers = cfg.num_hidden_layers
        heads = cfg.num_attention_heads
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    except AttributeError:
        return 0
    elem = next(model.parameters()).element_size()
    return 2 * layers * kv * hd * elem


def _model_bytes(*models) -> int:
    seen, total = set(), 0
    for m in models:
        for t in [*m.parameters(), *m.buffers()]:
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
    return total


@torch.no_grad()
def _metered_rollouts(model, meter: _Meter, *args, **kwargs):
    """DART rollouts (one KV cache per rollout for all its turns) with their costs added to ``meter``: one
    cache build per rollout, the prefill calls and their real tokens (prompts, then each tool result)."""
    from routed_lora.env.rollout import generate_rollouts

    m: dict = {}
    rolls = generate_rollouts(model, *args, meters=m, **kwargs)
    meter.calls += m["prefill_calls"]
    meter.row_calls += len(rolls)
    meter.prefill_tokens += m["prefill_real_tokens"]
    meter.kv_peak = max(meter.kv_peak, m["kv_peak_tokens"] * meter.kv_bytes_per_token)
    return rolls


# ----------------------------------------------------------------------------------------------- one variant


def _score(rolls, rows, idx) -> list[tuple[int, float, str | None, int]]:
    from routed_lora.env.reward import exact_match, extract_answer

    out = []
    for i, ro in zip(idx, rolls):
        pred = extract_answer(ro.text)
        out.append((i, float(exact_match(pred, rows[i]["golden_answers"])), pred, ro.num_tool_calls))
    return out


def _run_system(run_fn, rows, *, samples, greedy, temperature, batch_size, seed, prompt_template):
    """Rollouts of every question (greedy once, then ``samples`` sampled), via ``run_fn(prompts, do_sample)``.
    Returns per-question dicts."""
    from routed_lora.env.data import TINY_PROMPT, make_prompt

    template = prompt_template or TINY_PROMPT
    recs = [{"correct": [], "answers": [], "tool_calls": 0.0, "greedy": None, "greedy_answer": None}
            for _ in rows]
    n_rollouts = 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        plans = ([("greedy", 1, False)] if greedy else []) + ([("sampled", samples, True)] if samples > 0 else [])
        for kind, reps, do_sample in plans:
            expanded = [i for i in range(len(rows)) for _ in range(reps)]
            for s in range(0, len(expanded), batch_size):
                idx = expanded[s: s + batch_size]
                rolls = run_fn([make_prompt(rows[i]["question"], template) for i in idx], do_sample)
                n_rollouts += len(rolls)
                for i, sc, pred, calls in _score(rolls, rows, idx):
                    if kind == "greedy":
                        recs[i]["greedy"], recs[i]["greedy_answer"] = int(sc), pred
                    else:
                        recs[i]["correct"].append(int(sc))
                        recs[i]["answers"].append(pred)
                        recs[i]["tool_calls"] += calls / reps
    return recs, n_rollouts


def _records(variant, dataset, rows, recs, samples):
    out = []
    for k, (row, rec) in enumerate(zip(rows, recs)):
        out.append({
            "variant": variant,
            "dataset": dataset,
            "id": row.get("id", k),
            "question": row["question"],
            "golden_answers": row["golden_answers"],
            "hops": row.get("hops"),
            "n": samples,
            "correct": rec["correct"],
            "rate": (sum(rec["correct"]) / len(rec["correct"])) if rec["correct"] else None,
            "greedy": rec["greedy"],
            "answers": rec["answers"],
            "greedy_answer": rec["greedy_answer"],
            "tool_calls": rec["tool_calls"],
        })
    return out


def evaluate_variant(model, tokenizer, router: VariantRouter, datasets: dict[str, list[dict]], retriever,
                     variant: str, *, samples: int = 4, greedy: bool = True, temperature: float = 1.0,
                     batch_size: int = 64, max_turns: int = 4, max_new_tokens: int = 64, max_length: int = 1024,
                     topk: int = 3, seed: int = 1234, prompt_template: str | None = None,
                     generation_kwargs: dict | None = None) -> tuple[list, dict]:
    """Evaluate ``variant`` (one of :data:`VARIANTS`) on every data set. Returns (records, costs)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {VARIANTS} (two-agent: use compare_two_agent), got {variant!r}")
    old = router.variant
    router.variant = variant
    variant_route_pair(variant, router.adapter_names or ("reasoning", "tool"))
    meter = _Meter(_kv_bytes_per_token(model))
    kw = dict(max_turns=max_turns, max_new_tokens=max_new_tokens, max_length=max_length, topk=topk,
              temperature=temperature, generation_kwargs=generation_kwargs)
    records, t0, n_rollouts = [], time.perf_counter(), 0
    try:
        for name, rows in datasets.items():
            def run(prompts, do_sample):
                return _metered_rollouts(model, meter, tokenizer, prompts, retriever, do_sample=do_sample, **kw)

            recs, n = _run_system(run, rows, samples=samples, greedy=greedy, temperature=temperature,
                                  batch_size=batch_size, seed=seed, prompt_template=prompt_template)
            n_rollouts += n
            records += _records(variant, name, rows, recs, samples)
    finally:
        router.variant = old
    costs = {"wall_s": time.perf_counter() - t0, "rollouts": n_rollouts, "generate_calls": meter.calls,
             "cache_rebuilds": meter.row_calls - n_rollouts,
             "prefill_tokens": meter.prefill_tokens, "kv_cache_bytes_peak": meter.kv_peak,
             "model_bytes": _model_bytes(model)}
    return records, costs


# ----------------------------------------------------------------------------------------------- 2-Agent


def compare_two_agent(model_dir, adapters, datasets: dict[str, list[dict]], retriever, *, samples: int = 4,
                      greedy: bool = True, temperature: float = 1.0, batch_size: int = 64, max_turns: int = 4,
                      max_new_tokens: int = 64, max_length: int = 1024, topk: int = 3, seed: int = 1234,
                      prompt_template: str | None = None, dart=None, chunk_questions: int | None = None,
                      generation_kwargs: dict | None = None) -> tuple[list, dict]:
    """Run the 2-Agent baseline and DART (``unified``, one model) on the same questions with the same settings.

    The two systems alternate over chunks of ``chunk_questions`` questions (default: as many as fill one
    generation batch), each chunk with the same seed for both, so a machine whose speed drifts (a shared CPU)
    biases neither wall time. ``dart``: an already loaded ``(model, tokenizer, router)`` (else loaded here); the
    two agents get exactly its adapters. On CUDA, ``cuda_peak_bytes`` = the system's ``model_bytes`` + the
    largest rise of allocated memory above the level before one of its chunks (activations and KV caches).
    Returns (records of both systems, {"two-agent": costs, "unified": costs})."""
    from routed_lora.grpo.trainer import adapter_state, load_adapter_state

    if dart is None:
        dart = load_policy(model_dir, adapters)
    model, tok, router = dart
    dev = next(model.parameters()).device
    reasoner, _, _ = load_policy(model_dir, adapters, variant="reasoning")
    tool_agent, _, _ = load_policy(model_dir, adapters, variant="tool")
    state = adapter_state(model)  # the very adapters DART runs with (also fresh or random ones)
    load_adapter_state(reasoner, state)
    load_adapter_state(tool_agent, state)
    reasoner.to(dev)
    tool_agent.to(dev)

    kw = dict(samples=samples, greedy=greedy, temperature=temperature, batch_size=batch_size, max_turns=max_turns,
              max_new_tokens=max_new_tokens, max_length=max_length, topk=topk,
              prompt_template=prompt_template, generation_kwargs=generation_kwargs)
    per_q = max(1, samples + int(greedy))
    chunk = chunk_questions or max(1, batch_size // per_q)
    meters = {"R": _Meter(_kv_bytes_per_token(reasoner)), "T": _Meter(_kv_bytes_per_token(tool_agent))}
    totals = {"handovers": 0, "foreign_tokens": 0}
    cost_dart = {"wall_s": 0.0, "rollouts": 0, "generate_calls": 0, "cache_rebuilds": 0, "prefill_tokens": 0,
                 "kv_cache_bytes_peak": 0, "model_bytes": _model_bytes(model), "handovers": 0, "foreign_tokens": 0}
    wall_two, n_two = 0.0, 0
    peak = {"unified": 0, "two-agent": 0}
    rec_dart, rec_two = [], []

    def measured(which, fn):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            base = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        out = fn()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            peak[which] = max(peak[which], torch.cuda.max_memory_allocated(dev) - base)
        return out

    for name, rows in datasets.items():
        rows = [{**r, "id": r.get("id", k)} for k, r in enumerate(rows)]
        for c, start in enumerate(range(0, len(rows), chunk)):
            part = {name: rows[start: start + chunk]}
            recs, cd = measured("unified", lambda: evaluate_variant(model, tok, router, part, retriever, "unified",
                                                                     seed=seed + c, **kw))
            rec_dart += recs
            for k in ("wall_s", "rollouts", "generate_calls", "cache_rebuilds", "prefill_tokens"):
                cost_dart[k] += cd[k]
            cost_dart["kv_cache_bytes_peak"] = max(cost_dart["kv_cache_bytes_peak"], cd["kv_cache_bytes_peak"])

            def run(prompts, do_sample):
                rolls, st = two_agent_rollouts(reasoner, tool_agent, tok, prompts, retriever, max_turns=max_turns,
                                               max_new_tokens=max_new_tokens, max_length=max_length, topk=topk,
                                               do_sample=do_sample, temperature=temperature, meters=meters,
                                               generation_kwargs=generation_kwargs)
                for k in totals:
                    totals[k] += st[k]
                return rolls

            t0 = time.perf_counter()
            recs, n = measured("two-agent", lambda: _run_system(
                run, part[name], samples=samples, greedy=greedy, temperature=temperature, batch_size=batch_size,
                seed=seed + c, prompt_template=prompt_template))
            wall_two += time.perf_counter() - t0
            n_two += n
            rec_two += _records("two-agent", name, part[name], recs, samples)
    cost = {"wall_s": wall_two, "rollouts": n_two,
            "generate_calls": sum(m.calls for m in meters.values()),
            "cache_rebuilds": sum(m.row_calls for m in meters.values()) - n_two,
            "prefill_tokens": sum(m.prefill_tokens for m in meters.values()),
            "kv_cache_bytes_peak": 2 * max(m.kv_peak for m in meters.values()),
            "model_bytes": _model_bytes(reasoner, tool_agent), **totals}
    if dev.type == "cuda":
        cost["cuda_peak_bytes"] = cost["model_bytes"] + peak["two-agent"]
        cost_dart["cuda_peak_bytes"] = cost_dart["model_bytes"] + peak["unified"]
    return rec_dart + rec_two, {"two-agent": cost, "unified": cost_dart}


# ----------------------------------------------------------------------------------------------- summaries


def summarize(records: Sequence[dict]) -> dict:
    """Per variant and data set (and per hop count when rows have ``hops``): greedy EM, mean sampled rate,
    questions, tool calls."""
    groups: dict = defaultdict(list)
    for r in records:
        groups[(r["variant"], r["dataset"])].append(r)
        if r.get("hops") is not None:
            groups[(r["variant"], f"{r['dataset']}/{int(r['hops'])}hop")].append(r)
        groups[(r["variant"], "all")].append(r)
    out: dict = defaultdict(dict)
    for (v, d), rs in sorted(groups.items()):
        g = [r["greedy"] for r in rs if r["greedy"] is not None]
        s = [r["rate"] for r in rs if r["rate"] is not None]
        out[v][d] = {"n": len(rs), "em_greedy": (sum(g) / len(g)) if g else None,
                     "em_sampled": (sum(s) / len(s)) if s else None,
                     "tool_calls": sum(r["tool_calls"] for r in rs) / len(rs)}
    return dict(out)


def write_records(records: Sequence[dict], out_dir: str | Path) -> dict[str, Path]:
    """``eval_<variant>.jsonl`` per variant (one line per question, the long form LEAS reads)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    by_v: dict = defaultdict(list)
    for r in records:
        by_v[r["variant"]].append(r)
    paths = {}
    for v, rs in by_v.items():
        p = out / f"eval_{v}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in rs))
        paths[v] = p
    return paths

