"""Prompts through a chat template as ``{question}`` templates (routed_lora.chat) and the ``--prompt chat`` flag."""

from __future__ import annotations

import pytest

from _smollm2 import smollm2_dir  # noqa: F401  (fixture)

pytest.importorskip("transformers")

from routed_lora.chat import chat_prompt_template, resolve_prompt  # noqa: E402
from routed_lora.env.data import SEARCH_R1_PROMPT, TINY_PROMPT, make_prompt  # noqa: E402
from routed_lora.testing import tiny_tokenizer  # noqa: E402

SIMPLE_CHAT = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
               "{% if add_generation_prompt %}[assistant] {% endif %}")


def test_a_template_with_braces_and_a_system_message():
    tok = tiny_tokenizer()
    tok.chat_template = SIMPLE_CHAT
    t = chat_prompt_template(tok, "q {question} {{braces}}", system="sys {x}")
    assert t == "[system] sys {{x}}\n[user] q {question} {{braces}}\n[assistant] "
    assert make_prompt("who?", t) == "[system] sys {x}\n[user] q who? {braces}\n[assistant] "


def test_no_chat_template_is_an_error():
    tok = tiny_tokenizer()
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        chat_prompt_template(tok)
    with pytest.raises(ValueError, match="not a chat prompt"):
        resolve_prompt("tiny", "x")


def test_cli_prompt_chat_on_a_model_without_chat_template(tmp_path, capsys):
    from routed_lora.cli import main
    from routed_lora.testing import tiny_world

    w = tiny_world(tmp_path / "w")
    rc = main(["train", "--model", str(w / "model"), "--data", str(w / "train.jsonl"), "--retriever",
               f"bm25:{w / 'corpus.jsonl'}", "--out", str(tmp_path / "o"), "--prompt", "chat:tiny"])
    err = capsys.readouterr().err
    assert rc == 2 and "--prompt:" in err and "no chat template" in err, err


@pytest.mark.smollm2
@pytest.mark.parametrize("spec,inner", [("chat", SEARCH_R1_PROMPT), ("chat:search-r1", SEARCH_R1_PROMPT),
                                        ("chat:tiny", TINY_PROMPT), ("chat:Q: {question} {{x}}", "Q: {question} {{x}}")])
def test_smollm2_chat_prompts_tokenise_as_apply_chat_template(smollm2_dir, spec, inner):
    from routed_lora.env.tokenizer import load_tokenizer

    tok = load_tokenizer(smollm2_dir)
    t = resolve_prompt(spec, smollm2_dir)
    for q in ("Where was Ada Ito born?", "a {b} c", "who founded acme ?"):
        msgs = [{"role": "user", "content": inner.format(question=q)}]
        want = tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True)["input_ids"]
        assert tok(make_prompt(q, t))["input_ids"] == list(want)
    assert t.startswith("<|im_start|>system\n") and t.endswith("<|im_end|>\n<|im_start|>assistant\n")
