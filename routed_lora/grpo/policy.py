"""The policy the GRPO loop trains: a causal LM and its tokenizer from a local folder, patched for a mode.

Must not train or sample: loading and patching only.
"""

from __future__ import annotations

import json
from pathlib import Path

from .config import GRPOConfig
from .logprobs import disable_dropout


def load_model_and_tokenizer(path: str | Path, *, dtype=None):
    """A causal LM and its tokenizer from a local folder (no network).

    transformers 5's ``AutoTokenizer`` builds the *model family's* tokenizer class (e.g. ``Qwen2Tokenizer``, a
    byte-level BPE pipeline) even for a folder whose ``tokenizer_config.json`` says ``TokenizersBackend`` or
    ``PreTrainedTokenizerFast`` (a word-level ``tokenizer.json``, as the built-in world writes): encoding and
    decoding then silently go wrong. Such folders are loaded with ``PreTrainedTokenizerFast`` instead."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from routed_lora.env.tokenizer import load_causal_lm
    from routed_lora.pretrained import resolve_model  # a registered name (smollm2-135m) -> its cached folder

    path = Path(resolve_model(path))
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: not a model folder (no config.json)")
    cls = None
    cfg_file = path / "tokenizer_config.json"
    if cfg_file.exists():
        cls = json.loads(cfg_file.read_text()).get("tokenizer_class")
    if cls in ("TokenizersBackend", "PreTrainedTokenizerFast") and (path / "tokenizer.json").exists():
        tok = PreTrainedTokenizerFast.from_pretrained(str(path))
    else:
        tok = AutoTokenizer.from_pretrained(str(path))
    return load_causal_lm(path, dtype=dtype), tok  # use_kernels=False there


def build_policy(model, tokenizer, cfg: GRPOConfig):
    """Patch ``model`` in place for ``cfg.mode`` and attach the router (so ``generate`` routes by itself).

    dart: adapters (reasoning, tool), rank r, the tag router (tool inside ``<search>`` ... ``</search>``);
    joint: one adapter ``joint`` of rank 2r and alpha 2 * lora_alpha (same scaling) on every
    token; base: the dart layout with its zero-initialised B (identical to the backbone), never trained.
    Returns ``(model, router)``."""
    import routed_lora as rl

    disable_dropout(model)
    if cfg.mode == "joint":
        router = rl.TagRouter(tokenizer, spans={"joint": ("<search>", "</search>")}, default="joint")
        rl.apply_routed_lora(model, target_modules=cfg.target_modules, r=2 * cfg.r, lora_alpha=2 * cfg.lora_alpha,
                             adapters=("joint",), router=router)
    else:
        router = rl.TagRouter(tokenizer, spans={"tool": ("<search>", "</search>")}, default="reasoning")
        rl.apply_routed_lora(model, target_modules=cfg.target_modules, r=cfg.r, lora_alpha=cfg.lora_alpha,
                             adapters=("reasoning", "tool"), router=router)
    return model, router
