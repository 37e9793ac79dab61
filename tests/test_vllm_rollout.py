"""The vLLM rollout engine (routed_lora/grpo/vllm_rollout.py) and ``routed-lora train --rollout vllm``: the same
records as the HF engine (tokens, routes, info mask, rollout log-probs), tool calls that stop at ``</search>`` and
resume after the spliced ``<information>`` ids, rollout log-probs equal to the trainer's teacher-forced ones within
1e-5, and a GRPO step whose first update's ratio is exactly 1.

Needs vLLM (`make test-vllm`); skipped elsewhere."""

from __future__ import annotations

import json

import pytest
import torch

vllm = pytest.importorskip("vllm")
pytestmark = [pytest.mark.vllm, pytest.mark.slow]

from _vllm_util import randomize_adapters, set_cpu_env, shutdown  # noqa: E402

TOL = 1e-5


def _world(root):
    """The built-in tiny world with a model vLLM's CPU attention accepts (head size 32), whose tied embedding
    rows of ``<search>``, ``</search>`` and ``</answer>`` are pushed towards the mean hidden state, so that an
    untrained model calls the tool often."""
    from routed_lora.env.tokenizer import build_tiny_model, build_tokenizer, save_model
    from routed_lora.env.trajectories import vocab_texts
    from routed_lora.env.world import build_world, write_world

    world = build_world(seed=0, n_first=6, n_last=6, n_people=30, n_countries=3, n_cities=6, n_companies=5)
    write_world(world, root)
    tok = build_tokenizer(vocab_texts(world))
    model = build_tiny_model(tok, hidden=64, layers=2, heads=2, kv_heads=1, intermediate=128, seed=0)
    with torch.no_grad():
        ids = torch.tensor([tok("who was born in the city ? <think> the answer")["input_ids"]])
        h = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0].mean(0)
        emb = model.get_input_embeddings().weight
        for t, c in (("<search>", 4.0), ("</search>", 4.0), ("</answer>", 2.0)):
            emb[tok.convert_tokens_to_ids(t)] = h * (c / h.dot(h))
    save_model(model, tok, root / "model")
    return tok


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_world")
    set_cpu_env()
    tok = _world(root)
    return root, tok


def test_records_match_teacher_forced(world):
    from routed_lora.env.data import TINY_PROMPT, load_qa
    from routed_lora.env.retriever import BM25Retriever
    from routed_lora.grpo.config import GRPOConfig
    from routed_lora.grpo.logprobs import token_logprobs
    from routed_lora.grpo.policy import build_policy, load_model_and_tokenizer
    from routed_lora.grpo.vllm_rollout import VLLMRollout, build_llm

    root, _ = world
    cfg = GRPOConfig(mode="dart", group_size=4, prompts_per_step=4, max_turns=2, max_new_tokens=24,
                     max_total_tokens=160, temperature=0.7).check()
    model, tok = load_model_and_tokenizer(root / "model")
    model, router = build_policy(model, tok, cfg)
    randomize_adapters(model, seed=3, scale=0.1)
    rows = load_qa(root / "train.jsonl", limit=4)
    retriever = BM25Retriever(str(root / "corpus.jsonl"))
    llm = build_llm(root / "model", model, max_model_len=512, max_num_seqs=8, max_num_batched_tokens=64,
                    block_size=32, seed=0)
    try:
        eng = VLLMRollout(cfg, model, tok, router, retriever, llm=llm, prompt_template=TINY_PROMPT,
                          pad_id=tok.pad_token_id)
        batch, routes, info = eng.collect(rows)
        assert batch.rollout_logprobs is not None and len(batch) == 16
        assert info["decode_tokens"] > 0
        calls = int(batch.tool_calls.sum())
        assert calls >= 4, f"too few tool calls ({calls}) to test the resume after </search>"
        # info tokens are out of the loss; the ones after a search are <information> ... </information>
        info_id = tok.convert_tokens_to_ids("<information>")
        close_id = tok.convert_tokens_to_ids("</search>")
        for b in range(len(batch)):
            ids = batch.input_ids[b].tolist()
            for p, t in enumerate(ids[:-1]):
                if t == close_id and batch.attention_mask[b, p + 1]:
                    assert ids[p + 1] == info_id and not batch.loss_mask[b, p], "no information block after a search"
        # routes: the router's; log-probs: the trainer's teacher-forced pass at the sampling temperature (0.7)
        att = batch.attention_mask.bool()
        assert torch.equal(routes[att], router(batch.input_ids, batch.attention_mask)[att])
        lp, _ = token_logprobs(model, batch.input_ids, batch.attention_mask, routes=routes, temperature=0.7)
        m = batch.loss_mask
        d = float((lp.detach() - batch.rollout_logprobs)[m].abs().max())
        print(f"vLLM rollout: {int(m.sum())} sampled tokens, {calls} tool calls, max |dlogp| {d:.2e}")
        assert d <= TOL
        tool = (routes[:, :-1] == 1) & m
        assert int(tool.sum()) > 0, "no sampled token was routed to the tool adapter"
        # weight sync: a second collect after changing the adapters samples from the new ones
        randomize_adapters(model, seed=4, scale=0.1)
        batch, routes, _ = eng.collect(rows[:2])
        lp, _ = token_logprobs(model, batch.input_ids, batch.attention_mask, routes=routes, temperature=0.7)
        assert float((lp.detach() - batch.rollout_logprobs)[batch.loss_mask].abs().max()) <= TOL
    finally:
        shutdown(llm)


def test_train_cli_rollout_vllm(world, tmp_path):
    """One GRPO step through the CLI with --rollout vllm: the first update's ratio is exactly 1 (its old
    log-probs are its own forward's), and the rollout log-probs equal the teacher-forced old pass within 1e-5
    (--old-logprobs recompute, two mini-batches: the trainer measures the difference)."""
    from routed_lora.cli import main

    root, _ = world
    out = tmp_path / "run"
    rc = main(["train", "--rollout", "vllm", "--model", str(root / "model"), "--data", str(root / "train.jsonl"),
               "--retriever", f"bm25:{root / 'corpus.jsonl'}", "--out", str(out), "--no-progress", "--steps", "1",
               "--prompts-per-step", "4", "-G", "2", "--max-new-tokens", "16", "--max-total-tokens", "96",
               "--mini-batches", "2", "--old-logprobs", "recompute", "--no-eval-before"])
    assert rc == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    step = [r for r in rows if r.get("step") == 1][0]
    assert step["first_update_max_abs_logratio"] == 0.0
    assert step["rollout_vs_teacher_forced_max_abs_logprob_diff"] <= TOL
    print("train --rollout vllm:", {k: step[k] for k in ("first_update_max_abs_logratio",
                                                       "rollout_vs_teacher_forced_max_abs_logprob_diff",
                                                       "tool_calls", "rollout_s")})
