"""Routed generation in vLLM (the plugin, routed_lora/integrations/vllm): the log-probs vLLM returns for sampled
(and prompt) tokens equal the teacher-forced log-probs of our HF routed model within 1e-5 (fp32), and the routes
the workers used (their trace) equal TagRouter's, over sequences with many tag switches (the tags' logits are
biased), with prefix caching, chunked prefill, more routing runs than max_num_seqs, mixed batches (routed,
single-adapter and no-LoRA requests), route -1 as the context route, multi-token tags, and after a weight sync.

Needs vLLM (`make test-vllm` builds its environment); skipped elsewhere."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

vllm = pytest.importorskip("vllm")
pytestmark = [pytest.mark.vllm, pytest.mark.slow]

import routed_lora as rl  # noqa: E402
from routed_lora.router import TagRouter  # noqa: E402

from _vllm_util import build_tiny, hf_logprobs, randomize_adapters, read_trace, set_cpu_env, shutdown  # noqa: E402

TOL = 1e-5
PROMPTS = [
    "who was born in paris ? <search> alice born paris </search> <information> alice was born in paris . "
    "</information> <think> the city is",
    "the capital of france is",
    "what river is in rome ? <search> river rome",  # ends inside an open span
    "who founded the company ? <think> bob",
]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    out = tmp_path_factory.mktemp("vllm")
    trace = out / "trace.jsonl"
    set_cpu_env(trace)
    model, tok, router = build_tiny(out)
    from routed_lora.integrations.vllm import RoutedLLM, engine_kwargs

    # max_num_batched_tokens 32: prompts are prefilled in chunks; max_num_seqs 4: fewer than the routing runs
    llm = vllm.LLM(model=str(out / "model"), **engine_kwargs(out / "adapters"), max_model_len=256,
                   max_num_seqs=4, max_num_batched_tokens=32, enable_prefix_caching=True, block_size=32,
                   enforce_eager=True, seed=0)
    routed = RoutedLLM(llm, out / "adapters")
    yield dict(out=out, trace=trace, model=model, tok=tok, router=router, llm=llm, routed=routed)
    routed.close()
    shutdown(llm)


def _params(tok, *, n_tokens=48, prompt_logprobs=None, extra_bias=()):
    bias = {tok.convert_tokens_to_ids(t): 3.0 for t in ("<search>", "</search>", *extra_bias)}
    return vllm.SamplingParams(max_tokens=n_tokens, temperature=1.0, logprobs=0, prompt_logprobs=prompt_logprobs,
                               logit_bias=bias, ignore_eos=True)


def _check(env, outs, routers, *, prompt_logprobs=False):
    """Max |vLLM - HF| over sampled (and prompt) tokens; asserts routes == TagRouter and the workers' trace."""
    model, trace = env["model"], read_trace(env["trace"])
    worst, switches = 0.0, 0
    for o, router in zip(outs, routers):
        ids = o.prompt_ids + o.token_ids
        if router is None or isinstance(router, int):
            want = [-1 if router is None else router] * len(ids)
        else:
            want = router(torch.tensor([ids]))[0].tolist()
        assert o.routes == want, f"routes differ from TagRouter's at {[i for i, (a, b) in enumerate(zip(o.routes, want)) if a != b][:5]}"
        if router is not None and not isinstance(router, int):
            # the routes the workers used, position by position (the last sampled token is never fed)
            used = next((v for k, v in trace.items() if k.startswith(o.extra["request_id"] + "-")), None)
            assert used is not None, "no trace of a routed request"
            bad = [p for p, r in used.items() if r != want[p]]
            assert not bad, f"worker routes differ from TagRouter at positions {bad[:5]}"
            cached = o.extra["num_cached_tokens"] or 0  # prefix-cache hits are not computed again
            assert sorted(used) == list(range(cached, len(ids) - 1)), "the workers did not route every fed position"
            switches += sum(a != b for a, b in zip(want, want[1:]))
        ref = hf_logprobs(model, ids, want)
        P = len(o.prompt_ids)
        d = (ref[P - 1:] - torch.tensor(o.logprobs)).abs().max().item()
        assert d <= TOL, f"sampled-token log-probs differ by {d:.2e}"
        worst = max(worst, d)
        if prompt_logprobs:
            got = torch.tensor(o.prompt_logprobs[1:])
            d = (ref[: P - 1] - got).abs().max().item()
            assert d <= TOL, f"prompt log-probs differ by {d:.2e}"
            worst = max(worst, d)
    return worst, switches


