"""Teacher-forced per-token log-probs for GRPO: the old, new and reference passes.

For a padded batch of token ids ``input_ids`` (B, L) (prompt, sampled completion and spliced ``<information>``
ids, left and/or right padded, ``attention_mask`` 1 on real tokens), position p predicts token p+1 and::

    logp[b, p] = log softmax(z[b, p] / T)[input_ids[b, p+1]]            p = 0 .. L-2
    entropy[b, p] = -sum_v q_v log q_v,   q = softmax(z[b, p] / T)

with T the sampling temperature, so the log-probs are those of the distribution the tokens were drawn from.
Every pass (rollout, old, new, reference) uses

- the same routes: ``routes_for`` computes them from the token ids with the router (DESIGN.md §2: position p's
  route depends on tokens 0..p only), or sets every real token to one adapter (``joint`` mode);
- the same position ids, counted over real tokens (``cumsum(attention_mask) - 1``), as HF ``generate`` does;
- no dropout (:func:`disable_dropout` is applied once by the trainer);
- the same micro-batch split (the trainer keeps it), so the first update's ratio is exactly 1, bit for bit.

The reference policy is the same model with adapters off (``routed_lora.disable_adapters``); the trainer skips
that pass when beta = 0.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

__all__ = ["disable_dropout", "routes_for", "position_ids_for", "token_logprobs", "reference_logprobs"]


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability in ``model`` to 0 (modules and the HF config's attention dropout), so that
    rollout, old, new and reference passes are the same function of the inputs."""
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.p = 0.0
        for attr in ("attention_dropout", "dropout", "lora_dropout"):
            v = getattr(m, attr, None)
            if isinstance(v, float) and v > 0:
                setattr(m, attr, 0.0)
    cfg = getattr(model, "config", None)
    if cfg is not None:
        for attr in ("attention_dropout", "hidden_dropout", "resid_pdrop", "attn_pdrop", "embd_pdrop"):
            if isinstance(getattr(cfg, attr, None), float):
                setattr(cfg, attr, 0.0)


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids counted over real tokens, as HF ``generate`` computes them for padded batches."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp_min(0)


def routes_for(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    router: Callable | None = None,
    joint_adapter: int | None = None,
    pad_route: int = -1,
) -> torch.Tensor:
    """Routes (B, L) for a padded batch: ``router(input_ids, attention_mask)`` (DART), or adapter
    ``joint_adapter`` on every real token (joint mode). Padding gets ``pad_route`` (it carries no loss)."""
    real = attention_mask.bool()
    if joint_adapter is not None:
        routes = torch.full_like(input_ids, int(joint_adapter))
    elif router is not None:
        routes = router(input_ids, attention_mask).to(input_ids.device).long()
    else:
        raise ValueError("routes_for: give a router (dart mode) or joint_adapter (joint mode)")
    return torch.where(real, routes, torch.full_like(routes, pad_route))


def _forward_logits(model, input_ids, attention_mask, routes):
    kw = {}
    if routes is not None:
        if "_routed_lora_state" in _unwrap(model).__dict__:
            kw["routes"] = routes  # the model's pre-hook takes them (and overrides its own router)
        else:
            import routed_lora as rl

            rl.set_routes(_unwrap(model), routes)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_for(attention_mask),
        use_cache=False,
        **kw,
    )
    return out.logits if hasattr(out, "logits") else out[0]


def _unwrap(model):
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def token_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    routes: torch.Tensor | None = None,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs (B, L-1) of ``input_ids[:, 1:]`` at ``temperature`` (module doc), and the
    per-position entropy (B, L-1, no gradient) when ``with_entropy``.

    ``routes`` (B, L) are set on the model before the forward (see :func:`routes_for`); None leaves routing to
    the model (a model patched with a router routes by itself). Gradients flow when grad mode is on.
    """
    if temperature <= 0:
        raise ValueError(f"temperature: expected > 0, got {temperature}")
    logits = _forward_logits(model, input_ids, attention_mask, routes)[:, :-1].float()
    if temperature != 1.0:
        logits = logits / temperature
    logz = torch.logsumexp(logits, dim=-1)
    target = input_ids[:, 1:].unsqueeze(-1)
    logp = logits.gather(-1, target).squeeze(-1) - logz
    entropy = None
    if with_entropy:
        with torch.no_grad():
            p = torch.softmax(logits, dim=-1)
            entropy = logz - (p * logits).sum(-1)
    return logp, entropy


@torch.no_grad()
def reference_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Log-probs under the reference policy: the backbone with every adapter off."""
    import routed_lora as rl

    base = _unwrap(model)
    ctx = rl.disable_adapters(base) if hasattr(rl, "disable_adapters") else contextlib.nullcontext()
    with ctx:
        # routes do not matter with adapters off; -1 everywhere is the backbone in any case
        logp, _ = token_logprobs(base, input_ids, attention_mask, routes=torch.full_like(input_ids, -1),
                                 temperature=temperature)
    return logp
