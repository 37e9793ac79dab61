"""FSDP2 (torch's fully_shard) and DDP on CPU with gloo, 2 and 3 processes (3 > the 2 adapters, so one rank
holds an empty shard of every adapter tensor): one GRPO update equals the one-process update on the same global
batch, the saved adapter folder and checkpoint equal the one-process ones, load_adapters and resume work, and the
public helpers (set_adapter_lr, trainable_parameters, disable_adapters, set_routes, the router, generation)
work on the sharded model. Helpers that cannot work on a sharded model raise a clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _gloo import init_gloo, store_path

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

Q, G, L = 12, 2, 14  # questions x rollouts; (Q / N) % mini_batches == 0 for N = 1, 2, 3
LRS = {"reasoning": 1e-2, "tool": 3e-3}


def _start(fn, args, nprocs):
    """Run ``fn(rank, *args)`` in ``nprocs`` processes forked from a forkserver that imported torch,
    transformers and the package once for the whole session (spawning fresh interpreters costs ~10-40 s of
    imports per test on a loaded 2-core machine; a fork from a server that never ran a parallel region is safe)."""
    import multiprocessing

    import torch.multiprocessing as mp

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed.fsdp", "transformers", "safetensors.torch",
                                "routed_lora", "routed_lora.grpo.trainer", "routed_lora.testing",
                                "transformers.models.qwen2.modeling_qwen2", "test_fsdp2"])
    mp.start_processes(fn, args=args, nprocs=nprocs, join=True, start_method="forkserver")


def _model(seed=0):
    import routed_lora as rl
    from routed_lora.testing import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_model("qwen2", vocab_size=len(tok), hidden=16, layers=2, seed=seed)
    router = rl.TagRouter(tok)
    torch.manual_seed(seed)  # lora_A's initialisation
    rl.apply_routed_lora(model, target_modules=("q_proj", "v_proj", "down_proj"), r=2, lora_alpha=4, router=router)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model, tok, router


def _cfg():
    from routed_lora.grpo.trainer import GRPOConfig

    return GRPOConfig(group_size=G, prompts_per_step=Q, beta=0.05, lr=max(LRS.values()), lr_tool=LRS["tool"],
                      mini_batches=2, micro_batch_size=5, max_total_tokens=L, epochs=1).check()


def _batch(tok, seed):
    from routed_lora.grpo.trainer import RolloutBatch

    g = torch.Generator().manual_seed(seed)
    s_open, s_close = tok.convert_tokens_to_ids("<search>"), tok.convert_tokens_to_ids("</search>")
    B = Q * G
    ids = torch.randint(12, len(tok), (B, L), generator=g)
    att = torch.ones(B, L, dtype=torch.long)
    for b in range(B):
        ids[b, 5], ids[b, 8] = s_open, s_close
        pad = int(torch.randint(0, 3, (1,), generator=g))
        if pad:
            ids[b, -pad:], att[b, -pad:] = 0, 0
    mask = att[:, 1:].bool().clone()
    mask[:, :3] = False  # prompt
    return RolloutBatch(input_ids=ids, attention_mask=att, loss_mask=mask,
                        rewards=torch.rand(B, generator=g).round(), group_ids=torch.arange(Q).repeat_interleave(G),
                        em=torch.zeros(B), tool_calls=torch.ones(B), response_len=torch.full((B,), float(L)))


def _rows(rank, world):
    share = Q // world
    return list(range(rank * share * G, (rank + 1) * share * G))


def _probe_outputs(model, tok):
    """Logits of the public helpers on a fixed input: the router (self-routed), set_routes, disable_adapters."""
    import routed_lora as rl

    ids = torch.tensor([tok("who was born in paris ? <search> alice born </search> yes", add_special_tokens=False)
                        ["input_ids"]])
    with torch.no_grad():
        self_routed = model(input_ids=ids).logits
        explicit = model(input_ids=ids, routes=torch.ones_like(ids)).logits
        with rl.disable_adapters(model):
            backbone = model(input_ids=ids).logits
    return {"self_routed": self_routed, "explicit": explicit, "backbone": backbone}


def _run(rank, world, strategy, out: Path):
    """The sequence both the reference (world 1) and the workers run; returns tensors to compare."""
    import routed_lora as rl
    from routed_lora.fsdp import full_params, shard_model
    from routed_lora.grpo.logprobs import routes_for
    from routed_lora.grpo.trainer import AdapterOptimizer, adapter_state, grpo_update, load_checkpoint, \
        save_checkpoint

    cfg = _cfg()
    res = {}

    def wrap(model):
        if world == 1:
            return model
        if strategy == "fsdp2":
            shard_model(model)
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model)

    model, tok, router = _model()
    ddp = wrap(model)
    res.update({f"probe/{k}": v for k, v in _probe_outputs(model, tok).items()})
    groups = rl.trainable_parameters(model)
    assert len(groups) == 1 and len(groups[0]["params"]) == 12
    opt = AdapterOptimizer(model, LRS)
    with full_params(model):  # ranks generate different lengths: no collective inside
        gen = model.generate(input_ids=torch.tensor([[3, 20, 21]]), max_new_tokens=2 + rank, do_sample=False,
                             pad_token_id=0)
    assert gen.shape[1] == 5 + rank
    for step, seed in ((1, 10), (2, 11)):
        batch = _batch(tok, seed).select(_rows(rank, world))
        routes = routes_for(batch.input_ids, batch.attention_mask, router=router)
        res[f"metrics{step}"] = grpo_update(model, ddp, opt, batch, routes, _cfg())
        res[f"state{step}"] = adapter_state(model)
        if step == 1:
            rl.save_adapters(model, out / "adapters")
            save_checkpoint(out / "ckpt", model=model, optimizer=opt, step=1, cfg=cfg)
            # resume: a fresh model (other initial adapters), wrapped the same way, restored from the checkpoint
            model, tok, router = _model(seed=5)
            ddp = wrap(model)
            rl.load_adapters(model, out / "adapters")
            res["loaded"] = adapter_state(model)
            opt = AdapterOptimizer(model, LRS)
            load_checkpoint(out / "ckpt", model=model, optimizer=opt)
    return res


def _worker(rank, world, store, strategy, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    init_gloo(rank, world, store)
    try:
        res = _run(rank, world, strategy, Path(out))
        if rank == 0:
            torch.save(res, Path(out) / "result.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("one_process")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(0, 1, "none", out), out
    finally:
        torch.set_num_threads(n)


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("strategy,world", [("fsdp2", 2), ("fsdp2", 3), ("ddp", 2)])
def test_distributed_update_equals_one_process(reference, tmp_path, strategy, world):
    from safetensors.torch import load_file

    ref, ref_out = reference
    _start(_worker, (world, store_path(tmp_path), strategy, str(tmp_path)), world)
    got = torch.load(tmp_path / "result.pt", weights_only=False)
    for k in ("probe/self_routed", "probe/explicit", "probe/backbone"):
        assert _rel(got[k], ref[k]) <= 1e-5, f"{k}: {strategy} x{world} differs from one process by {_rel(got[k], ref[k]):.3g}"
    for step in ("state1", "state2", "loaded"):
        worst = max(_rel(got[step][n], ref[step][n]) for n in ref[step])
        assert worst <= 1e-5, f"{step}: adapters differ from one process by {worst:.3g} (relative)"
    m1, r1 = got["metrics1"], ref["metrics1"]
    assert m1["rollouts"] == r1["rollouts"] == Q * G and m1["updates"] == r1["updates"] == 2
    assert abs(m1["loss"] - r1["loss"]) <= 1e-5 * max(1.0, abs(r1["loss"]))
    for name in ("reasoning", "tool"):
        assert abs(m1[f"grad_norm/{name}"] - r1[f"grad_norm/{name}"]) <= 1e-5 * r1[f"grad_norm/{name}"]
    # the adapter folder written once by rank 0 equals the one-process folder, tensor for tensor
    for name in ("reasoning", "tool"):
        a = load_file(tmp_path / "adapters" / name / "adapter_model.safetensors")
        b = load_file(ref_out / "adapters" / name / "adapter_model.safetensors")
        assert a.keys() == b.keys() and max(_rel(a[k], b[k]) for k in b) <= 1e-5
        assert json.loads((tmp_path / "adapters" / name / "adapter_config.json").read_text()) == \
            json.loads((ref_out / "adapters" / name / "adapter_config.json").read_text())
    assert not list(tmp_path.glob(".adapters.tmp-*"))


def test_update_moved_both_adapters(reference):
    ref, _ = reference
    from routed_lora.testing import tiny_tokenizer  # noqa: F401

    s0 = _model()[0]
    from routed_lora.grpo.trainer import adapter_state

    init = adapter_state(s0)
    for name in init:
        d = (ref["state1"][name] - init[name]).abs().flatten(1).amax(1)
        assert bool((d > 0).all()), f"{name}: an adapter did not move in the one-process update"


def _sharded_errors_worker(rank, world, store, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    init_gloo(rank, world, store)
    try:
        import routed_lora as rl
        from routed_lora.fsdp import shard_model
        from routed_lora.testing import tiny_model

        errors = {}
        model, _, _ = _model()
        shard_model(model)
        for name, fn in (("remove", lambda: rl.remove_routed_lora(model)),
                         ("shard_twice", lambda: shard_model(model))):
            try:
                fn()
            except ValueError as exc:
                errors[name] = str(exc)
        plain = tiny_model("qwen2", vocab_size=64, hidden=16, layers=1)
        shard_model(plain)
        try:
            rl.apply_routed_lora(plain)
        except ValueError as exc:
            errors["apply"] = str(exc)
        if rank == 0:
            Path(out, "errors.json").write_text(json.dumps(errors))
    finally:
        dist.destroy_process_group()


def test_sharded_model_clear_errors(tmp_path):
    _start(_sharded_errors_worker, (2, store_path(tmp_path), str(tmp_path)), 2)
    errors = json.loads((tmp_path / "errors.json").read_text())
    assert set(errors) == {"remove", "shard_twice", "apply"}
    for name, msg in errors.items():
        assert "fully_shard" in msg and "before fully_shard" in msg, (name, msg)


def _trainer_worker(rank, world, store, world_dir, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    init_gloo(rank, world, store)
    try:
        import routed_lora as rl
        from routed_lora.env.data import load_qa
        from routed_lora.env.retriever import BM25Retriever
        from routed_lora.grpo.trainer import GRPOConfig, Trainer, adapter_state, build_policy, \
            load_model_and_tokenizer

        def trainer(steps):
            cfg = GRPOConfig(steps=steps, prompts_per_step=4, group_size=2, max_turns=1, max_new_tokens=6,
                             max_total_tokens=32, lr=1e-2, beta=0.01, mini_batches=2, micro_batch_size=4,
                             save_every=1, seed=3, target_modules=("q_proj", "v_proj")).check()
            torch.manual_seed(0)
            model, tok = load_model_and_tokenizer(Path(world_dir) / "model")
            model, router = build_policy(model, tok, cfg)
            return Trainer(cfg, model, tok, router, BM25Retriever(Path(world_dir) / "corpus.jsonl"),
                           load_qa(Path(world_dir) / "train.jsonl"), out=Path(out), progress=False,
                           reward_fn=lambda text, golds: float(len(text) % 2), strategy="fsdp2")

        tr = trainer(1)
        tr.train(evaluate_before=False, evaluate_after=False)
        tr = trainer(2)
        res = tr.train(resume=True, evaluate_before=False, evaluate_after=False)
        rl.save_adapters(tr.model, Path(out) / "adapters")
        state = adapter_state(tr.model)
        if rank == 0:
            torch.save({"state": state, "steps": res["steps"], "rollouts": res["last"]["rollouts"]},
                       Path(out) / "trainer.pt")
    finally:
        dist.destroy_process_group()


def test_trainer_strategy_fsdp2_trains_and_resumes(tmp_path):
    """The Trainer's --strategy fsdp2 path end to end at 2 processes: rollouts with the parameters gathered
    (ranks generate different lengths), updates, checkpoint every step, resume, adapters saved once."""
    pytest.importorskip("bm25s")
    import routed_lora as rl
    from routed_lora.grpo.trainer import adapter_state, load_model_and_tokenizer
    from routed_lora.testing import tiny_world

    wd = tiny_world(tmp_path / "world", layers=2)
    out = tmp_path / "run"
    _start(_trainer_worker, (2, store_path(tmp_path), str(wd), str(out)), 2)
    got = torch.load(out / "trainer.pt", weights_only=False)
    assert got["steps"] == 2 and got["rollouts"] == 4 * 2
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    model, _ = load_model_and_tokenizer(wd / "model")
    rl.load_adapters(model, out / "adapters")  # the folder rank 0 wrote holds the gathered adapters
    loaded = adapter_state(model)
    assert loaded.keys() == got["state"].keys()
    assert all(torch.equal(loaded[k], got["state"][k]) for k in loaded)