def test_routed_logprobs_equal_hf(env):
    tok, routed = env["tok"], env["routed"]
    prompts = [tok(p)["input_ids"] for p in PROMPTS] * 2
    outs = routed.generate(prompts, _params(tok, prompt_logprobs=0))
    worst, switches = _check(env, outs, [env["router"]] * len(outs), prompt_logprobs=True)
    assert switches >= 5 * len(outs), f"too few tag switches ({switches}) to test routing"
    print(f"routed: max |dlogp| {worst:.2e}, {switches} switches over {len(outs)} sequences")
    # routing took effect: all-reasoning routes give other log-probs
    o = outs[0]
    ids = o.prompt_ids + o.token_ids
    flat = hf_logprobs(env["model"], ids, [0] * len(ids))[len(o.prompt_ids) - 1:]
    assert (flat - torch.tensor(o.logprobs)).abs().max() > 1e-2


def test_prefix_cache_hits_keep_routes(env):
    tok, routed = env["tok"], env["routed"]
    long = tok(PROMPTS[0] + " " + PROMPTS[3])["input_ids"] * 2  # two blocks of 32
    outs = routed.generate([long, long + tok("<search> bob")["input_ids"]], _params(tok, n_tokens=24))
    outs += routed.generate([long, long + tok("<search> bob")["input_ids"]], _params(tok, n_tokens=24))
    assert max(o.extra["num_cached_tokens"] or 0 for o in outs[2:]) >= 32, "no prefix cache hit"
    _check(env, outs, [env["router"]] * len(outs))


def test_mixed_batch(env):
    """routed, single-adapter and no-LoRA requests in one batch (the no-LoRA rows once got the last slot)."""
    tok, routed = env["tok"], env["routed"]
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    kinds = ["routed", "tool", None, "reasoning", "routed", None]
    outs = routed.generate([prompts[i % 4] for i in range(len(kinds))], _params(tok, n_tokens=32), adapter=kinds)
    refs = [env["router"] if k == "routed" else (None if k is None else ["reasoning", "tool"].index(k))
            for k in kinds]
    _check(env, outs, refs)


def test_route_minus_one_and_multi_token_tags(env):
    """The context route -1 (backbone only between spans) and tags spelled as several tokens ("<" "search" ">"),
    routed in the router's text mode; a second routed set in the same engine."""
    from routed_lora.integrations.vllm import RoutedLLM

    tok = env["tok"]
    d = {"type": "TagRouter", "spans": [["tool", ["<search>", "</search>"]]], "default": None, "mode": "text"}
    routed = RoutedLLM(env["llm"], env["out"] / "adapters", router=d)
    router = TagRouter.from_dict(tok, d, adapters=("reasoning", "tool"))
    prompts = [tok(p)["input_ids"] for p in ["who was born in < search > paris", "the capital < / search >"]] * 2
    outs = routed.generate(prompts, _params(tok, n_tokens=40, extra_bias=("<", "search", ">", "</")))
    worst, switches = _check(env, outs, [router] * len(outs))
    assert any(-1 in o.routes for o in outs) and switches >= 10
    print(f"route -1 / text mode: max |dlogp| {worst:.2e}, {switches} switches")


