"""apply_routed_lora / remove_routed_lora / set_routes / disable_adapters / trainable_parameters on tiny HF models."""

import copy
import inspect

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

import routed_lora as rl  # noqa: E402
from routed_lora.hf import DEFAULT_TARGET_MODULES, routed_layers  # noqa: E402
from routed_lora.testing import FAMILIES, tiny_model, tiny_tokenizer  # noqa: E402

VOCAB = 40


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _randomize_lora(model, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in routed_layers(model):
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * scale)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * scale)


def _merged(base, patched, adapter):
    """A copy of the base model with adapter ``adapter`` merged into every targeted weight."""
    merged = copy.deepcopy(base)
    with torch.no_grad():
        for name, layer in routed_layers(patched):
            merged.get_submodule(name).weight.add_(layer.delta_weight(adapter))
    return merged


def _ids(batch=2, seq=7, seed=0):
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_apply_matches_merged_weights_each_family(family):
    base = tiny_model(family, vocab_size=VOCAB)
    model = rl.apply_routed_lora(tiny_model(family, vocab_size=VOCAB), r=4, lora_alpha=8)
    layers = routed_layers(model)
    assert len(layers) == 2 * len(DEFAULT_TARGET_MODULES)
    assert {n.rsplit(".", 1)[1] for n, _ in layers} == set(DEFAULT_TARGET_MODULES)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable), sorted(trainable)[:5]
    ids = _ids()
    with torch.no_grad():
        ref = base(ids).logits
        rl.set_routes(model, 0)  # fresh adapters (B = 0) change nothing
        torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=1e-6)
        _randomize_lora(model)
        for k, name in enumerate(("reasoning", "tool")):
            rl.set_routes(model, torch.full(ids.shape, k))
            out = model(ids).logits
            torch.testing.assert_close(out, _merged(base, model, name)(ids).logits, rtol=1e-4, atol=1e-4)
        rl.set_routes(model, -1)
        torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=1e-6)


def test_mixed_routes_reach_every_layer_per_token():
    base = tiny_model("llama", vocab_size=VOCAB)
    model = rl.apply_routed_lora(tiny_model("llama", vocab_size=VOCAB))
    _randomize_lora(model)
    ids = _ids(batch=2, seq=6)
    routes = torch.tensor([[0, 0, 1, 1, -1, 0], [1, 1, 1, 0, 0, -1]])
    rl.set_routes(model, routes)
    for name, layer in routed_layers(model):
        assert torch.equal(layer._routes.long(), routes), name
    with torch.no_grad():
        out = model(ids).logits
        # position p depends on routes <= p only (causal): the first 2 positions of row 0 equal the merged
        # reasoning model; row 1's first 3 the merged tool model.
        torch.testing.assert_close(out[0, :2], _merged(base, model, 0)(ids[:1, :2]).logits[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out[1, :3], _merged(base, model, 1)(ids[1:, :3]).logits[0], rtol=1e-4, atol=1e-4)
        # the routes= keyword of the model call does the same as set_routes, and persists
        rl.set_routes(model, 0)
        torch.testing.assert_close(model(ids, routes=routes).logits, out)
        torch.testing.assert_close(model(ids).logits, out)


def test_target_modules_peft_rule_and_errors():
    def names(**kw):
        m = rl.apply_routed_lora(tiny_model("qwen2", vocab_size=VOCAB), **kw)
        return [n for n, _ in routed_layers(m)]

    assert names(target_modules=["q_proj"]) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert names(target_modules=["layers.1.mlp.up_proj"]) == ["model.layers.1.mlp.up_proj"]
    assert names(target_modules=["model.layers.0.self_attn.v_proj"]) == ["model.layers.0.self_attn.v_proj"]
    assert names(target_modules=r".*\.1\.self_attn\.(q|v)_proj") == [
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    ]
    with pytest.raises(ValueError, match="matched no module"):
        rl.apply_routed_lora(tiny_model("qwen2", vocab_size=VOCAB), target_modules="q_proj")  # regex: full name
    with pytest.raises(ValueError, match="matched no module"):
        rl.apply_routed_lora(tiny_model("qwen2", vocab_size=VOCAB), target_modules=["proj"])  # no partial words
    all_lin = names(target_modules="all-linear")
    assert len(all_lin) == 14 and "lm_head" not in all_lin
    with pytest.raises(TypeError, match="not an nn.Linear"):
        rl.apply_routed_lora(tiny_model("qwen2", vocab_size=VOCAB), target_modules=["embed_tokens"])
    with pytest.raises(ValueError, match="invalid regex"):
        rl.apply_routed_lora(tiny_model("qwen2", vocab_size=VOCAB), target_modules="(")
    with pytest.raises(ValueError, match="r: expected"):
        rl.apply_routed_lora(tiny_model("qwen2", vocab_size=VOCAB), r=0)
    m = rl.apply_routed_lora(tiny_model("qwen2", vocab_size=VOCAB))
    with pytest.raises(ValueError, match="already has routed LoRA"):
        rl.apply_routed_lora(m)


def test_non_linear_target_is_refused_clearly():
    # (issue 12 made GPT-2's Conv1D routable, tests/test_arch.py; a non-linear target is still refused)
    from transformers import GPT2Config, GPT2LMHeadModel

    m = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=32))
    before = {n: type(x) for n, x in m.named_modules()}
    with pytest.raises(TypeError, match="Embedding, not an nn.Linear"):
        rl.apply_routed_lora(m, target_modules=["c_attn", "wte"])
    assert {n: type(x) for n, x in m.named_modules()} == before  # untouched
    assert all(p.requires_grad for p in m.parameters())


