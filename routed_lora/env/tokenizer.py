"""A word-level tokenizer with the tool tags as single tokens, and a tiny Qwen2 model built from a config.

The tokenizer lowercases, splits on whitespace and punctuation (``\\w+|[^\\w\\s]+``), and maps each word to one
id; the eight tags ``<think> </think> <search> </search> <information> </information> <answer> </answer>`` are
single, non-special tokens (so they survive ``decode(skip_special_tokens=True)``). ``<pad>`` (id 0), ``</s>``
(eos, id 1) and ``<unk>`` (id 2) are special; pad and eos are distinct. Both are saved as ordinary Hugging Face
folders, so ``--model`` can point at them. Load the tokenizer with :func:`load_tokenizer` (or
``PreTrainedTokenizerFast.from_pretrained``), not ``AutoTokenizer``: with transformers 5, ``AutoTokenizer`` on
a folder whose model type is ``qwen2`` builds ``Qwen2Tokenizer`` (byte-level BPE) and mangles the words.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from . import TAGS

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
_WORD_RE = re.compile(r"\w+|[^\w\s]+")
_TAG_RE = re.compile("(" + "|".join(re.escape(t) for t in TAGS) + ")")


def words_of(texts: Iterable[str]) -> list[str]:
    """The distinct lowercase words of ``texts`` (tags removed), in first-seen order."""
    seen: dict[str, None] = {}
    for t in texts:
        for part in _TAG_RE.split(t.lower()):
            if part in TAGS:
                continue
            for w in _WORD_RE.findall(part):
                seen.setdefault(w, None)
    return list(seen)


def build_tokenizer(texts: Iterable[str], out_dir: str | Path | None = None, *, model_max_length: int = 1024):
    """Build a word-level ``PreTrainedTokenizerFast`` whose vocabulary is every word of ``texts`` plus the digits
    0-9; save it to ``out_dir`` when given. Words not seen become ``<unk>``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {PAD: 0, EOS: 1, UNK: 2}
    for w in [str(d) for d in range(10)] + words_of(texts):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # join words with single spaces
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (PAD, EOS, UNK)])
    tok.add_tokens([AddedToken(t, special=False, normalized=False, single_word=False) for t in TAGS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="left",
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast


def load_tokenizer(path: str | Path):
    """Load a tokenizer folder. A word-level ``tokenizer.json`` (ours) is loaded as ``PreTrainedTokenizerFast``:
    transformers 5's ``AutoTokenizer`` builds the model family's class (``Qwen2Tokenizer``, byte-level BPE) for a
    folder whose ``config.json`` says ``qwen2``, whatever ``tokenizer_config.json`` says, and then encodes our
    words as characters without an error. Other folders go through ``AutoTokenizer``."""
    import json

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(path)
    tj = path / "tokenizer.json"
    if tj.exists():
        try:
            kind = json.loads(tj.read_text()).get("model", {}).get("type")
        except (OSError, ValueError):
            kind = None
        if kind == "WordLevel":
            return PreTrainedTokenizerFast.from_pretrained(str(path))
    return AutoTokenizer.from_pretrained(str(path))


def tag_ids(tokenizer) -> dict[str, int]:
    """The id of each tag; raises if a tag is not a single token for this tokenizer."""
    out = {}
    for t in TAGS:
        ids = tokenizer.encode(t, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"tag {t} is {len(ids)} tokens for this tokenizer, expected 1")
        out[t] = ids[0]
    return out


def build_tiny_model(
    tokenizer,
    *,
    hidden: int = 128,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 512,
    max_positions: int = 1024,
    seed: int = 0,
    out_dir: str | Path | None = None,
):
    """A randomly initialised ``Qwen2ForCausalLM`` sized for ``tokenizer`` (tied embeddings, fp32); saved with
    the tokenizer to ``out_dir`` when given. Defaults: hidden 128, 2 layers, about 0.5M parameters."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        use_cache=True,
        use_sliding_window=False,
        rope_theta=10000.0,
        attention_dropout=0.0,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = None
    if out_dir is not None:
        save_model(model, tokenizer, out_dir)
    return model


def save_model(model, tokenizer, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


def load_model(path: str | Path, *, dtype=None):
    """Load a causal LM and its tokenizer from a local folder (no network), or a registered pretrained model by
    name (``smollm2-135m``: :mod:`routed_lora.pretrained`)."""
    from ..pretrained import resolve_model

    path = Path(resolve_model(path))
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: not a model folder (no config.json); build one with `routed-lora world "
                                f"build --out DIR` or `routed-lora sft`")
    tok = load_tokenizer(path)
    return load_causal_lm(path, dtype=dtype), tok


def load_causal_lm(path: str | Path, *, dtype=None):
    """The causal LM of a local model folder (float32 unless ``dtype``), without hub kernels: every loader of
    the package (this module's :func:`load_model`, ``grpo.trainer.load_model_and_tokenizer``) goes through it."""
    import torch
    from transformers import AutoModelForCausalLM

    # use_kernels=False: our models need no hub kernels, and transformers >= 5.25 kernelizes by default
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or torch.float32, use_kernels=False)
