"""End to end: one training step (forward, backward, optimizer) of a small Hugging Face model, routed-lora against
the same model with PEFT's two adapters combined by per-token masks.

The model is a Qwen2 built from a config (random weights, nothing downloaded), or, with ``E2EConfig(model=...)``
(``routed-lora bench e2e --model smollm2-135m``), a real model's architecture and shapes: its weights, or random
weights of the same config (``random_weights=True``; the same cost, for a machine without the model file). Both variants target the same
modules (q, k, v, o, gate, up, down), hold the same adapter weights and see the same routes; the PEFT variant has
both adapters active and each ``lora.Linear`` adds ``mask_e * lora_B_e(lora_A_e(x)) * scaling_e`` per adapter
(:func:`routed_lora.bench.providers.peft_masked_forward`). Records: tokens per second (median and p20/p80 over
interleaved steps), extra peak memory of a step, bytes saved for backward by the forward (parameters excluded).
"""

from __future__ import annotations

import copy
import types

import torch
from torch import nn

from .memory import extra_peak_bytes, saved_for_backward
from .providers import ADAPTER_NAMES, make_routes, peft_lora_linear, peft_masked_forward
from .timing import Timed, paired_ratio, time_interleaved

__all__ = ["E2EConfig", "make_base_model", "routed_model", "peft_model", "run_e2e", "e2e_config", "e2e_steps",
           "TARGETS"]

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class E2EConfig:
    def __init__(self, *, hidden=256, intermediate=704, layers=4, heads=4, kv_heads=2, vocab=2048, batch=4,
                 seq=256, r=16, lora_alpha=32, tool_frac=0.3, dtype="float32", seed=0, model=None,
                 random_weights=False):
        self.__dict__.update(locals())
        del self.__dict__["self"]
        if model is not None:  # shapes come from the model: record them instead of the Qwen2 defaults
            from routed_lora.pretrained import model_config

            mc = model_config(model)
            self.vocab, self.hidden, self.layers = mc.vocab_size, mc.hidden_size, mc.num_hidden_layers
            self.intermediate = getattr(mc, "intermediate_size", None)
            self.heads = mc.num_attention_heads
            self.kv_heads = getattr(mc, "num_key_value_heads", mc.num_attention_heads)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def make_base_model(cfg: E2EConfig, device="cpu"):
    import transformers

    if cfg.model is not None:
        from routed_lora.pretrained import random_model, resolve_model

        if cfg.random_weights:
            model = random_model(cfg.model, seed=cfg.seed)
        else:
            from routed_lora.env.tokenizer import load_causal_lm

            model = load_causal_lm(resolve_model(cfg.model))
        model.config.use_cache = False
        return model.to(device=device, dtype=getattr(torch, cfg.dtype)).train()

    conf = transformers.Qwen2Config(
        vocab_size=cfg.vocab,
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.hidden // cfg.heads,
        max_position_embeddings=max(512, cfg.seq),
        tie_word_embeddings=False,
        attention_dropout=0.0,
        use_cache=False,
    )
    torch.manual_seed(cfg.seed)
    model = transformers.Qwen2ForCausalLM(conf)
    return model.to(device=device, dtype=getattr(torch, cfg.dtype)).train()


def _swap_linears(model: nn.Module, r, lora_alpha, adapters):
    """Fallback when :func:`routed_lora.apply_routed_lora` is not available: swap targeted nn.Linear modules."""
    import routed_lora as rl

    model.requires_grad_(False)

    def walk(module):
        for name, child in module.named_children():
            if type(child) is nn.Linear and name in TARGETS:
                setattr(module, name, rl.RoutedLoRALinear.from_linear(child, r=r, lora_alpha=lora_alpha,
                                                                      adapters=adapters))
            else:
                walk(child)

    walk(model)
    return model


def routed_model(base: nn.Module, cfg: E2EConfig):
    """A copy of ``base`` with routed-lora layers on the target modules (``apply_routed_lora`` when present)."""
    model = copy.deepcopy(base)
    try:
        from routed_lora.hf import apply_routed_lora
    except ImportError:
        apply_routed_lora = None
    if apply_routed_lora is not None:
        apply_routed_lora(model, target_modules=list(TARGETS), r=cfg.r, lora_alpha=cfg.lora_alpha,
                          adapters=ADAPTER_NAMES)
    else:
        _swap_linears(model, cfg.r, cfg.lora_alpha, ADAPTER_NAMES)
    gen = torch.Generator().manual_seed(cfg.seed + 3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _routed_cls()):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * 0.01)
    return model


def _routed_cls():
    import routed_lora as rl

    return rl.RoutedLoRALinear


def peft_model(base: nn.Module, routed: nn.Module, cfg: E2EConfig):
    """A copy of ``base`` with PEFT LoRA layers (two adapters, both trainable) on the same modules, holding the
    adapter weights of ``routed``; per-token masks are set with ``model._bench_masks``."""
    model = copy.deepcopy(base)
    model.requires_grad_(False)
    holder = {}
    routed_mods = dict(routed.named_modules())

    def walk(module, prefix):
        for name, child in module.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if type(child) is nn.Linear and name in TARGETS:
                layer = peft_lora_linear(child, cfg.r, cfg.lora_alpha, ADAPTER_NAMES)
                layer.to(device=child.weight.device, dtype=child.weight.dtype)
                src = routed_mods[full]
                with torch.no_grad():
                    for e, a in enumerate(ADAPTER_NAMES):
                        layer.lora_A[a].weight.copy_(src.lora_A[e])
                        layer.lora_B[a].weight.copy_(src.lora_B[e])

                def fwd(self, x, *args, **kwargs):
                    return peft_masked_forward(self, x, holder["masks"])

                layer.forward = types.MethodType(fwd, layer)
                setattr(module, name, layer)
            else:
                walk(child, full)

    walk(model, "")
    model._bench_masks = holder
    return model