def test_remove_routed_lora_gives_back_shared_linear():
    model = tiny_model("qwen3", vocab_size=VOCAB)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
    weights = {n: m.weight for n, m in model.named_modules() if type(m) is nn.Linear}
    rl.apply_routed_lora(model)
    _randomize_lora(model)
    rl.remove_routed_lora(model)
    assert not any(isinstance(m, rl.RoutedLoRALinear) for m in model.modules())
    for n, w in weights.items():
        assert type(model.get_submodule(n)) is nn.Linear and model.get_submodule(n).weight is w, n
    assert all(p.requires_grad for p in model.parameters())
    assert not model._forward_pre_hooks and not model._forward_hooks
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)
    rl.apply_routed_lora(model)  # can be applied again


def test_disable_adapters_is_the_backbone_and_restores_routes():
    base = tiny_model("qwen2", vocab_size=VOCAB)
    model = rl.apply_routed_lora(tiny_model("qwen2", vocab_size=VOCAB))
    _randomize_lora(model)
    ids = _ids()
    routes = torch.ones_like(ids)
    rl.set_routes(model, routes)
    with torch.no_grad():
        adapted = model(ids).logits
        with rl.disable_adapters(model):
            torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=0, atol=1e-6)
            torch.testing.assert_close(model(ids, routes=routes).logits, base(ids).logits, rtol=0, atol=1e-6)
        assert torch.equal(model(ids).logits, adapted)


