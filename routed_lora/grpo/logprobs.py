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

Memory: a real vocabulary (V = 151,936 for Qwen2) makes the logits the largest tensor of the pass: fp32 (B, L, V)
for 8 x 1,024 tokens is 4.98 GB, and the softmax of the entropy another. :func:`token_logprobs` never builds them:
during the model call the output layer (``get_output_embeddings()``, an ``nn.Linear``) is swapped for a head
that takes the final hidden states h (B, L, H) and computes, ``chunk_tokens`` positions at a time::

    z = (h_c W^T + b).float() / T        (chunk, V), the same ops as the unchunked path, so equal values
    logp_c = z[target] - logsumexp(z),   entropy_c = logsumexp(z) - sum softmax(z) * z

and its backward recomputes z per chunk: dlogp/dz = (onehot(target) - softmax(z)) / T, dh = dz W (dW = dz^T h
when the head is trainable). Extra memory is O(chunk_tokens * V) instead of O(B * L * V); see
``benchmarks/logprob_memory.py``. Models that rescale logits after the head (``final_logit_softcapping``,
``logit_scale``, ``logits_scaling``) and heads that are not a plain ``nn.Linear`` use the unchunked path.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

__all__ = ["disable_dropout", "routes_for", "position_ids_for", "token_logprobs", "reference_logprobs",
           "chunked_head_logprobs", "CHUNK_ELEMENTS"]

