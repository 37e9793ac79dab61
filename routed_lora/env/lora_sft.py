"""A LoRA warm start of a pretrained model (``smollm2-135m`` or any chat-template folder) on the built-in world.

``routed-lora sft`` fine-tunes every weight of the tiny model (0.55M parameters, lr 3e-3). On a pretrained model
that would move all 135M weights and wipe out what it knows, at 10x the memory of the adapters; DART's setting
(DESIGN.md) keeps the backbone frozen. So the pretrained path trains LoRA adapters only, on the same scripted
expert trajectories (the prompt and the ``<information>`` blocks carry no loss), with the prompt rendered by the
model's chat template (``chat:tiny``: :func:`routed_lora.chat.chat_prompt_template`):

- :func:`lora_sft` trains the adapters a routed model already has (DART: ``reasoning`` and ``tool``, each token's
  loss reaching only the adapter its route selects; joint: one adapter on every token). With per-token loss
  l_t, route rho_t and the token mean L = sum_t m_t l_t / sum_t m_t (m: the loss mask),
  dL/dA_e = sum_{t: rho_t = e} dl_t/dA_e * m_t / sum m, so each routed adapter is warm-started only on its
  own tokens, as GRPO will train it. Measured on SmolLM2-135M (docs/pretrained.md): 30 steps of batch 8 at lr
  1e-3 take held-out greedy EM 0 -> 0.875; 15-18 s a step on two idle cores.
- :func:`merged_warm_start` (the study's shared warm start): one joint adapter trained by :func:`lora_sft`, then
  merged, W' = W + s B A, and saved as an ordinary model folder, so every arm of the study starts from the same
  weights with fresh adapters, exactly as it does from the tiny model's full fine-tune. (Two routed adapters
  cannot be merged: their deltas apply to different tokens.)

The prompt a warm-started folder expects is written next to it (:data:`PROMPT_FILE`, read by
:func:`prompt_template_of`), so whoever loads the folder uses the chat template too.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Sequence

import torch

__all__ = ["PROMPT_FILE", "PRETRAINED_STUDY", "check_pretrained", "pretrained_template", "sft_rows", "lora_sft", "merge_lora", "merged_warm_start",
           "prompt_template_of"]

PROMPT_FILE = "routed_lora_prompt.json"

# `routed-lora study --model`: the study's defaults for a pretrained model (flags still win). The warm start of
# the tiny model (250 full fine-tune steps) would over-train the LoRA and take hours; 30 steps reached held-out EM
# 0.875 on SmolLM2 (docs/pretrained.md), and GRPO uses the field's LoRA learning rate, not the tiny model's 5e-4.
PRETRAINED_STUDY = dict(sft_steps=30, lr=2e-5)


def check_pretrained(model) -> None:
    """Fail early, before a study or demo writes anything, when ``model`` (a resolved folder) cannot take the
    pretrained path: not a model folder, or a tokenizer without a chat template."""
    from routed_lora.errors import UsageError

    from .tokenizer import load_tokenizer

    if not (Path(model) / "config.json").is_file():
        raise UsageError(f"--model: expected a model folder (with config.json) or a registered name "
                         f"(smollm2-135m), got {str(model)!r}")
    pretrained_template(load_tokenizer(model), what=f"--model {model}")


def pretrained_template(tokenizer, *, what: str = "--model") -> str:
    """The built-in world's prompt (``chat:tiny``) through ``tokenizer``'s chat template; a clear error when the
    tokenizer has none (a pretrained model without a chat template is not supported by this path)."""
    from routed_lora.chat import chat_prompt_template
    from routed_lora.errors import UsageError

    from .data import TINY_PROMPT

    if not getattr(tokenizer, "chat_template", None):
        raise UsageError(f"{what}: the pretrained path renders the prompt with the model's chat template "
                         f"(chat:tiny), but its tokenizer ({type(tokenizer).__name__}) has none; expected an "
                         "instruction model such as smollm2-135m")
    return chat_prompt_template(tokenizer, TINY_PROMPT)


def sft_rows(train_rows: Sequence[dict], n: int, *, two_hop_frac: float, seed: int) -> list[dict]:
    """``n`` training questions for the warm start (fewer if the pool is smaller): every 1-hop question is
    eligible, and ``two_hop_frac`` of the 2-hop ones (a partial warm start leaves 2-hop questions for GRPO, as
    ``routed-lora sft --two-hop-frac`` does); shuffled with ``seed``."""
    if not 0.0 <= two_hop_frac <= 1.0:
        raise ValueError(f"two_hop_frac: expected a value in [0, 1], got {two_hop_frac}")
    multi = [i for i, r in enumerate(train_rows) if int(r.get("hops", 1)) > 1]
    keep = set(random.Random(seed + 1).sample(multi, int(round(two_hop_frac * len(multi)))))
    pool = [r for i, r in enumerate(train_rows) if int(r.get("hops", 1)) == 1 or i in keep]
    if any("plan" not in r for r in pool):
        raise ValueError("the warm start needs generated world rows (with a 'plan'); build the world with "
                         "`routed-lora world build`")
    return random.Random(seed).sample(pool, min(n, len(pool)))


def lora_sft(model, tokenizer, trajectories: Sequence[dict], *, steps: int, batch_size: int, lr: float,
             seed: int = 0, max_grad_norm: float = 1.0, progress: bool = True, desc: str = "lora sft",
             metrics_path: str | Path | None = None) -> dict:
    """``steps`` AdamW steps (lr ``lr`` for every adapter, constant) on the LoRA adapters of a routed ``model``
    (patched by :func:`routed_lora.apply_routed_lora` with its router attached, so a forward routes by itself),
    cross-entropy on the trajectories' ``loss_mask`` tokens (:func:`routed_lora.env.sft.sft_loss`), batches
    drawn in a reshuffled order per epoch. The backbone gets no gradient. Returns losses and seconds."""
    from tqdm.auto import tqdm

    from routed_lora.grpo.adapters import AdapterOptimizer, adapter_names

    from .sft import _batch, next_batch, sft_loss

    if not trajectories:
        raise ValueError("lora_sft: no trajectories to train on")
    names = adapter_names(model)
    if not names:
        raise ValueError("lora_sft: the model has no LoRA adapters (patch it with apply_routed_lora first)")
    opt = AdapterOptimizer(model, {n: lr for n in names})
    rng = random.Random(seed)
    order: list[int] = []
    losses, step_s = [], []
    fh = open(metrics_path, "w") if metrics_path else None
    model.train()
    bar = tqdm(range(steps), desc=desc, disable=not progress, dynamic_ncols=True)
    try:
        for step in bar:
            batch = [trajectories[i] for i in next_batch(order, len(trajectories), batch_size, rng)]
            ids, attn, mask = _batch(batch, tokenizer.pad_token_id)
            t0 = time.perf_counter()
            loss = sft_loss(model, ids, attn, mask)
            opt.zero_grad()
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(opt.params, max_grad_norm)
            opt.step()
            step_s.append(time.perf_counter() - t0)
            losses.append(float(loss.detach()))
            if fh:
                fh.write(json.dumps({"step": step + 1, "loss": losses[-1], "grad_norm": float(gnorm),
                                     "seconds": step_s[-1], "tokens": int(attn.sum())}) + "\n")
                fh.flush()
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    finally:
        bar.close()
        if fh:
            fh.close()
        model.eval()
    return {"steps": steps, "batch_size": batch_size, "lr": lr, "adapters": list(names), "loss_first": losses[0],
            "loss_last": losses[-1], "losses": losses, "train_seconds": sum(step_s),
            "step_seconds_median": sorted(step_s)[len(step_s) // 2]}


@torch.no_grad()
def merge_lora(model, adapter: str):
    """Fold one adapter into the backbone, W' = W + s B A (:meth:`RoutedLoRALinear.delta_weight`), and unpatch the
    model (plain ``nn.Linear`` modules again). Returns the model."""
    import routed_lora as rl
    from routed_lora.hf import routed_layers

    for _, layer in routed_layers(model):
        layer.weight.add_(layer.delta_weight(adapter).to(layer.weight.dtype))
    return rl.remove_routed_lora(model)


def prompt_template_of(folder: str | Path) -> str | None:
    """The prompt template a warm-started folder expects (written by :func:`merged_warm_start` or the pretrained
    demo), or None for a folder without one (the tiny model: the plain prompt)."""
    f = Path(folder) / PROMPT_FILE
    return json.loads(f.read_text())["prompt_template"] if f.is_file() else None


def write_prompt_template(folder: str | Path, template: str, *, model: str) -> None:
    (Path(folder) / PROMPT_FILE).write_text(json.dumps({"prompt_template": template, "model": model}, indent=1))


def merged_warm_start(model: str | Path, world_dir: str | Path, out: str | Path, *, steps: int, r: int = 8,
                      lora_alpha: float = 16.0, batch_size: int = 8, lr: float = 1e-3, two_hop_frac: float = 0.03,
                      eval_n: int = 16, max_turns: int = 4, max_new_tokens: int = 48, seed: int = 0,
                      progress: bool = True) -> dict:
    """The study's warm start from a pretrained ``model`` (a folder or a registered name): a joint LoRA adapter of
    rank 2r (the study's joint layout, alpha 2 * lora_alpha) trained by :func:`lora_sft` on the chat-template
    trajectories, merged into the weights, saved to ``out`` with the prompt template and ``sft_summary.json``
    (``steps``, ``two_hop_frac``, held-out greedy ``eval``, as ``routed-lora sft`` writes). Returns the summary."""
    import routed_lora as rl
    from routed_lora.grpo.evaluate import evaluate_em
    from routed_lora.grpo.policy import load_model_and_tokenizer

    from .data import load_qa
    from .retriever import BM25Retriever
    from .tokenizer import save_model
    from .trajectories import build_trajectories

    world_dir, out = Path(world_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    net, tok = load_model_and_tokenizer(model)
    template = pretrained_template(tok)
    retriever = BM25Retriever(world_dir / "corpus.jsonl")
    rows = sft_rows(load_qa(world_dir / "train.jsonl"), steps * batch_size, two_hop_frac=two_hop_frac, seed=seed)
    trajs = build_trajectories(tok, rows, retriever, prompt_template=template)
    router = rl.TagRouter(tok, spans={"joint": ("<search>", "</search>")}, default="joint")
    rl.apply_routed_lora(net, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj"], r=2 * r, lora_alpha=2 * lora_alpha,
                         adapters=("joint",), router=router)
    train = lora_sft(net, tok, trajs, steps=steps, batch_size=batch_size, lr=lr, seed=seed, progress=progress,
                     desc="warm start (LoRA, merged)", metrics_path=out / "sft_metrics.jsonl")
    merge_lora(net, "joint")
    from routed_lora.demo import balanced_rows

    eval_rows = balanced_rows(load_qa(world_dir / "test.jsonl"), eval_n, seed=seed)
    t0 = time.perf_counter()
    ev = evaluate_em(net, tok, eval_rows, retriever, samples=0, greedy=True, max_turns=max_turns,
                     max_new_tokens=max_new_tokens, prompt_template=template)
    save_model(net, tok, out)
    write_prompt_template(out, template, model=str(model))
    summary = {"steps": steps, "two_hop_frac": two_hop_frac, "lora": {"r": 2 * r, "lora_alpha": 2 * lora_alpha,
               "merged": True}, "batch_size": batch_size, "lr": lr, "train_seconds": train["train_seconds"],
               "loss_first": train["loss_first"], "loss_last": train["loss_last"], "model": str(model),
               "eval": {"em": ev.get("em_greedy/all"), "em_1hop": ev.get("em_greedy/1hop"),
                        "em_2hop": ev.get("em_greedy/2hop"), "n": len(eval_rows),
                        "eval_seconds": time.perf_counter() - t0}}
    (out / "sft_summary.json").write_text(json.dumps(summary, indent=1))
    return summary