def _set_peft_masks(model, routes, dtype):
    model._bench_masks["masks"] = {a: (routes == e).to(dtype).unsqueeze(-1) for e, a in enumerate(ADAPTER_NAMES)}


def e2e_config(device: str = "cpu", quick: bool = False) -> E2EConfig:
    """The model of the end-to-end step: a small Qwen2 on CPU, a ~1B-class one on a GPU (the quick GPU set keeps
    the CPU-sized default in bf16)."""
    dev = torch.device(device)
    cfg = E2EConfig(dtype="float32" if dev.type == "cpu" else "bfloat16")
    if quick and dev.type == "cpu":
        cfg = E2EConfig(hidden=128, intermediate=352, layers=2, vocab=1024, batch=2, seq=256)
    elif dev.type == "cuda" and not quick:
        cfg = E2EConfig(hidden=1024, intermediate=2816, layers=8, heads=16, kv_heads=4, vocab=8192, batch=8,
                        seq=1024, dtype="bfloat16")
    return cfg


def e2e_steps(device: str = "cpu", quick: bool = False, cfg: E2EConfig | None = None) -> dict:
    """Both variants built on the same base model, adapters, ids and routes: returns ``{"steps": {name: step()},
    "models": {name: model}, "ids": ids, "cfg": cfg}``; ``step()`` is one forward + backward + AdamW step and
    returns the (detached) loss. Shared by :func:`run_e2e` and the pytest-benchmark suite."""
    import routed_lora as rl

    dev = torch.device(device)
    cfg = cfg or e2e_config(device, quick)
    base = make_base_model(cfg, device)
    routed = routed_model(base, cfg)
    peft = peft_model(base, routed, cfg)
    gen = torch.Generator().manual_seed(cfg.seed + 5)
    ids = torch.randint(3, cfg.vocab, (cfg.batch, cfg.seq), generator=gen).to(dev)
    routes = make_routes(cfg.batch * cfg.seq, cfg.tool_frac, seed=cfg.seed).reshape(cfg.batch, cfg.seq).to(dev)
    dtype = getattr(torch, cfg.dtype)
    rl.set_routes(routed, routes)
    _set_peft_masks(peft, routes, dtype)
    models = {"routed_lora": routed, "peft": peft}
    opts = {
        n: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5) for n, m in models.items()
    }

    def make_step(name):
        model, opt = models[name], opts[name]

        def step():
            out = model(input_ids=ids, labels=ids)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return out.loss.detach()

        return step

    return {"steps": {n: make_step(n) for n in models}, "models": models, "ids": ids, "cfg": cfg}


def run_e2e(device: str = "cpu", quick: bool = False, cfg: E2EConfig | None = None, *, budget_s: float | None = None,
            min_repeats: int | None = None) -> list[dict]:
    """Time training steps of both variants (interleaved) and measure their memory; returns records."""
    dev = torch.device(device)
    built = e2e_steps(device, quick, cfg)
    cfg, models, ids, steps = built["cfg"], built["models"], built["ids"], built["steps"]

    def step(name):
        return steps[name]()

    # one step each first: creates optimizer state (kept out of the peak) and checks both models agree
    losses = {n: float(step(n)) for n in models}
    stats, rounds = time_interleaved(
        [Timed(n, run=lambda _, n=n: step(n)) for n in models],
        device=dev,
        warmup=1,
        min_repeats=min_repeats or (5 if quick else 10),
        budget_s=budget_s or (3.0 if quick else 20.0),
        flush=False,
    )
    rows = []
    tokens = cfg.batch * cfg.seq
    for n, model in models.items():
        saved = saved_for_backward(lambda: model(input_ids=ids, labels=ids).loss, exclude_parameters_of=model)[1]
        peak = extra_peak_bytes(lambda: step(n), dev)
        st = stats[n]
        ratio = paired_ratio(rounds, n, "peft")
        rows.append(
            {
                "kind": "e2e",
                "provider": n,
                "model": "qwen2-from-config" if cfg.model is None else
                f"{cfg.model}{'-config-random' if cfg.random_weights else ''}",
                **{f"e2e_{k}": v for k, v in cfg.as_dict().items()},
                "M": tokens,
                "r": cfg.r,
                "dtype": cfg.dtype,
                "device": dev.type,
                "tool_frac": cfg.tool_frac,
                "params_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                **st.as_dict(),
                "tokens_per_s": tokens / st.median,
                "tokens_per_s_p20": tokens / st.p80,
                "tokens_per_s_p80": tokens / st.p20,
                "time_ratio_to_peft": ratio.median,
                "first_loss": losses[n],
                "extra_peak_bytes": peak,
                "saved_bytes": saved.bytes,
            }
        )
    return rows
