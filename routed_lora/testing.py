"""Small builders for tests and demos: a word-level tokenizer built locally and tiny causal LMs from configs.

Nothing here downloads anything. Needs the ``hf`` extra (transformers, tokenizers)::

    tok = tiny_tokenizer()                       # the Search-R1 tags are single special tokens
    model = tiny_model("qwen2", vocab_size=len(tok))
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["DEFAULT_WORDS", "DEFAULT_SPECIAL", "FAMILIES", "tiny_tokenizer", "tiny_model", "tiny_config"]

DEFAULT_SPECIAL = (
    "<think>",
    "</think>",
    "<search>",
    "</search>",
    "<information>",
    "</information>",
    "<answer>",
    "</answer>",
)

# Includes the pieces "<", "</", ">", "search", "answer" so tags can also be spelled as several ordinary tokens
# (a tokenizer built with ``special=()`` splits "<search>" into "<", "search", ">" and "</search>" into "</",
# "search", ">": the Whitespace pre-tokenizer keeps runs of punctuation together).
DEFAULT_WORDS = (
    "<", "</", ">", "search", "answer", "think", "information",
    "the", "a", "of", "is", "in", "who", "what", "where", "when", "was", "born", "capital", "city",
    "country", "river", "paris", "france", "berlin", "germany", "rome", "italy", "alice", "bob",
    "married", "to", "director", "company", "founded", "by", "?", ".", ",", "yes", "no",
)

FAMILIES = ("qwen2", "llama", "qwen3", "mistral")


def tiny_tokenizer(
    words: Sequence[str] = DEFAULT_WORDS,
    special: Sequence[str] = DEFAULT_SPECIAL,
    *,
    pad_token: str = "<pad>",
    unk_token: str = "<unk>",
    eos_token: str = "<eos>",
):
    """A word-level ``PreTrainedTokenizerFast`` over ``words`` with ``special`` as single special tokens.

    Ids: pad 0, unk 1, eos 2, then ``special`` in order, then ``words`` in order (duplicates dropped). Text is
    split on whitespace and punctuation, so a tag missing from ``special`` becomes several ordinary tokens
    (``"<search>"`` -> ``"<" "search" ">"``). Decoding joins tokens with spaces.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    base = [pad_token, unk_token, eos_token]
    vocab: dict[str, int] = {}
    for w in [*base, *special, *words]:
        if not isinstance(w, str) or not w:
            raise ValueError(f"tiny_tokenizer: tokens must be non-empty strings, got {w!r}")
        if any(c.isspace() for c in w):
            raise ValueError(f"tiny_tokenizer: tokens must not contain whitespace, got {w!r}")
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk_token))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins with spaces
    tok.add_special_tokens([pad_token, unk_token, eos_token, *special])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=pad_token, unk_token=unk_token, eos_token=eos_token
    )
    if special:
        fast.add_special_tokens({"additional_special_tokens": list(special)})
    return fast


def tiny_config(family: str = "qwen2", *, vocab_size: int = 64, hidden: int = 32, layers: int = 2, **overrides):
    """A transformers config for a tiny model of ``family`` (one of :data:`FAMILIES`)."""
    import transformers

    classes = {
        "qwen2": "Qwen2Config",
        "llama": "LlamaConfig",
        "qwen3": "Qwen3Config",
        "mistral": "MistralConfig",
    }
    if family not in classes:
        raise ValueError(f"family: expected one of {FAMILIES}, got {family!r}")
    heads = 4 if hidden % 4 == 0 else 1
    kw = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=2 if heads % 2 == 0 else 1,
        head_dim=hidden // heads,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=2,
        use_cache=True,
    )
    kw.update(overrides)
    return getattr(transformers, classes[family])(**kw)


def tiny_model(
    family: str = "qwen2",
    vocab_size: int = 64,
    hidden: int = 32,
    layers: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **overrides,
):
    """A randomly initialised causal LM of ``family`` built from a config (no download), in eval mode.

    The same arguments (``seed`` included) give the same weights. ``overrides`` go to the config.
    """
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, vocab_size=vocab_size, hidden=hidden, layers=layers, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()
