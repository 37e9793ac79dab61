"""Evaluation variants, the 2-Agent loop and the diagnostics CLI on a tiny built-in world (1 layer, hidden 32)."""

import json

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

import routed_lora as rl
from routed_lora.cli import main as cli_main
from routed_lora.diagnostics import VARIANTS
from routed_lora.diagnostics.evaluate import (
    VariantRouter,
    compare_two_agent,
    evaluate_variant,
    load_policy,
    summarize,
    variant_route_pair,
)
from routed_lora.env.retriever import BM25Retriever
from routed_lora.env.tokenizer import build_tiny_model, build_tokenizer
from routed_lora.env.trajectories import build_trajectories, vocab_texts
from routed_lora.env.world import build_world, write_world
from routed_lora.grpo.trainer import adapter_state


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("diagworld")
    world = build_world(seed=1, n_first=6, n_last=6, n_people=30, n_cities=8, n_companies=6, n_countries=3)
    write_world(world, root)
    tok = build_tokenizer(vocab_texts(world))
    build_tiny_model(tok, hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64, out_dir=root / "model")
    # a "trained" checkpoint in the trainer's format: random B so every adapter changes the logits
    model, _, _ = load_policy(root / "model", r=2, lora_alpha=4, random_b=0.5, seed=3)
    ckpt = root / "run"
    ckpt.mkdir()
    torch.save({"adapters": adapter_state(model), "step": 1,
                "config": {"mode": "dart", "r": 2, "lora_alpha": 4.0,
                           "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj"]}}, ckpt / "checkpoint.pt")
    return world, tok, root, ckpt, BM25Retriever(world.passages)


def test_route_table_documented_mapping():
    want = {"base": (-1, -1), "reasoning": (0, 0), "tool": (1, 1), "unified": (1, 0), "hybrid_tool": (1, -1),
            "hybrid_reasoning": (-1, 0)}
    assert {v: variant_route_pair(v) for v in VARIANTS} == want
    assert variant_route_pair("unified", ("tool", "reasoning")) == (0, 1)
    assert variant_route_pair("unified", ("joint",)) == (0, 0)
    with pytest.raises(ValueError, match="joint"):
        variant_route_pair("hybrid_tool", ("joint",))


def test_variant_routes_and_logits(env):
    world, tok, root, ckpt, _ = env
    model, tok, router = load_policy(root / "model", ckpt)
    assert isinstance(router, VariantRouter)
    ids = torch.tensor([tok.encode("question : who ? <think> i need to search </think> <search> "
                                   f"{world.train[0]['plan'][0]['query']} </search> <answer> x </answer>",
                                   add_special_tokens=False)])
    dart = router.inner(ids)
    is_tool = dart == 1
    assert is_tool.any() and (~is_tool).any()
    with torch.no_grad():
        with rl.disable_adapters(model):
            base = model(input_ids=ids).logits
        seen = {}
        for v in VARIANTS:
            router.variant = v
            t, c = variant_route_pair(v)
            expect = torch.where(is_tool, t, c)
            assert torch.equal(router(ids), expect), v
            got = model(input_ids=ids).logits  # the model routes itself through the variant router
            ref = model(input_ids=ids, routes=expect).logits
            torch.testing.assert_close(got, ref, rtol=0, atol=0, msg=lambda m: f"variant {v}: {m}")
            seen[v] = got
        router.variant = "unified"
    torch.testing.assert_close(seen["base"], base, rtol=0, atol=0)
    for v in VARIANTS[1:]:
        assert not torch.allclose(seen[v], base), f"variant {v} equals the backbone"


class _Expert(LogitsProcessor):
    """Forces every row to follow its question's expert trajectory (matched by prompt), then eos."""

    def __init__(self, tok, trajs):
        self.tok, self.trajs = tok, [t["input_ids"] for t in trajs]

    def __call__(self, input_ids, scores):
        out = torch.full_like(scores, -1e9)
        for b, row in enumerate(input_ids.tolist()):
            real = [t for t in row if t != self.tok.pad_token_id]
            match = [t for t in self.trajs if t[: len(real)] == real]
            assert len(match) == 1, (self.tok.decode(real), [self.tok.decode(t[: len(real)]) for t in self.trajs])
            traj = match[0]
            out[b, traj[len(real)] if len(real) < len(traj) else self.tok.eos_token_id] = 0.0
        return out