def test_trainable_parameters_and_per_adapter_lr_equal_separate_optimizers():
    model = rl.apply_routed_lora(tiny_model("qwen2", vocab_size=VOCAB), target_modules=["q_proj", "down_proj"])
    _randomize_lora(model)
    groups = rl.trainable_parameters(model)
    assert [g["name"] for g in groups] == ["routed_lora"] and groups[0]["adapters"] == ("reasoning", "tool")
    params = groups[0]["params"]
    assert len(params) == 8 and all(p.requires_grad for p in params)
    lrs = {"reasoning": 1e-2, "tool": 3e-2}
    opt = torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.1)
    rl.set_adapter_lr(opt, lrs)
    # the same maths with one leaf tensor per adapter slice and one optimizer group per adapter
    slices = [[p.detach()[e].clone().requires_grad_(True) for p in params] for e in range(2)]
    ref = torch.optim.AdamW(
        [{"params": slices[0], "lr": lrs["reasoning"]}, {"params": slices[1], "lr": lrs["tool"]}], weight_decay=0.1
    )
    ids = _ids()
    routes = torch.tensor([[0, 0, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0, 1]])
    for step in range(3):
        opt.zero_grad()
        loss = model(ids, routes=routes, labels=ids).loss
        loss.backward()
        for e in range(2):
            for p, s in zip(params, slices[e]):
                s.grad = p.grad[e].clone()
        opt.step()
        ref.step()
    for e in range(2):
        for p, s in zip(params, slices[e]):
            torch.testing.assert_close(p.detach()[e], s.detach(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="unknown adapters"):
        rl.set_adapter_lr(opt, {"nope": 1.0})


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_uses_routes_of_the_original_forward(reentrant):
    ids = _ids(batch=2, seq=9)
    r1 = torch.tensor([[0, 0, 1, 1, 1, 0, 0, -1, 0], [1, 1, 0, 0, 0, 1, 1, 1, 0]])
    r2 = 1 - r1.clamp(min=0)

    def grads(checkpointing, replace):
        model = rl.apply_routed_lora(tiny_model("qwen2", vocab_size=VOCAB))
        _randomize_lora(model)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        loss = model(ids, routes=r1, labels=ids, use_cache=False).loss
        if replace:
            # what GRPO does between loss and backward: another forward (the reference pass) with other routes
            rl.set_routes(model, r2)
            with torch.no_grad(), rl.disable_adapters(model):
                model(ids, use_cache=False)
        loss.backward()
        return [p.grad.clone() for g in rl.trainable_parameters(model) for p in g["params"]]

    ref = grads(False, False)
    assert any(g.abs().sum() > 0 for g in ref)
    for got in (grads(True, True), grads(True, False)):
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # the replaced routes would give other gradients: the test above is not vacuous
    model = rl.apply_routed_lora(tiny_model("qwen2", vocab_size=VOCAB))
    _randomize_lora(model)
    model(ids, routes=r2, labels=ids, use_cache=False).loss.backward()
    other = [p.grad for g in rl.trainable_parameters(model) for p in g["params"]]
    assert max((a - b).abs().max().item() for a, b in zip(other, ref)) > 1e-4


def test_gradient_checkpointing_with_router_between_loss_and_backward():
    tok = tiny_tokenizer()
    ids = tok(["who <search> paris city </search> is a", "<search> the capital </search> <answer> rome"],
              return_tensors="pt", padding=True)

    def grads(checkpointing):
        model = rl.apply_routed_lora(tiny_model("qwen2", vocab_size=len(tok)), router=rl.TagRouter(tok))
        _randomize_lora(model)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        loss = model(**ids, labels=ids.input_ids, use_cache=False).loss
        if checkpointing:  # a forward on other tokens changes every layer's routes before backward
            model(input_ids=torch.full_like(ids.input_ids, tok.convert_tokens_to_ids("<search>")), use_cache=False)
        loss.backward()
        return [p.grad.clone() for g in rl.trainable_parameters(model) for p in g["params"]]

    for a, b in zip(grads(True), grads(False)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_torch_compile_patched_model_aot_eager():
    """A training step through torch.compile (aot_eager: traces forward and backward, custom op included)
    gives the eager logits and gradients; the router hook runs eagerly (torch.compiler.disable)."""
    torch._dynamo.reset()
    tok = tiny_tokenizer()
    model = rl.apply_routed_lora(tiny_model("qwen2", vocab_size=len(tok), layers=1), router=rl.TagRouter(tok))
    _randomize_lora(model)
    model.train()
    enc = tok(["who <search> paris </search> is", "a b <search> rome"], return_tensors="pt", padding=True)
    params = rl.trainable_parameters(model)[0]["params"]
    out = model(**enc, use_cache=False).logits
    (out * out).mean().backward()
    ref = [p.grad.clone() for p in params]
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager")
    got = compiled(**enc, use_cache=False).logits
    (got * got).mean().backward()
    torch.testing.assert_close(got, out, rtol=1e-5, atol=1e-5)
    for a, p in zip(ref, params):
        torch.testing.assert_close(p.grad, a, rtol=1e-4, atol=1e-6)
    assert any(a.abs().sum() > 0 for a in ref)
    torch._dynamo.reset()


def test_bad_inputs():
    tok = tiny_tokenizer()
    model = rl.apply_routed_lora(tiny_model("qwen2", vocab_size=len(tok)), router=rl.TagRouter(tok))
    ids = tok(["who is"], return_tensors="pt").input_ids
    with pytest.raises(ValueError, match="without input_ids"):
        model(inputs_embeds=model.get_input_embeddings()(ids))
    out = model(inputs_embeds=model.get_input_embeddings()(ids), routes=torch.zeros_like(ids))  # explicit: fine
    assert out.logits.shape[:2] == ids.shape
    plain = tiny_model("qwen2", vocab_size=len(tok))
    with torch.no_grad():
        # filled by another model: the router has no state for it (the cache is `cache` in transformers >= 5.2x,
        # `past_key_values` in 5.10, veRL's pin)
        key = "cache" if "cache" in inspect.signature(plain.forward).parameters else "past_key_values"
        foreign = getattr(plain(ids, use_cache=True), key)
    with pytest.raises(RuntimeError, match="no state"):
        model(ids[:, :1], **{key: foreign})
    with pytest.raises(ValueError, match="values must be"):
        model(ids, routes=torch.full_like(ids, 2))
    with pytest.raises(ValueError, match="values must be"):
        rl.set_routes(model, 5)
    with pytest.raises(ValueError, match="has no routed LoRA"):
        rl.remove_routed_lora(plain)
    with pytest.raises(ValueError, match="no RoutedLoRALinear"):
        rl.trainable_parameters(plain)
    with pytest.raises(ValueError, match="no RoutedLoRALinear"):
        with rl.disable_adapters(plain):
            pass


def test_bf16_backbone_gets_float32_adapters_like_peft(tmp_path):
    model = rl.apply_routed_lora(tiny_model("qwen2", vocab_size=VOCAB, dtype=torch.bfloat16))
    layer = routed_layers(model)[0][1]
    assert layer.weight.dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32
    _randomize_lora(model)
    model.train()
    ids = _ids()
    model(ids, routes=torch.ones_like(ids), labels=ids).loss.backward()
    assert layer.lora_B.grad.dtype == torch.float32 and layer.lora_B.grad[1].abs().sum() > 0
    assert layer.lora_B.grad[0].abs().sum() == 0  # no token routed to adapter 0
    # PEFT keeps fp32 adapters on a bf16 base too. Against the float32 model with the same adapters, our bf16
    # error is within twice PEFT's bf16 error (DESIGN.md §4 rule).
    peft = pytest.importorskip("peft")
    rl.save_adapters(model, tmp_path)
    pm = peft.PeftModel.from_pretrained(tiny_model("qwen2", vocab_size=VOCAB, dtype=torch.bfloat16), tmp_path / "tool")
    f32 = rl.load_adapters(rl.apply_routed_lora(tiny_model("qwen2", vocab_size=VOCAB)), tmp_path)
    with torch.no_grad():
        exact = f32(ids, routes=torch.ones_like(ids)).logits
        peft_err = (pm(ids).logits.float() - exact).abs().max()
        err = (model.eval()(ids, routes=torch.ones_like(ids)).logits.float() - exact).abs().max()
    assert err <= 2 * peft_err + 1e-2, (err, peft_err)
    same = rl.apply_routed_lora(tiny_model("qwen2", vocab_size=VOCAB, dtype=torch.bfloat16),
                                adapter_dtype=torch.bfloat16)
    assert routed_layers(same)[0][1].lora_A.dtype == torch.bfloat16


def test_inner_base_model_called_directly_routes_by_itself():
    tok = tiny_tokenizer()
    model = rl.apply_routed_lora(tiny_model("qwen2", vocab_size=len(tok)), router=rl.TagRouter(tok))
    _randomize_lora(model)
    a = torch.tensor([tok("who <search> paris city </search> is a").input_ids])
    b = torch.tensor([tok("<search> the capital rome is a city").input_ids])
    assert a.shape == b.shape
    with torch.no_grad():
        ref = model(a).logits
        model(b)  # leaves b's routes on the layers
        hidden = model.model(a).last_hidden_state  # hidden states only: must route a, not reuse b's routes
        torch.testing.assert_close(model.lm_head(hidden), ref, rtol=1e-5, atol=1e-5)
        assert torch.equal(routed_layers(model)[0][1]._routes.long(), rl.hf.get_router(model)(a))
        rl.set_routes(model, 1)
        hidden = model.model(input_ids=a, routes=torch.zeros_like(a)).last_hidden_state  # explicit routes
        assert torch.equal(routed_layers(model)[0][1]._routes.long(), torch.zeros_like(a))
