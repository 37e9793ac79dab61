"""``routed-lora sft``: a short warm start of the tiny model on scripted expert trajectories.

A model this small starts at zero reward, and GRPO alone does not cross the "copy from the retrieved text" jump
(DESIGN.md §3b), so the model is fully fine-tuned on :mod:`~routed_lora.env.trajectories` (information blocks and
the prompt carry no loss), then evaluated on held-out questions with the real tool loop
(:func:`~routed_lora.env.rollout.generate_rollouts`, greedy, KV cache), 1-hop and 2-hop apart.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from .data import TINY_PROMPT, load_qa, make_prompt
from .reward import exact_match, extract_answer
from .rollout import generate_rollouts


def evaluate(model, tokenizer, rows: Sequence[dict], retriever, *, batch_size: int = 64, max_turns: int = 4,
             max_new_tokens: int = 48, do_sample: bool = False, temperature: float = 1.0, topk: int = 3,
             prompt_template: str = TINY_PROMPT) -> dict:
    """Exact match of the agent on ``rows`` (greedy by default), overall and per number of hops.

    Returns ``{"em", "em_1hop", "em_2hop", ..., "n", "tool_calls", "answered", "rollouts_per_s"}``."""
    was_training = model.training
    model.eval()
    scores, hops, calls, answered = [], [], [], []
    t0 = time.perf_counter()
    for s in range(0, len(rows), batch_size):
        chunk = rows[s: s + batch_size]
        rolls = generate_rollouts(model, tokenizer, [make_prompt(r["question"], prompt_template) for r in chunk],
                                  retriever, max_turns=max_turns, max_new_tokens=max_new_tokens,
                                  do_sample=do_sample, temperature=temperature, topk=topk)
        for r, ro in zip(chunk, rolls):
            pred = extract_answer(ro.text)
            scores.append(exact_match(pred, r["golden_answers"]))
            hops.append(int(r.get("hops", 0)))
            calls.append(ro.num_tool_calls)
            answered.append(float(pred is not None))
    dt = time.perf_counter() - t0
    model.train(was_training)
    out = {"em": sum(scores) / max(1, len(scores)), "n": len(scores),
           "tool_calls": sum(calls) / max(1, len(calls)), "answered": sum(answered) / max(1, len(answered)),
           "rollouts_per_s": len(scores) / dt if dt > 0 else float("nan")}
    for h in sorted(set(hops)):
        sel = [sc for sc, hh in zip(scores, hops) if hh == h]
        out[f"em_{h}hop"] = sum(sel) / len(sel)
        out[f"n_{h}hop"] = len(sel)
    return out


def _batch(trajs: Sequence[dict], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    T = max(len(t["input_ids"]) for t in trajs)
    ids = torch.full((len(trajs), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(trajs), T), dtype=torch.long)
    loss = torch.zeros((len(trajs), T), dtype=torch.float32)
    for b, t in enumerate(trajs):
        n = len(t["input_ids"])
        ids[b, :n] = torch.tensor(t["input_ids"])
        attn[b, :n] = 1
        loss[b, :n] = torch.tensor(t["loss_mask"], dtype=torch.float32)
    return ids, attn, loss


def sft_loss(model, ids: torch.Tensor, attn: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Token-mean cross-entropy over positions with ``loss_mask = 1`` (token t predicted from t - 1)."""
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
    target = ids[:, 1:]
    mask = loss_mask[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                            reduction="none").view_as(mask)
    return (nll * mask).sum() / mask.sum().clamp_min(1.0)