def test_scripted_eval_two_agent_matches_dart(env):
    world, tok, root, ckpt, retriever = env
    rows = [q for q in world.test if q["hops"] == 1][:1] + [q for q in world.test if q["hops"] == 2][:1]
    gk = {"logits_processor": LogitsProcessorList([_Expert(tok, build_trajectories(tok, rows, retriever))])}
    model, tok, router = load_policy(root / "model", ckpt)
    recs, costs = compare_two_agent(root / "model", ckpt, {"t": rows}, retriever, samples=1, greedy=True,
                                    max_new_tokens=48, dart=(model, tok, router), generation_kwargs=gk)
    by = {(r["variant"], r["hops"]): r for r in recs}
    for v in ("unified", "two-agent"):
        for h in (1, 2):
            r = by[(v, h)]
            assert r["greedy"] == 1 and r["correct"] == [1] and r["tool_calls"] == h, (v, h, r)
    a, d = costs["two-agent"], costs["unified"]
    searches = 2 * (1 + 2)  # greedy + 1 sample, for a 1-hop and a 2-hop question
    # DART keeps one KV cache per rollout across turns (issue 13): no rebuilds; 2-Agent rebuilds at every turn
    assert d["cache_rebuilds"] == 0 and a["cache_rebuilds"] == 2 * searches
    assert d["generate_calls"] > 0
    assert a["handovers"] == 2 * searches and a["foreign_tokens"] > 0 and d["foreign_tokens"] == 0
    assert a["model_bytes"] == 2 * d["model_bytes"]
    assert a["prefill_tokens"] > d["prefill_tokens"]
    s = summarize(recs)
    assert s["two-agent"]["t"]["em_greedy"] == 1.0 and s["unified"]["t/2hop"]["em_sampled"] == 1.0
    # alternating one question at a time gives the same records and counts (ids keep the data set's order)
    recs1, costs1 = compare_two_agent(root / "model", ckpt, {"t": rows}, retriever, samples=1, greedy=True,
                                      max_new_tokens=48, dart=(model, tok, router), generation_kwargs=gk,
                                      chunk_questions=1)
    key = lambda r: (r["variant"], r["id"])  # noqa: E731
    assert [key(r) for r in recs1] == [("unified", 0), ("unified", 1), ("two-agent", 0), ("two-agent", 1)]
    assert sorted(recs1, key=key) == sorted(recs, key=key)
    for system in ("unified", "two-agent"):
        for k in ("cache_rebuilds", "prefill_tokens", "handovers", "foreign_tokens", "rollouts"):
            assert costs1[system][k] == costs[system][k], (system, k)
    # the same forced transcripts under a variant that routes the query to the backbone
    recs, _ = evaluate_variant(model, tok, router, {"t": rows[:1]}, retriever, "hybrid_reasoning", samples=1,
                               greedy=False, max_new_tokens=48, generation_kwargs=gk)
    assert recs[0]["rate"] == 1.0 and router.variant == "unified"


def test_cli_eval_leas_and_grad_angle_end_to_end(env, tmp_path, capsys):
    world, tok, root, ckpt, _ = env
    out = tmp_path / "eval"
    assert cli_main(["eval", "--world-dir", str(root), "--adapters", str(ckpt), "--variant", "all", "--limit", "2",
                     "--samples", "2", "--no-greedy", "--max-new-tokens", "4", "--max-turns", "1", "--threads", "1",
                     "--out", str(out)]) == 0
    rows = [json.loads(x) for x in (out / "eval_hybrid_tool.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[0]["n"] == 2 and len(rows[0]["correct"]) == 2
    summary = json.loads((out / "eval_summary.json").read_text())
    assert set(summary["em"]) == set(VARIANTS) and summary["costs"]["base"]["generate_calls"] >= 1
    # LEAS straight from the eval files (an untrained model solves nothing: every question is dropped)
    assert cli_main(["diagnose", "leas", "--rates", *map(str, sorted(out.glob("eval_*.jsonl"))),
                     "--out", str(tmp_path / "leas")]) == 0
    s = json.loads((tmp_path / "leas" / "leas_summary.json").read_text())
    assert s["n_questions"] == 2 and s["kept"] + s["dropped_never_solved"] == 2 and s["eps"] == 0.25

    ga = tmp_path / "ga"
    assert cli_main(["diagnose", "grad-angle", "--world-dir", str(root), "--adapters", str(ckpt), "--source", "expert",
                     "--questions", "4", "--threads", "1", "--out", str(ga)]) == 0
    rep = json.loads((ga / "grad_angle.json").read_text())
    assert rep["roles"]["tool"] > 0 and rep["roles"]["reasoning"] > 0
    assert 0 < rep["batch"]["angle_deg"] < 180
    assert rep["within_rollout"]["angle_deg"]["n"] == 4 and len(rep["across_rollouts"]["tool"]["pairs"]) == 6
    for a in ("reasoning", "tool"):  # attention mixes the roles: both adapters see the other role's loss
        assert 0 < rep["cross_talk"][a]["cross_talk_share"] < 1
    assert (ga / "grad_angle.png").stat().st_size > 1000

    # joint mode (one shared LoRA), sampled rollouts with the GRPO objective: runs end to end
    assert cli_main(["diagnose", "grad-angle", "--world-dir", str(root), "--mode", "joint", "--random-b", "0.3",
                     "--questions", "2", "--group-size", "2", "--max-new-tokens", "6", "--max-turns", "1",
                     "--threads", "1", "--out", str(tmp_path / "ga_joint")]) == 0
    rep = json.loads((tmp_path / "ga_joint" / "grad_angle.json").read_text())
    assert rep["mode"] == "joint" and rep["objective"] == "grpo" and "cross_talk" not in rep
    assert all(".lora_A[joint]" in n or ".lora_B[joint]" in n for n in rep["tensors"])


def test_load_policy_from_saved_adapter_folder(env, tmp_path):
    world, tok, root, ckpt, _ = env
    model, _, _ = load_policy(root / "model", ckpt)
    rl.save_adapters(model, tmp_path / "adapters")
    again, _, router = load_policy(root / "model", tmp_path / "adapters", variant="hybrid_tool")
    assert router.adapter_names == ("reasoning", "tool") and router.variant == "hybrid_tool"
    a, b = adapter_state(model), adapter_state(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # one PEFT folder alone is a single joint adapter: only base and unified make sense
    joint, _, jr = load_policy(root / "model", tmp_path / "adapters" / "tool")
    assert jr.adapter_names == ("joint",)
    lay = [m for m in joint.modules() if hasattr(m, "adapter_names")][0]
    ref = [m for m in model.modules() if hasattr(m, "adapter_names")][0]
    assert torch.equal(lay.lora_B[0], ref.lora_B[1])