def test_weight_sync(env):
    """update(model) after the adapters changed: new log-probs match the new HF model, without a restart; a live
    model is synced in memory under the same LoRA ids (no folder written), a folder or in_memory=False under new
    ids, and a sync in memory survives the adapters' eviction from the workers' LoRA cache."""
    tok, routed, model = env["tok"], env["routed"], env["model"]
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    before = routed.generate(prompts[:1], _params(tok, n_tokens=16))[0]
    ids = {a: r.lora_int_id for a, r in routed.requests.items()}
    folder = routed.folder
    randomize_adapters(model, seed=7)
    routed.update(model)
    assert routed.last_sync == "tensors" and routed.folder == folder
    assert {a: r.lora_int_id for a, r in routed.requests.items()} == ids
    outs = routed.generate(prompts, _params(tok, n_tokens=32))
    _check(env, outs, [env["router"]] * len(outs))
    # the same prompt and tokens now score differently (the new weights are in use)
    again = hf_logprobs(model, before.prompt_ids + before.token_ids, before.routes)[len(before.prompt_ids) - 1:]
    assert (again - torch.tensor(before.logprobs)).abs().max() > 1e-2
    # evicted from the workers' cache, the adapters come back from the synced tensors, not the stale folder
    for i in ids.values():
        routed.engine.remove_lora(i)
    _check(env, routed.generate(prompts[:2], _params(tok, n_tokens=24)), [env["router"]] * 2)
    # a second sync in memory, then one through a folder under new ids: each takes effect
    randomize_adapters(model, seed=8)
    routed.update(model)
    _check(env, routed.generate(prompts[:2], _params(tok, n_tokens=24)), [env["router"]] * 2)
    randomize_adapters(model, seed=9)
    routed.update(model, in_memory=False)
    assert routed.last_sync == "folder"
    assert set(ids.values()).isdisjoint(r.lora_int_id for r in routed.requests.values())
    _check(env, routed.generate(prompts[:2], _params(tok, n_tokens=24)), [env["router"]] * 2)
    with pytest.raises(ValueError, match="in_memory=True needs a model"):
        routed.update(routed.folder, in_memory=True)


def test_live_model_loads_in_memory_or_into_workdir(env, tmp_path):
    """RoutedLLM(llm, model): the adapters reach the workers as tensors (their request paths name no folder) and
    route as TagRouter with HF's log-probs; with workdir= they are written there and read by vLLM's loader."""
    from routed_lora.integrations.vllm import RoutedLLM, tensor_sync

    tok = env["tok"]
    prompts = [tok(p)["input_ids"] for p in PROMPTS[:2]]
    for workdir in (None, tmp_path / "adapters"):
        rl = RoutedLLM(env["llm"], env["model"], workdir=workdir)
        assert rl.folder.exists() == (workdir is not None)
        assert all(Path(r.lora_path).exists() == (workdir is not None) for r in rl.requests.values())
        _check(env, rl.generate(prompts, _params(tok, n_tokens=24)), [env["router"]] * 2)
        ids = [r.lora_int_id for r in rl.requests.values()]
        # the in-process engine's worker shares this process's registry
        assert [tensor_sync.registered(i) for i in ids] == [workdir is None] * len(ids)
        rl.close()
        assert not any(tensor_sync.registered(i) for i in ids)
        assert not set(ids) & set(env["llm"].llm_engine.list_loras())


def test_weight_sync_from_bad_tensors_changes_nothing(env):
    """Tensors the engine cannot take (rank above max_lora_rank, a module that is not a LoRA target) are refused
    in the workers before anything is stored: generation keeps the weights of the last good sync."""
    from routed_lora.adapter_io import adapter_payload
    from routed_lora.integrations.vllm.tensor_sync import METHOD

    tok, routed, model = env["tok"], env["routed"], env["model"]
    routed.update(model)
    _, config, tensors = adapter_payload(model)
    lid = routed.requests["tool"].lora_int_id
    good = (routed.requests["reasoning"].lora_int_id, config, tensors["reasoning"])
    too_big = dict(config, r=4096)
    stray = dict(tensors["tool"], **{"base_model.model.model.layers.0.mlp.nowhere.lora_A.weight":
                                     next(iter(tensors["tool"].values()))})
    for bad, match in (((lid, too_big, tensors["tool"]), "rank"), ((lid, config, stray), "nowhere")):
        with pytest.raises(Exception, match=match):
            env["llm"].collective_rpc(METHOD, args=([good, bad],))
    prompts = [tok(p)["input_ids"] for p in PROMPTS[:2]]
    _check(env, routed.generate(prompts, _params(tok, n_tokens=24)), [env["router"]] * 2)


