"""veRL integration (skipped without verl; `make test-verl` builds veRL's own environment and runs it): the engine is
registered under its own backends, builds routed adapters from veRL's PEFT LoRA, routes each sequence before
packing, and veRL's own input preparation, forward and output processing on a tiny model give the per-token
log-probs of our padded teacher-forced pass; disable_adapter() is the backbone; the weight sync streams both
adapters and the base (tests/test_verl_vllm.py loads it into vLLM); check_rollout accepts only routed_vllm."""

from __future__ import annotations

import os
import types

import pytest
import torch

pytest.importorskip("verl")
pytest.importorskip("peft")
os.environ.setdefault("VERL_ENGINE_DEVICE", "cpu")

import routed_lora as rl  # noqa: E402
from routed_lora.testing import tiny_model, tiny_tokenizer  # noqa: E402

verl_int = pytest.importorskip("routed_lora.integrations.verl")

TEXTS = [
    "who was born in paris ? <search> alice born </search>",
    "the capital of france <search> paris city",
    "the river of rome is <answer> yes </answer>",
]


def _engine(tok):
    """The engine with veRL's own _build_lora_module, prepare_model_inputs and prepare_model_outputs; the
    distributed set-up of __init__ (device meshes, FSDP wrapping) is skipped: it needs GPUs."""
    from peft.utils import TaskType  # noqa: F401

    eng = verl_int.RoutedLoRAFSDPEngine.__new__(verl_int.RoutedLoRAFSDPEngine)
    eng.model_config = types.SimpleNamespace(lora_rank=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                             target_parameters=None, exclude_modules=None, lora_adapter_path=None,
                                             tokenizer=tok, lora={}, use_shm=False)
    eng.engine_config = types.SimpleNamespace(entropy_checkpointing=False, entropy_from_logits_with_chunking=False)
    eng.pad_to_length = False
    eng.use_ulysses_sp = False
    eng.ulysses_sequence_parallel_size = 1
    model = tiny_model("qwen2", vocab_size=len(tok), hidden=32, layers=2, seed=0)
    eng.module = eng._build_lora_module(model)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for layer in (m for m in eng.module.modules() if isinstance(m, rl.RoutedLoRALinear)):
            layer.lora_B.copy_(0.3 * torch.randn(layer.lora_B.shape, generator=g))
    return eng


def _micro_batch(seqs, remove_padding=True):
    from tensordict import TensorDict

    from verl.utils import tensordict_utils as tu

    ids = torch.nested.nested_tensor(seqs, layout=torch.jagged)
    pos = torch.nested.nested_tensor([torch.arange(len(s)) for s in seqs], layout=torch.jagged)
    td = TensorDict({"input_ids": ids, "position_ids": pos}, batch_size=[len(seqs)])
    tu.assign_non_tensor(td, temperature=1.0, use_remove_padding=remove_padding, pad_token_id=0)
    return td


def test_registered_under_own_backends():
    from verl.workers.engine.base import EngineRegistry

    for backend in ("routed_lora_fsdp", "routed_lora_fsdp2"):
        assert EngineRegistry.get_engine_cls("language_model", backend) is verl_int.RoutedLoRAFSDPEngine
    assert issubclass(verl_int.RoutedLoRAFSDPEngine, __import__(
        "verl.workers.engine.fsdp.transformer_impl", fromlist=["x"]).FSDPEngineWithLMHead)


def test_engine_config_accepts_our_backends():
    from verl.workers.config.engine import FSDPEngineConfig

    with pytest.raises(AssertionError):  # veRL's own config refuses other names: hence ours
        FSDPEngineConfig(strategy="routed_lora_fsdp2")
    cfg = verl_int.RoutedLoRAFSDPEngineConfig(strategy="routed_lora_fsdp2")
    plain = verl_int.plain_strategy_config(cfg)
    assert plain.strategy == "fsdp2" and cfg.strategy == "routed_lora_fsdp2"
    assert verl_int.plain_strategy_config(verl_int.RoutedLoRAFSDPEngineConfig(strategy="routed_lora_fsdp")).strategy \
        == "fsdp"
    with pytest.raises(ValueError, match="strategy: expected one of"):
        verl_int.RoutedLoRAFSDPEngineConfig(strategy="megatron")