# Default chunk: this many fp32 logits (128 MiB) per chunk, i.e. chunk_tokens = CHUNK_ELEMENTS // V (220 tokens at
# V = 151,936); a tiny vocabulary gets one chunk.
CHUNK_ELEMENTS = 1 << 25
# Config attributes of models that transform the logits after the output layer (the chunked head would skip it).
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_logits_scaling")


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
    attention_mask: torch.Tensor | None,
    *,
    router: Callable | None = None,
    joint_adapter: int | None = None,
    pad_route: int = -1,
    position_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    packed: bool = False,
) -> torch.Tensor:
    """Routes (B, L) for a padded batch: ``router(input_ids, attention_mask)`` (DART), or adapter
    ``joint_adapter`` on every real token (joint mode). Padding gets ``pad_route`` (it carries no loss).

    Packed rows (several sequences per row): give ``position_ids`` or ``cu_seqlens`` and each sequence is
    routed on its own (:func:`routed_lora.router.route_packed`); ``packed=True`` without them is an error.
    ``attention_mask`` may be None (every position real)."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    real = attention_mask.bool()
    if joint_adapter is not None:
        routes = torch.full_like(input_ids, int(joint_adapter))
    elif router is not None:
        if packed or position_ids is not None or cu_seqlens is not None:
            from routed_lora.router import route_packed

            routes = route_packed(router, input_ids, attention_mask, position_ids=position_ids,
                                  cu_seqlens=cu_seqlens)
        else:
            routes = router(input_ids, attention_mask)
        routes = routes.to(input_ids.device).long()
    else:
        raise ValueError("routes_for: give a router (dart mode) or joint_adapter (joint mode)")
    return torch.where(real, routes, torch.full_like(routes, pad_route))


def _model_kwargs(model, input_ids, attention_mask, routes, position_ids=None):
    kw = {}
    if routes is not None:
        if "_routed_lora_state" in _unwrap(model).__dict__:
            kw["routes"] = routes  # the model's pre-hook takes them (and overrides its own router)
        else:
            import routed_lora as rl

            rl.set_routes(_unwrap(model), routes)
    return dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=_positions(attention_mask, position_ids),
        use_cache=False,
        **kw,
    )


def _positions(attention_mask, position_ids):
    if position_ids is not None:
        return position_ids
    if attention_mask is None:
        raise ValueError("attention_mask: None is only allowed with position_ids (packed rows)")
    return position_ids_for(attention_mask)


def _forward_logits(model, input_ids, attention_mask, routes, position_ids=None):
    out = model(**_model_kwargs(model, input_ids, attention_mask, routes, position_ids))
    return out.logits if hasattr(out, "logits") else out[0]


def _unwrap(model):
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def token_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    routes: torch.Tensor | None = None,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_tokens: int | None = None,
    position_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs (B, L-1) of ``input_ids[:, 1:]`` at ``temperature`` (module doc), and the
    per-position entropy (B, L-1, no gradient) when ``with_entropy``.

    ``routes`` (B, L) are set on the model before the forward (see :func:`routes_for`); None leaves routing to
    the model (a model patched with a router routes by itself). Gradients flow when grad mode is on.
    ``chunk_tokens``: positions per chunk of the output layer (module doc); None: ``CHUNK_ELEMENTS // V``;
    0: materialise the whole fp32 logits (the reference the chunked path is tested against).
    ``position_ids``: default ``cumsum(attention_mask) - 1``. Packed rows (several sequences per row, e.g.
    veRL's remove-padding) pass their own, restarting at 0 for each sequence, with ``attention_mask=None``:
    transformers then keeps attention inside each sequence (its packed-sequence mask). The log-prob at the last
    position of a sequence is that of the next sequence's first token (mask it out).
    """
    if temperature <= 0:
        raise ValueError(f"temperature: expected > 0, got {temperature}")
    if chunk_tokens is not None and (isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int)
                                     or chunk_tokens < 0):
        raise ValueError(f"chunk_tokens: expected None or an integer >= 0, got {chunk_tokens!r}")
    head = _chunkable_head(model) if chunk_tokens != 0 else None
    if head is None:
        logits = _forward_logits(model, input_ids, attention_mask, routes, position_ids)[:, :-1].float()
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
    if chunk_tokens is None:
        chunk_tokens = max(1, CHUNK_ELEMENTS // head.out_features)
    targets = input_ids[:, 1:]
    seen = {}

    def chunked_forward(h):
        # h: (B, L, H) final hidden states; returns (B, L-1, 2) = [logp, entropy] in place of the logits, so
        # the result is an output of the model call (FSDP2 unshards the head for the backward from there).
        if h.dim() != 3 or h.shape[:2] != input_ids.shape:
            raise RuntimeError(
                f"token_logprobs: the output layer got hidden states of shape {tuple(h.shape)}, expected "
                f"{(*input_ids.shape, head.in_features)}; pass chunk_tokens=0 for this model"
            )
        B, L, H = h.shape
        hs = h[:, :-1].reshape(-1, H)
        logp, ent = chunked_head_logprobs(hs, head.weight, head.bias, targets.reshape(-1),
                                          temperature=temperature, chunk_tokens=chunk_tokens,
                                          with_entropy=with_entropy)
        seen["called"] = True
        ent = ent if ent is not None else torch.zeros_like(logp).detach()
        # a new tensor, not a view (FSDP2 warns about views returned by a sharded module)
        return torch.stack([logp.view(B, L - 1), ent.view(B, L - 1)], dim=-1)

    had = "forward" in head.__dict__
    previous = head.__dict__.get("forward")
    head.forward = chunked_forward
    try:
        out = _forward_logits(model, input_ids, attention_mask, routes, position_ids)
    finally:
        if had:
            head.forward = previous
        else:
            del head.forward
    if not seen:
        raise RuntimeError("token_logprobs: the model did not call its output layer; pass chunk_tokens=0")
    logp = out[..., 0]
    entropy = out[..., 1].detach() if with_entropy else None
    return logp, entropy


def _chunkable_head(model: nn.Module) -> nn.Linear | None:
    """The model's output layer if the chunked head can stand in for it (module doc), else None."""
    from routed_lora.layer import RoutedLoRALinear

    base = _unwrap(model)
    get = getattr(base, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Linear) or isinstance(head, RoutedLoRALinear):
        return None
    cfg = getattr(base, "config", None)
    for attr in _LOGIT_TRANSFORMS:
        v = getattr(cfg, attr, None)
        if v is not None and v is not False and v != 1 and v != 1.0:
            return None
    return head


class _ChunkedLogProbs(torch.autograd.Function):
    """logp (N,) and entropy (N,) of ``targets`` under ``softmax((h W^T + b).float() / T)``, ``chunk`` rows at
    a time, recomputing each chunk's logits in the backward (module doc)."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, temperature, chunk, with_entropy):
        N = h.shape[0]
        logp = torch.empty(N, dtype=torch.float32, device=h.device)
        ent = torch.empty(N, dtype=torch.float32, device=h.device) if with_entropy else None
        for s in range(0, N, chunk):
            e = min(s + chunk, N)
            z = _chunk_logits(h[s:e], weight, bias, temperature)
            logz = torch.logsumexp(z, dim=-1)
            logp[s:e] = z.gather(-1, targets[s:e].unsqueeze(-1)).squeeze(-1) - logz
            if with_entropy:
                ent[s:e] = logz - (torch.softmax(z, dim=-1) * z).sum(-1)
            del z
        ctx.save_for_backward(h, weight, bias, targets)
        ctx.temperature, ctx.chunk = temperature, chunk
        if ent is not None:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, _grad_ent):
        h, weight, bias, targets = ctx.saved_tensors
        T, chunk = ctx.temperature, ctx.chunk
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        dh = torch.empty_like(h) if need_h else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        db = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        N = h.shape[0]
        if grad_logp is None:
            grad_logp = torch.zeros(N, dtype=torch.float32, device=h.device)
        for s in range(0, N, chunk):
            e = min(s + chunk, N)
            z = _chunk_logits(h[s:e], weight, bias, T)
            # d logp / d z = onehot(target) - softmax(z); then through "/ T" and ".float()" as autograd would
            gz = torch.softmax(z, dim=-1).neg_()
            del z
            gz.scatter_add_(-1, targets[s:e].unsqueeze(-1), torch.ones_like(gz[:, :1]))
            gz.mul_(grad_logp[s:e].unsqueeze(-1).to(gz.dtype))
            if T != 1.0:
                gz.div_(T)
            gz = gz.to(h.dtype)
            if need_h:
                dh[s:e] = gz @ weight
            if need_w:
                dw += (gz.t() @ h[s:e]).float()
            if need_b:
                db += gz.float().sum(0)
        return (dh, None if dw is None else dw.to(weight.dtype), None if db is None else db.to(bias.dtype),
                None, None, None, None)


def _chunk_logits(h, weight, bias, temperature):
    z = nn.functional.linear(h, weight, bias).float()
    return z / temperature if temperature != 1.0 else z


def chunked_head_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_tokens: int | None = None,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (N,) of ``targets`` (N,) and entropies (N,) under ``softmax((hidden W^T + b).float() / T)``
    for ``hidden`` (N, H), ``weight`` (V, H), computed ``chunk_tokens`` rows at a time (module doc);
    differentiable in ``hidden`` (and ``weight``/``bias`` when they require grad); entropy has no gradient."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden (N, H) and weight (V, H): got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if tuple(targets.shape) != (hidden.shape[0],):
        raise ValueError(f"targets: expected shape ({hidden.shape[0]},), got {tuple(targets.shape)}")
    if chunk_tokens is None:
        chunk_tokens = max(1, CHUNK_ELEMENTS // weight.shape[0])
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens: expected >= 1, got {chunk_tokens}")
    return _ChunkedLogProbs.apply(hidden, weight, bias, targets.long(), float(temperature), int(chunk_tokens),
                                  bool(with_entropy))


@torch.no_grad()
def reference_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    temperature: float = 1.0,
    chunk_tokens: int | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Log-probs under the reference policy: the backbone with every adapter off (chunked like
    :func:`token_logprobs`)."""
    import routed_lora as rl

    base = _unwrap(model)
    ctx = rl.disable_adapters(base) if hasattr(rl, "disable_adapters") else contextlib.nullcontext()
    with ctx:
        # routes do not matter with adapters off; -1 everywhere is the backbone in any case
        logp, _ = token_logprobs(base, input_ids, attention_mask, routes=torch.full_like(input_ids, -1),
                                 temperature=temperature, chunk_tokens=chunk_tokens, position_ids=position_ids)
    return logp
