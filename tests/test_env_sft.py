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