@pytest.mark.parametrize("remove_padding", [True, False], ids=["packed", "padded"])
def test_verl_forward_equals_padded_teacher_forcing(one_thread, remove_padding):
    from routed_lora.grpo.logprobs import routes_for, token_logprobs

    tok = tiny_tokenizer()
    eng = _engine(tok)
    seqs = [torch.tensor(tok(t, add_special_tokens=False)["input_ids"]) for t in TEXTS]
    mb = _micro_batch(seqs, remove_padding)
    inputs, out_args = eng.prepare_model_inputs(mb)
    router = eng._router()
    if remove_padding:
        cut = len(seqs[0]) + len(seqs[1])  # first token of sequence 2 follows a <search> cut by the boundary
        assert inputs["routes"].shape == inputs["input_ids"].shape == (1, sum(map(len, seqs)))
        assert int(inputs["routes"][0, cut]) == 0 and int(router(inputs["input_ids"])[0, cut]) == 1
    with torch.no_grad():
        raw = eng.module(**inputs, use_cache=False)
        got = eng.prepare_model_outputs(raw, out_args, mb, None)["log_probs"]
    # ours: padded batch, router per row, teacher-forced log-probs
    L = max(map(len, seqs))
    ids = torch.zeros(len(seqs), L, dtype=torch.long)
    att = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], att[i, :len(s)] = s, 1
    ref, _ = token_logprobs(eng.module, ids, att, routes=routes_for(ids, att, router=router))
    worst = 0.0
    for i, (s, lp) in enumerate(zip(seqs, got.unbind())):
        worst = max(worst, float((lp[:len(s) - 1] - ref[i, :len(s) - 1]).abs().max()))
    assert worst <= 1e-5, f"veRL's log-probs differ from ours by {worst:.3g}"
    # the reference pass: veRL's disable_adapter() gives the backbone
    with torch.no_grad(), eng.disable_adapter():
        base = eng.prepare_model_outputs(eng.module(**inputs, use_cache=False), out_args, mb, None)["log_probs"]
        ref_base, _ = token_logprobs(eng.module, ids, att, routes=torch.full_like(ids, -1))
    for i, (s, lp) in enumerate(zip(seqs, base.unbind())):
        assert float((lp[:len(s) - 1] - ref_base[i, :len(s) - 1]).abs().max()) <= 1e-5
    assert float((got.values() - base.values()).abs().max()) > 1e-3  # the adapters matter


def test_check_rollout_accepts_only_the_routed_vllm_rollout():
    verl_int.check_rollout("routed_vllm")
    for name in ("vllm", "sglang", "trtllm"):
        with pytest.raises(ValueError, match=f"rollout.name='{name}': expected 'routed_vllm'. {name} serves one LoRA"):
            verl_int.check_rollout(name)
    with pytest.raises(ValueError, match="rollout.name='hf': expected 'routed_vllm'. veRL 0.9.1 registers no HF"):
        verl_int.check_rollout("hf")
    with pytest.raises(ValueError, match="rollout.name='naive': expected 'routed_vllm'"):
        verl_int.check_rollout("naive")


def test_hf_rollout_is_not_registered_in_this_verl():
    """The reason check_rollout refuses 'hf': veRL 0.9.1 has no HF rollout to get (docs/backends.md)."""
    from verl.workers.rollout.base import get_rollout_class

    with pytest.raises(AssertionError, match="Rollout hf with mode async not found"):
        get_rollout_class("hf", "async")


def test_weight_sync_streams_every_adapter_and_the_base():
    """get_per_tensor_param as veRL's update_weights calls it: base_sync_done=True gives both adapters' tensors
    (exactly the routed layers' rows) and the routed PEFT config; False the backbone under HF names."""
    from routed_lora.integrations.verl_sync import ROUTED_KEY, split_payload

    tok = tiny_tokenizer()
    eng = _engine(tok)
    named, cfg = eng.get_per_tensor_param(layered_summon=False, base_sync_done=True)
    per, plain, meta = split_payload(named, cfg)
    assert meta["adapters"] == ["reasoning", "tool"] and meta["router"] == eng._router().to_dict()
    assert plain["r"] == 4 and plain["lora_alpha"] == 8 and plain["peft_type"] == "LORA"
    base = eng.module.get_base_model()
    layers = rl.hf.routed_layers(base)
    assert len(per["tool"]) == 2 * len(layers) > 0
    for n, layer in layers:
        for e, a in enumerate(("reasoning", "tool")):
            assert torch.equal(per[a][f"base_model.model.{n}.lora_A.weight"], layer.lora_A[e].detach())
            assert torch.equal(per[a][f"base_model.model.{n}.lora_B.weight"], layer.lora_B[e].detach())
    stream, cfg2 = eng.get_per_tensor_param(layered_summon=False, base_sync_done=False)
    assert cfg2 == cfg and ROUTED_KEY in cfg2
    got = dict(stream)
    want = {k: v for k, v in base.state_dict().items() if not k.endswith(("lora_A", "lora_B"))}
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_weight_sync_refusals():
    tok = tiny_tokenizer()
    eng = _engine(tok)
    with pytest.raises(RuntimeError, match="called without base_sync_done.*checkpoint_engine.backend=naive"):
        eng.get_per_tensor_param()
    eng.model_config.lora = {"merge": True}
    with pytest.raises(RuntimeError, match="model.lora.merge=True .* set model.lora.merge=False"):
        eng.get_per_tensor_param(base_sync_done=True)


