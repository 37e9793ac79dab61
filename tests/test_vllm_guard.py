"""The vLLM plugin's configuration guard (routed_lora/integrations/vllm/guard.py, docs/vllm.md "GPU").

Under async scheduling (vLLM's GPU default) the host token buffer holds a placeholder for the newest sampled token
when the LoRA mapping is built; the real id is written on the device later. A stand-in for that engine, driving
the plugin's real mapping code (``routing.route_lora_inputs``) with a fake persistent batch, shows the failure: routes
computed from the placeholder are wrong exactly at the tags (the ``<search>`` position keeps the reasoning
adapter, and the span opens one position late or never). The guard refuses such configurations (and the V2
model runner, which builds its mapping on the device) with an error that says what to set.

Runs without vLLM (the plugin's mapping code is plain Python and numpy)."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from routed_lora.integrations.vllm import plugin, routing  # noqa: E402
from routed_lora.router import TagRouter  # noqa: E402
from routed_lora.testing import tiny_tokenizer  # noqa: E402

PLACEHOLDER = 0  # what an async engine has on the host for a token it has not copied back yet
IDS = {"reasoning": 11, "tool": 12}


@pytest.fixture
def routed(monkeypatch):
    """A routed LoRA request and its spec, without files or vLLM."""
    tok = tiny_tokenizer()
    router = TagRouter(tok, default="reasoning", adapters=("reasoning", "tool"))
    spec = routing.RoutedSpec.of(router, ["reasoning", "tool"], {0: IDS["reasoning"], 1: IDS["tool"], -1: 0})
    lr = types.SimpleNamespace(lora_name=routing.ROUTED_PREFIX + "{}", lora_int_id=5, lora_path="stand-in")
    monkeypatch.setitem(routing.RoutedSpec._cache, (lr.lora_name, 5, "stand-in"), spec)
    monkeypatch.setattr(routing, "state", routing._WorkerState())
    return tok, router, lr


def _run(tok, lr, prompt, sampled, *, async_scheduling: bool):
    """Drive the mapping the way vLLM's V1 runner does (prefill, then one decode step per sampled token); return
    the route used at every fed position."""
    seq = prompt + sampled
    buf = np.zeros((1, len(seq) + 1), dtype=np.int64)
    batch = types.SimpleNamespace(num_reqs=1, request_lora_mapping=np.array([5]), lora_id_to_lora_request={5: lr},
                                  req_ids=["r"], num_computed_tokens_cpu=np.array([0]), token_ids_cpu=buf,
                                  generators={})
    buf[0, : len(prompt)] = prompt
    used = []
    steps = [(0, len(prompt))] + [(len(prompt) + k, 1) for k in range(len(sampled) - 1)]
    for start, n in steps:
        if n == 1:  # decode: the newest sampled token sits at `start`
            buf[0, start] = PLACEHOLDER if async_scheduling else seq[start]
        batch.num_computed_tokens_cpu[0] = start
        _, token_map, _ = routing.route_lora_inputs(batch, np.array([n]), np.array([1]), routing.routed_specs(batch))
        used += list(token_map)
        buf[0, start: start + n] = seq[start: start + n]  # async: the real id arrives after the step
    inv = {v: k for k, v in {0: IDS["reasoning"], 1: IDS["tool"], -1: 0}.items()}
    return [inv[i] for i in used], seq


def test_sync_routes_equal_the_router(routed):
    tok, router, lr = routed
    prompt = tok("who was born in paris ? <think>")["input_ids"]
    sampled = tok("alice <search> alice born </search> <information> paris </information> <answer> paris")["input_ids"]
    used, seq = _run(tok, lr, prompt, sampled, async_scheduling=False)
    want = router(torch.tensor([seq]))[0].tolist()[: len(used)]
    assert used == want


def test_async_standin_is_late_at_the_tags_and_the_guard_refuses_it(routed):
    tok, router, lr = routed
    prompt = tok("who was born in paris ? <think>")["input_ids"]
    sampled = tok("alice <search> alice born </search> <information> paris </information> <answer> paris")["input_ids"]
    used, seq = _run(tok, lr, prompt, sampled, async_scheduling=True)
    want = router(torch.tensor([seq]))[0].tolist()[: len(used)]
    bad = [p for p, (a, b) in enumerate(zip(used, want)) if a != b]
    open_pos = seq.index(tok.convert_tokens_to_ids("<search>"))
    assert bad and bad[0] == open_pos, f"expected the first wrong route at the <search> position {open_pos}: {bad}"
    assert used[open_pos] == 0 and want[open_pos] == 1  # the tool adapter comes late

    # the guard: async scheduling and the V2 runner are refused with what to set
    cfg = types.SimpleNamespace(use_v2_model_runner=False, speculative_config=None,
                                scheduler_config=types.SimpleNamespace(async_scheduling=True))
    with pytest.raises(plugin.UnsupportedVLLMConfig, match="async_scheduling=False"):
        plugin.check_supported(cfg)
    cfg2 = types.SimpleNamespace(use_v2_model_runner=True, speculative_config=None,
                                 scheduler_config=types.SimpleNamespace(async_scheduling=False))
    with pytest.raises(plugin.UnsupportedVLLMConfig, match="VLLM_USE_V2_MODEL_RUNNER=0"):
        plugin.check_supported(cfg2)
    ok = types.SimpleNamespace(use_v2_model_runner=False, speculative_config=None,
                               scheduler_config=types.SimpleNamespace(async_scheduling=False))
    plugin.check_supported(ok, version="0.32.0")
    with pytest.raises(plugin.UnsupportedVLLMConfig, match="not a tested release"):
        plugin.check_supported(ok, version="0.40.1")
    # in a worker, the guard's verdict (recorded when LoRA is set up) stops the first routed batch
    routing.state.unsupported = "routed-lora: ... async scheduling is on: pass async_scheduling=False"
    with pytest.raises(plugin.UnsupportedVLLMConfig, match="async_scheduling=False"):
        _run(tok, lr, prompt, sampled, async_scheduling=True)


def test_train_rollout_vllm_without_vllm_is_a_usage_error(tmp_path, capsys):
    """Where vLLM is not installed (the main environment), --rollout vllm fails with one line saying how to get
    it, not a traceback."""
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    pytest.importorskip("bm25s")
    from routed_lora.cli import main
    from routed_lora.testing import tiny_world

    w = tiny_world(tmp_path / "world")
    rc = main(["train", "--rollout", "vllm", "--model", str(w / "model"), "--data", str(w / "train.jsonl"),
               "--retriever", f"bm25:{w / 'corpus.jsonl'}", "--out", str(tmp_path / "out"), "--no-progress",
               "--steps", "1", "--prompts-per-step", "2", "-G", "2"])
    assert rc == 2
    assert "--rollout vllm: vLLM is not installed" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["tokens", "text"])
def test_batched_decoding_steps_route_as_the_router(monkeypatch, mode):
    """Many routed requests in one persistent batch, decoding steps routed for all of them at once (the array
    path for single-token tags, one stream call for multi-token tags), beside prefill chunks of requests that
    join later: every position's LoRA id is TagRouter's route of the whole sequence."""
    tok = tiny_tokenizer()
    if mode == "tokens":
        router = TagRouter(tok, default="reasoning", adapters=("reasoning", "tool"))
        tags = [["<search>"], ["</search>"], ["<information>"], ["</information>"]]
    else:  # tags of three tokens ("<" "search" ">"), route -1 outside the span
        router = TagRouter.from_dict(tok, {"type": "TagRouter", "spans": [["tool", ["<search>", "</search>"]]],
                                           "default": None, "mode": "text"}, adapters=("reasoning", "tool"))
        tags = [["<", "search", ">"], ["</", "search", ">"], ["<"], ["search"]]
    assert router.mode == mode
    id_of = {0: IDS["reasoning"], 1: IDS["tool"], -1: 0}
    spec = routing.RoutedSpec.of(router, ["reasoning", "tool"], id_of)
    lr = types.SimpleNamespace(lora_name=routing.ROUTED_PREFIX + "{}", lora_int_id=5, lora_path="stand-in")
    monkeypatch.setitem(routing.RoutedSpec._cache, (lr.lora_name, 5, "stand-in"), spec)
    monkeypatch.setattr(routing, "state", routing._WorkerState())
    g = np.random.default_rng(0)
    units = [[w] for w in ("alice", "paris", "born", "who")] + tags  # a tag (or a part of one) every other unit
    n_req, length = 7, 40
    seqs = np.array([[t for u in g.integers(len(units), size=length) for t in tok.convert_tokens_to_ids(units[u])]
                     [:length] for _ in range(n_req)], dtype=np.int64)
    join = [0, 0, 0, 3, 5, 5, 11]  # the step at which each request's prompt (6-9 tokens, one chunk) is scheduled
    plen = [6, 7, 8, 9, 6, 7, 8]
    buf = np.zeros((n_req, length + 1), dtype=np.int64)
    batch = types.SimpleNamespace(num_reqs=n_req, request_lora_mapping=np.full(n_req, 5), req_ids=list("abcdefg"),
                                  lora_id_to_lora_request={5: lr}, num_computed_tokens_cpu=np.zeros(n_req, np.int64),
                                  token_ids_cpu=buf, generators={})
    done = np.zeros(n_req, dtype=np.int64)  # positions fed so far
    used = [[] for _ in range(n_req)]
    batched = []
    orig = routing._decode_routes_ if mode == "tokens" else routing._decode_routes_text_

    def spy(spec_, sts, tok_):
        batched.append(len(sts))
        return orig(spec_, sts, tok_)

    monkeypatch.setattr(routing, "_decode_routes_" if mode == "tokens" else "_decode_routes_text_", spy)
    for step in range(length):
        sched = np.zeros(n_req, dtype=np.int64)
        for i in range(n_req):
            if step == join[i]:
                sched[i] = plen[i]
            elif step > join[i] and done[i] < length:
                sched[i] = 1
        buf[:, :] = 0
        for i in range(n_req):
            buf[i, : done[i] + sched[i]] = seqs[i, : done[i] + sched[i]]  # sampled tokens arrive before the step
        batch.num_computed_tokens_cpu[:] = done
        _, token_map, _ = routing.route_lora_inputs(batch, sched, (sched > 0).astype(np.int64),
                                                    routing.routed_specs(batch))
        o = 0
        for i in range(n_req):
            used[i] += list(token_map[o:o + sched[i]])
            o += sched[i]
        done += sched
    inv = {v: k for k, v in id_of.items()}
    switches = 0
    for i in range(n_req):
        want = router(torch.tensor([seqs[i, : done[i]].tolist()]))[0].tolist()
        assert [inv[x] for x in used[i]] == want, f"request {i}"
        switches += sum(a != b for a, b in zip(want, want[1:]))
    assert switches >= 20 and max(batched) >= 5  # decoding steps of five or more requests went together
