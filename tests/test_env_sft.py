import argparse
import json

import torch

from routed_lora.env.cli import build_default_world, register
from routed_lora.env.sft import run_sft
from routed_lora.env.tokenizer import load_model


def test_sft_smoke(tmp_path):
    torch.set_num_threads(1)
    info = build_default_world(tmp_path / "world", people=40, hidden=32, layers=1, intermediate=64)
    assert info["test_questions"] > 0 and info["parameters"] < 100_000
    summary = run_sft(tmp_path / "world", tmp_path / "sft", steps=6, batch_size=8, eval_n=8, eval_batch_size=8,
                      max_turns=2, threads=1, progress=False)
    assert summary["steps"] == 6 and summary["steps_per_s"] > 0
    assert {"em", "em_1hop", "em_2hop", "tool_calls"} <= set(summary["eval"])
    rows = [json.loads(line) for line in open(tmp_path / "sft" / "sft_metrics.jsonl")]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 7))
    assert rows[-1]["step"] == 6 and "eval_em" in rows[-1]
    assert rows[-1 - 1]["loss"] < rows[0]["loss"]  # learns something in 6 steps at lr 3e-3
    model, tok = load_model(tmp_path / "sft")  # an ordinary HF folder
    assert tok.pad_token_id != tok.eos_token_id
    assert json.loads((tmp_path / "sft" / "sft_summary.json").read_text())["steps"] == 6
    assert summary["eval_sampled_t1"]["n"] == summary["eval"]["n"]


def test_model_folder_round_trips_the_word_level_tokenizer(tmp_path):
    """transformers 5's AutoTokenizer would build Qwen2Tokenizer here and encode words as characters."""
    from routed_lora.env.tokenizer import build_tiny_model, build_tokenizer, load_tokenizer

    tok = build_tokenizer(["question : where was zalgros gakdru born ?", "doc 1 : a b ."])
    build_tiny_model(tok, hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64, out_dir=tmp_path / "m")
    text = "question : where was zalgros gakdru born ? <think> <search> zalgros born </search>"
    for loaded in (load_tokenizer(tmp_path / "m"), load_model(tmp_path / "m")[1]):
        ids = loaded.encode(text, add_special_tokens=False)
        assert ids == tok.encode(text, add_special_tokens=False)
        assert loaded.decode(ids) == text
        assert loaded.padding_side == "left" and loaded.pad_token_id == 0 and loaded.eos_token_id == 1


def test_cli_registers_subcommands(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["world", "build", "--out", str(tmp_path / "w"), "--people", "30", "--hidden", "32",
                              "--layers", "1"])
    assert args.func(args) == 0
    assert (tmp_path / "w" / "corpus.jsonl").exists() and (tmp_path / "w" / "model" / "config.json").exists()
    args = parser.parse_args(["sft", "--world-dir", str(tmp_path / "w"), "--out", str(tmp_path / "s"),
                              "--steps", "2", "--eval-n", "4", "--threads", "1", "--no-progress"])
    assert args.func(args) == 0
    assert "held-out greedy EM" in capsys.readouterr().out
    args = parser.parse_args(["retriever", "serve", "--corpus", "c.jsonl", "--port", "0"])
    assert args.port == 0 and args.topk == 3
