"""Prompts through a model's chat template, as ordinary ``{question}`` templates.

Search-R1's rows carry the prompt as chat messages (``[{"role": "user", "content": ...}]``) and an instruction
model expects them rendered by its chat template. Every prompt consumer of this package (the GRPO trainer, the
evaluations, the SFT trajectories) fills a ``str.format`` template with ``{question}`` and encodes the text with
``tokenizer(text)``. :func:`chat_prompt_template` renders the chat template once around the user prompt with a
placeholder and turns the result into such a template, so all of them go through the chat template unchanged:
``tokenizer(template.format(question=q))`` gives the ids ``apply_chat_template`` gives (checked at build time).

On the command line: ``--prompt chat`` (Search-R1's instruction prompt as the user message), ``chat:search-r1``,
``chat:tiny`` (the built-in world's short prompt) or ``chat:TEMPLATE`` (any template with ``{question}``).
"""

from __future__ import annotations

__all__ = ["chat_prompt_template", "resolve_prompt", "CHAT_PROMPTS"]

_SENTINEL = "\x00QUESTION\x00"
CHAT_PROMPTS = ("chat", "chat:search-r1", "chat:tiny")


def _base_templates() -> dict[str, str]:
    from .env.data import SEARCH_R1_PROMPT, TINY_PROMPT

    return {"search-r1": SEARCH_R1_PROMPT, "tiny": TINY_PROMPT}


def chat_prompt_template(tokenizer, template: str | None = None, *, system: str | None = None,
                         check: bool = True) -> str:
    """A ``{question}`` template whose filled text is ``template`` (default: Search-R1's instruction prompt) as the
    user message of ``tokenizer``'s chat template, with the generation prompt (the assistant turn opened).

    ``system``: a system message (default: none given, so the template's own default applies; SmolLM2 adds
    "You are a helpful AI assistant named SmolLM, ..."). Literal braces of the rendered text are escaped.
    ``check``: verify on a sample question that the filled template tokenises to the ids of
    ``apply_chat_template`` (a tokenizer that adds a BOS of its own, or merges across the template's borders,
    would fail: then pass token ids instead)."""
    from .argtypes import check_template

    if template is None:
        template = _base_templates()["search-r1"]
    check_template(template)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{type(tokenizer).__name__} has no chat template")
    user = template.format(question=_SENTINEL)
    msgs = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": user}]
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    if text.count(_SENTINEL) != 1:
        raise ValueError("the chat template did not keep the question placeholder exactly once")
    out = text.replace("{", "{{").replace("}", "}}").replace(_SENTINEL, "{question}")
    if check:
        q = "Who founded {Acme} & co.?"
        want = tokenizer.apply_chat_template(
            msgs[:-1] + [{"role": "user", "content": template.format(question=q)}], tokenize=True,
            add_generation_prompt=True, return_dict=True)["input_ids"]
        got = tokenizer(out.format(question=q))["input_ids"]
        if list(got) != list(want):
            raise ValueError("the rendered chat prompt does not tokenise as apply_chat_template does "
                             f"({len(got)} vs {len(want)} ids); give the prompts as token ids instead")
    return out


def resolve_prompt(spec: str, model) -> str:
    """The template for ``--prompt spec`` when it starts with ``chat`` (``chat``, ``chat:search-r1``, ``chat:tiny``,
    ``chat:TEMPLATE``), rendered with the tokenizer of ``model`` (a folder or a registered name)."""
    from .env.tokenizer import load_tokenizer
    from .pretrained import resolve_model

    if spec != "chat" and not spec.startswith("chat:"):
        raise ValueError(f"not a chat prompt: {spec!r}")
    inner = spec[5:] if spec.startswith("chat:") else "search-r1"
    template = _base_templates().get(inner, inner)
    return chat_prompt_template(load_tokenizer(resolve_model(model)), template)