def test_routed_vllm_is_registered_in_verl():
    import routed_lora.integrations.verl_rollout as vr
    from verl.workers.rollout import base, replica

    assert base._ROLLOUT_REGISTRY[("routed_vllm", "async")] == "verl.workers.rollout.vllm_rollout.ServerAdapter"
    assert replica.RolloutReplicaRegistry._registry["routed_vllm"] is vr._load_replica
    assert replica.RolloutReplicaRegistry._registry["vllm"] is not vr._load_replica  # veRL's own is untouched


def test_recorded_routes_are_used():
    tok = tiny_tokenizer()
    eng = _engine(tok)
    seqs = [torch.tensor(tok(t, add_special_tokens=False)["input_ids"]) for t in TEXTS]
    mb = _micro_batch(seqs)
    recorded = [torch.full((len(s),), i % 2) for i, s in enumerate(seqs)]
    mb["routes"] = torch.nested.nested_tensor(recorded, layout=torch.jagged)
    inputs, _ = eng.prepare_model_inputs(mb)
    assert torch.equal(inputs["routes"][0], torch.cat(recorded))


def test_engine_initialize_model_patch_runs(tmp_path):
    """veRL's engine ``initialize()`` -> ``_build_module`` applies ``apply_monkey_patch`` to the model, which
    imports trl's ``AutoModelForCausalLMWithValueHead`` (gone in trl 1.x: veRL 0.9.1 needs trl 0.27, its fsdp
    extra's pin). Run it in a fresh process (it patches module globals) on the tiny model."""
    import subprocess
    import sys

    code = (
        "from verl.models.transformers.monkey_patch import apply_monkey_patch\n"
        "from routed_lora.testing import tiny_model\n"
        "model = tiny_model('qwen2')\n"
        "apply_monkey_patch(model=model, use_remove_padding=True, ulysses_sp_size=1)\n"
        "print('patched')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0 and "patched" in proc.stdout, proc.stderr[-3000:]


def _sharded_sync_worker(rank, world, store):
    import torch.distributed as dist

    from _gloo import init_gloo
    from routed_lora.fsdp import shard_model

    torch.set_num_threads(1)
    init_gloo(rank, world, store)
    try:
        eng = _engine(tiny_tokenizer())  # same seeds on every rank: the same model
        want_named, want_cfg = eng.get_per_tensor_param(base_sync_done=True)
        want_base = dict(eng.get_per_tensor_param(base_sync_done=False)[0])
        shard_model(eng.module.get_base_model())  # FSDP2: every parameter a DTensor shard
        assert any(type(p).__name__ == "DTensor" for p in eng.module.parameters())
        named, cfg = eng.get_per_tensor_param(base_sync_done=True)  # a collective: every rank gathers
        base = dict(eng.get_per_tensor_param(base_sync_done=False)[0])
        assert cfg == want_cfg and [n for n, _ in named] == [n for n, _ in want_named]
        for (n, t), (_, w) in zip(named, want_named):
            assert type(t) is torch.Tensor and torch.equal(t, w), n
        assert sorted(base) == sorted(want_base)
        for n, w in want_base.items():
            assert type(base[n]) is torch.Tensor and torch.equal(base[n], w), n
    finally:
        dist.destroy_process_group()


def test_weight_sync_gathers_fsdp2_shards(tmp_path):
    """Under FSDP2 (fully_shard, 2 gloo processes) every rank's sync stream holds the full tensors, equal to the
    unsharded engine's."""
    import torch.multiprocessing as mp

    from _gloo import store_path

    mp.start_processes(_sharded_sync_worker, args=(2, store_path(tmp_path)), nprocs=2, start_method="fork")