def _count_op_calls(monkeypatch):
    """Count the calls into our CPU LoRA op (the in-process engine's worker runs in this process)."""
    from collections import Counter

    from routed_lora.integrations.vllm import cpu_lora

    calls = Counter()
    for name in ("lora_linear_", "lora_shrink_", "lora_expand_"):
        f = getattr(cpu_lora, name)

        def counted(*a, _f=f, _n=name, **k):
            calls[_n] += 1
            return _f(*a, **k)

        monkeypatch.setattr(cpu_lora, name, counted)
    return calls


def test_our_cpu_op_serves_routed_batches_only_by_default(env, monkeypatch):
    """Routed batches get their LoRA terms from our op (cpu_lora.py); a batch without routed requests stays on
    vLLM's ops (the plugin is inert there) unless ROUTED_LORA_VLLM_CPU_OP=all, which is exact there too and
    gives no-LoRA requests beside LoRA ones the backbone (vLLM's ops give them the last slot: defect 1)."""
    tok, routed = env["tok"], env["routed"]
    calls = _count_op_calls(monkeypatch)
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    outs = routed.generate(prompts[:2], _params(tok, n_tokens=16))
    _check(env, outs, [env["router"]] * 2)
    n_routed = calls["lora_linear_"]
    assert n_routed > 0, "routed batches did not use our op"
    outs = routed.generate(prompts[:2], _params(tok, n_tokens=16), adapter="tool")
    _check(env, outs, [1, 1])
    assert calls["lora_linear_"] == n_routed, "our op ran in a batch without routed requests"
    # every slot occupied (two adapter sets: three LoRA ids for three slots), so that vLLM's ops would give the
    # no-LoRA rows the last slot's adapter
    from vllm.inputs import TokensPrompt

    from routed_lora.integrations.vllm import RoutedLLM

    other = RoutedLLM(env["llm"], env["model"])  # the same weights under new ids
    reqs = [routed.requests["tool"], None, other.requests["reasoning"], None, routed.requests["reasoning"]]
    monkeypatch.setenv("ROUTED_LORA_VLLM_CPU_OP", "all")
    outs = env["llm"].generate([TokensPrompt(prompt_token_ids=prompts[i % 4]) for i in range(len(reqs))],
                               _params(tok, n_tokens=24), lora_request=reqs, use_tqdm=False)
    other.close()
    assert calls["lora_linear_"] > n_routed
    for o, route in zip(outs, [1, -1, 0, -1, 0]):
        ids = list(o.prompt_token_ids) + list(o.outputs[0].token_ids)
        got = torch.tensor([d[t].logprob for t, d in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)])
        ref = hf_logprobs(env["model"], ids, [route] * len(ids))[len(o.prompt_token_ids) - 1:]
        d = (ref - got).abs().max().item()
        assert d <= TOL, f"route {route}: sampled-token log-probs differ by {d:.2e}"


def test_routed_with_vllms_ops(env, monkeypatch):
    """ROUTED_LORA_VLLM_CPU_OP=off: routed batches on vLLM's own per-token ops, with the defect 1/2 fixes."""
    tok, routed = env["tok"], env["routed"]
    monkeypatch.setenv("ROUTED_LORA_VLLM_CPU_OP", "off")
    calls = _count_op_calls(monkeypatch)
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    outs = routed.generate(prompts, _params(tok, n_tokens=24), adapter=["routed", None, "routed", "tool"])
    _check(env, outs, [env["router"], None, env["router"], 1])
    assert not calls


def test_plugin_is_registered():
    from importlib.metadata import entry_points

    eps = [e.value for e in entry_points(group="vllm.general_plugins")]
    assert "routed_lora.integrations.vllm:register" in eps


def test_seeded_requests_with_chunked_prefill(env):
    """Upstream defect 3 (a per-request seed with chunked prefill raises 'CPU Generator does not use offset'):
    routed requests get a generator that can undo a discarded draw; the same seed gives the same tokens."""
    tok, routed = env["tok"], env["routed"]
    long = tok(PROMPTS[0] + " " + PROMPTS[1])["input_ids"] * 2  # > max_num_batched_tokens: chunked
    sp = vllm.SamplingParams(max_tokens=16, temperature=1.0, logprobs=0, seed=1234, ignore_eos=True)
    a = routed.generate([long], sp)[0]
    b = routed.generate([long, tok(PROMPTS[2])["input_ids"]], sp)[0]
    assert a.token_ids == b.token_ids
    _check(env, [a, b], [env["router"]] * 2)