def _split_eval(rows: Sequence[dict], n: int, seed: int) -> list[dict]:
    """Up to ``n`` rows, balanced between 1-hop and 2-hop, deterministic in ``seed``."""
    rng = random.Random(seed)
    by_hops: dict[int, list[dict]] = {}
    for r in rows:
        by_hops.setdefault(int(r.get("hops", 0)), []).append(r)
    per = max(1, n // max(1, len(by_hops)))
    out = []
    for h in sorted(by_hops):
        group = by_hops[h][:]
        rng.shuffle(group)
        out += group[:per]
    return out


def next_batch(order: list[int], n: int, batch_size: int, rng) -> list[int]:
    """The next ``batch_size`` example indices from ``order``, refilled with a fresh shuffle of ``range(n)`` when
    it runs short (epochs without replacement; a batch may span two epochs). Consumes them from ``order``."""
    if len(order) < batch_size:
        more = list(range(n))
        rng.shuffle(more)
        order += more
    out = order[:batch_size]
    del order[:batch_size]
    return out


def run_sft(
    world_dir: str | Path,
    out_dir: str | Path,
    *,
    model_dir: str | Path | None = None,
    steps: int = 300,
    batch_size: int = 32,
    lr: float = 3e-3,
    warmup: int = 20,
    min_lr_frac: float = 0.1,
    weight_decay: float = 0.0,
    grad_clip: float = 1.0,
    two_hop_frac: float = 0.1,
    eval_n: int = 200,
    eval_every: int = 0,
    eval_batch_size: int = 100,
    sampled_eval: bool = True,
    max_turns: int = 4,
    threads: int = 1,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Fine-tune the tiny model of ``world_dir`` (or ``model_dir``) on expert trajectories of the training
    questions; save it to ``out_dir`` (a Hugging Face folder with the tokenizer) with ``sft_metrics.jsonl`` and
    ``sft_summary.json``. Returns the summary (steps/s, final loss, held-out greedy EM 1-hop / 2-hop).

    ``two_hop_frac`` keeps that fraction of the 2-hop training questions (all 1-hop ones are kept): a partial
    warm start that leaves 2-hop questions for GRPO to learn. Measured on the default world (seed 0, 100
    held-out questions): the defaults (300 steps, 0.1) give greedy EM 1-hop 0.98 / 2-hop 0.56 (sampled at
    temperature 1: 0.74 / 0.34); with all 2-hop data (1.0), 200 steps give 0.88 / 0.62 and 300-400 steps 1.0 /
    1.0, which leaves GRPO nothing to improve.

    ``threads`` defaults to 1: on a busy 2-core machine two threads made each step about 5 times slower (the
    threads wait for each other), while one thread degrades gracefully. ``sampled_eval`` adds one sampled
    rollout per held-out question at temperature 1 (``eval_sampled_t1``: the EM GRPO starts from)."""
    from tqdm.auto import tqdm

    from .retriever import BM25Retriever
    from .tokenizer import load_model, save_model
    from .trajectories import build_trajectories

    if threads:
        torch.set_num_threads(threads)
    world_dir, out_dir = Path(world_dir), Path(out_dir)
    model_dir = Path(model_dir) if model_dir else world_dir / "model"
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    rng = random.Random(seed)

    model, tok = load_model(model_dir)
    retriever = BM25Retriever(world_dir / "corpus.jsonl")
    train = load_qa(world_dir / "train.jsonl")
    test = load_qa(world_dir / "test.jsonl")
    if any("plan" not in r for r in train):
        raise ValueError(f"{world_dir}/train.jsonl has rows without a 'plan': SFT needs a generated world "
                         f"(`routed-lora world build --out DIR`)")
    if not 0.0 <= two_hop_frac <= 1.0:
        raise ValueError(f"two_hop_frac must be in [0, 1], got {two_hop_frac}")
    if two_hop_frac < 1.0:
        multi = [i for i, r in enumerate(train) if int(r.get("hops", 1)) > 1]
        keep = set(random.Random(seed + 1).sample(multi, int(round(two_hop_frac * len(multi)))))
        train = [r for i, r in enumerate(train) if int(r.get("hops", 1)) == 1 or i in keep]
    t0 = time.perf_counter()
    trajs = build_trajectories(tok, train, retriever)
    t_traj = time.perf_counter() - t0
    eval_rows = _split_eval(test, eval_n, seed)

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        p = (step - warmup) / max(1, steps - warmup)
        return lr * (min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))

    metrics_path = out_dir / "sft_metrics.jsonl"
    metrics_f = open(metrics_path, "w")
    model.train()
    order: list[int] = []
    t_train = 0.0
    bar = tqdm(range(steps), desc="sft", disable=not progress, dynamic_ncols=True)
    loss_ema = None
    evals = []
    for step in bar:
        batch = [trajs[i] for i in next_batch(order, len(trajs), batch_size, rng)]
        ids, attn, mask = _batch(batch, tok.pad_token_id)
        ts = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = sft_loss(model, ids, attn, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        t_train += time.perf_counter() - ts
        lv = loss.item()
        loss_ema = lv if loss_ema is None else 0.9 * loss_ema + 0.1 * lv
        row = {"step": step + 1, "loss": lv, "lr": lr_at(step), "grad_norm": float(gnorm)}
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            ev = evaluate(model, tok, eval_rows, retriever, batch_size=eval_batch_size, max_turns=max_turns)
            row.update({f"eval_{k}": v for k, v in ev.items()})
            evals.append({"step": step + 1, **ev})
            bar.write(f"step {step + 1}: loss {loss_ema:.3f}, held-out EM {ev['em']:.3f} "
                      f"(1-hop {ev.get('em_1hop', float('nan')):.3f}, 2-hop {ev.get('em_2hop', float('nan')):.3f}), "
                      f"answered {ev['answered']:.2f}, tool calls {ev['tool_calls']:.2f}")
        metrics_f.write(json.dumps(row) + "\n")
        metrics_f.flush()
        bar.set_postfix(loss=f"{loss_ema:.3f}", refresh=False)
    bar.close()

    te = time.perf_counter()
    ev = evaluate(model, tok, eval_rows, retriever, batch_size=eval_batch_size, max_turns=max_turns)
    t_eval = time.perf_counter() - te
    evals.append({"step": steps, **ev})
    final = {"step": steps, **{f"eval_{k}": v for k, v in ev.items()}}
    ev_sampled = None
    if sampled_eval:
        torch.manual_seed(seed)
        ev_sampled = evaluate(model, tok, eval_rows, retriever, batch_size=eval_batch_size, max_turns=max_turns,
                              do_sample=True, temperature=1.0)
        final.update({f"eval_sampled_{k}": v for k, v in ev_sampled.items()})
    metrics_f.write(json.dumps(final) + "\n")
    metrics_f.close()
    save_model(model, tok, out_dir)
    summary = {
        "steps": steps, "batch_size": batch_size, "lr": lr, "train_examples": len(trajs),
        "train_2hop_examples": sum(1 for t in trajs if t["hops"] > 1), "two_hop_frac": two_hop_frac,
        "final_loss_ema": loss_ema, "train_seconds": t_train, "steps_per_s": steps / t_train if t_train else None,
        "trajectory_build_seconds": t_traj, "eval_seconds": t_eval, "eval": ev, "eval_sampled_t1": ev_sampled,
        "evals": evals,
        "model_dir": str(out_dir), "world_dir": str(world_dir), "threads": torch.get_num_threads(),
    }
    (out_dir / "sft_summary.json").write_text(json.dumps(summary, indent=1))
    return summary