def test_more_routing_runs_than_max_num_seqs(env):
    """Upstream defect 2: one prefill chunk holding many tag switches makes more runs of one LoRA than
    max_num_seqs (4 here); the prefill path's run buffers would overflow."""
    tok, routed = env["tok"], env["routed"]
    many = tok(" ".join(["<search> paris </search> the"] * 8))["input_ids"]  # 16 switches in 32 tokens
    outs = routed.generate([many, many[:20]], _params(tok, n_tokens=16, prompt_logprobs=0))
    _, switches = _check(env, outs, [env["router"]] * 2, prompt_logprobs=True)
    assert switches >= 16


_MP_SCRIPT = r"""
import json, os, sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from _vllm_util import build_tiny, hf_logprobs, read_trace

if __name__ == "__main__":  # vLLM starts its engine core in another process
    out = Path(sys.argv[1])
    model, tok, router = build_tiny(out)
    import vllm
    from routed_lora.integrations.vllm import RoutedLLM, engine_kwargs
    llm = vllm.LLM(model=str(out / "model"), **engine_kwargs(out / "adapters"), max_model_len=256, max_num_seqs=4,
                   block_size=32, enforce_eager=True, seed=0)
    rl = RoutedLLM(llm, out / "adapters")
    bias = {tok.convert_tokens_to_ids(t): 3.0 for t in ("<search>", "</search>")}
    sp = vllm.SamplingParams(max_tokens=32, logprobs=0, logit_bias=bias, ignore_eos=True)
    outs = rl.generate([tok("who was born in paris ?")["input_ids"]] * 3, sp)
    worst = 0.0
    for o in outs:
        ids = o.prompt_ids + o.token_ids
        ref = hf_logprobs(model, ids, router(__import__("torch").tensor([ids]))[0].tolist())
        worst = max(worst, float((ref[len(o.prompt_ids) - 1:] - __import__("torch").tensor(o.logprobs)).abs().max()))
    # a weight sync in memory: the tensors cross into the engine core's process with collective_rpc
    from _vllm_util import randomize_adapters
    randomize_adapters(model, seed=3)
    rl.update(model)
    synced = 0.0
    for o in rl.generate([tok("who was born in paris ?")["input_ids"]] * 2, sp):
        ids = o.prompt_ids + o.token_ids
        ref = hf_logprobs(model, ids, router(__import__("torch").tensor([ids]))[0].tolist())
        synced = max(synced, float((ref[len(o.prompt_ids) - 1:] - __import__("torch").tensor(o.logprobs)).abs().max()))
    pids = {json.loads(line)["pid"] for line in (out / "trace.jsonl").read_text().splitlines()}
    print(json.dumps({"worst": worst, "synced": synced, "sync": rl.last_sync, "trace_pids": sorted(pids),
                      "pid": os.getpid()}))
"""


def test_plugin_runs_in_vllms_own_processes(tmp_path):
    """With the engine core in its own process (vLLM's default), vLLM loads the plugin there through the entry
    point: routing still takes effect and matches the HF model."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1", ROUTED_LORA_VLLM_TRACE=str(tmp_path / "trace.jsonl"))
    for k, v in {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0-1",
                 "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}.items():
        env.setdefault(k, v)
    script = tmp_path / "mp.py"
    script.write_text(_MP_SCRIPT)
    r = subprocess.run([sys.executable, str(script), str(tmp_path), str(Path(__file__).parent)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads([x for x in r.stdout.splitlines() if x.startswith("{")][-1])
    assert res["worst"] <= TOL
    assert res["sync"] == "tensors" and res["synced"] <= TOL, res
    assert res["trace_pids"] and res["pid"] not in res["trace_pids"], "the routing did not run in another process"
