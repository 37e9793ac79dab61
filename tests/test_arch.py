"""More architectures and compile: GPT-2 Conv1D targets (the saved folder loads in PEFT with equal logits),
default targets covering Phi-3's fused projections (a warning names linear modules left out), and a whole
patched model with explicit routes= under torch.compile(fullgraph=True)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

import routed_lora as rl  # noqa: E402
from routed_lora.testing import tiny_model  # noqa: E402

IDS = torch.tensor([[5, 9, 3, 17, 22, 41, 8, 12, 30], [7, 7, 2, 19, 33, 4, 15, 60, 1]])


def _gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


def _randomise(model, std=0.2, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(std * torch.randn(p.shape, generator=g))


def test_gpt2_conv1d_targets_load_in_peft(one_thread, tmp_path):
    peft = pytest.importorskip("peft")
    model = _gpt2()
    with torch.no_grad():
        plain = model(input_ids=IDS).logits
    conv = model.transformer.h[0].attn.c_attn
    rl.apply_routed_lora(model, target_modules=["c_attn", "c_proj", "c_fc"], r=4, lora_alpha=8)
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, rl.RoutedLoRALinear) and (layer.in_features, layer.out_features) == (32, 96)
    assert layer.weight.data_ptr() == conv.weight.data_ptr()  # a transposed view, no copy
    assert len(rl.hf.routed_layers(model)) == 2 * 4
    with torch.no_grad():
        assert (model(input_ids=IDS, routes=-1).logits - plain).abs().max() <= 1e-5
    _randomise(model)
    with torch.no_grad():
        ours = model(input_ids=IDS, routes=torch.ones_like(IDS)).logits
    assert (ours - plain).abs().max() > 1e-3
    rl.save_adapters(model, tmp_path / "ad")
    import json

    assert json.loads((tmp_path / "ad" / "tool" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = peft.PeftModel.from_pretrained(_gpt2(), tmp_path / "ad" / "tool").eval()
    assert not [w for w in caught if "fan_in_fan_out" in str(w.message)], "PEFT had to correct the config"
    with torch.no_grad():
        theirs = loaded(input_ids=IDS).logits
    assert (theirs - ours).abs().max() <= 1e-5, f"PEFT vs routed: {(theirs - ours).abs().max():.3g}"
    # and back: load_adapters into a fresh patched GPT-2, then remove_routed_lora gives the original Conv1D
    fresh = _gpt2()
    rl.load_adapters(fresh, tmp_path / "ad")
    with torch.no_grad():
        assert (fresh(input_ids=IDS, routes=torch.ones_like(IDS)).logits - ours).abs().max() <= 1e-5
    rl.remove_routed_lora(fresh)
    assert type(fresh.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    assert fresh.transformer.h[0].attn.c_attn.weight.shape == (32, 96)
    with torch.no_grad():
        assert (fresh(input_ids=IDS).logits - plain).abs().max() <= 1e-6


def test_peft_made_gpt2_adapter_loads_into_routed_gpt2(one_thread, tmp_path):
    """A folder PEFT itself writes for GPT-2 says fan_in_fan_out=True (Conv1D weights are stored (in, out));
    A and B keep the nn.Linear layout, so it loads and gives PEFT's logits."""
    peft = pytest.importorskip("peft")
    targets = ["c_attn", "c_proj", "c_fc"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(_gpt2(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                          fan_in_fan_out=True))
    _randomise(pm)
    pm.eval()
    pm.save_pretrained(tmp_path / "p")
    import json

    assert json.loads((tmp_path / "p" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    with torch.no_grad():
        theirs = pm(input_ids=IDS).logits
    model = _gpt2()
    rl.apply_routed_lora(model, target_modules=targets, r=4, lora_alpha=8)
    rl.load_adapters(model, tmp_path / "p", adapter="tool")
    with torch.no_grad():
        ours = model(input_ids=IDS, routes=torch.ones_like(IDS)).logits
        base = model(input_ids=IDS, routes=-1).logits
    assert (theirs - base).abs().max() > 1e-3  # the adapter matters
    assert (ours - theirs).abs().max() <= 1e-5, f"{(ours - theirs).abs().max():.3g}"


def test_phi3_default_targets_cover_fused_projections(one_thread):
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    model = Phi3ForCausalLM(Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                                       pad_token_id=0)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rl.apply_routed_lora(model)
    names = {n.rsplit(".", 1)[-1] for n, _ in rl.hf.routed_layers(model)}
    assert names == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}


def test_default_targets_warn_naming_left_out_linears():
    model = tiny_model("qwen2", vocab_size=64, hidden=32, layers=1)
    model.model.layers[0].mlp.router_gate = nn.Linear(32, 4)  # a linear the defaults do not name
    with pytest.warns(UserWarning, match=r"leave out 1 linear modules.*model\.layers\.0\.mlp\.router_gate"):
        rl.apply_routed_lora(model)
    explicit = tiny_model("qwen2", vocab_size=64, hidden=32, layers=1)
    explicit.model.layers[0].mlp.router_gate = nn.Linear(32, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rl.apply_routed_lora(explicit, target_modules=["q_proj"])  # an explicit choice: no warning


def test_whole_model_compiles_fullgraph_with_explicit_routes(one_thread):
    torch._dynamo.reset()
    model = tiny_model("qwen2", vocab_size=64, hidden=32, layers=2)
    rl.apply_routed_lora(model, r=2, lora_alpha=4)
    _randomise(model)
    routes = torch.randint(-1, 2, IDS.shape, generator=torch.Generator().manual_seed(2))
    ref = model(input_ids=IDS, routes=routes).logits
    ref.square().mean().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(input_ids=IDS, routes=routes).logits
    out.square().mean().backward()
    assert (out - ref).abs().max() <= 1e-5
    for n, g in ref_grads.items():
        p = dict(model.named_parameters())[n]
        assert (p.grad - g).abs().max() <= 1e-5 * g.abs().max().clamp_min(1e-12), n
    # other routes on the next call are used (not baked into the graph)
    other = compiled(input_ids=IDS, routes=torch.zeros_like(IDS)).logits
    assert (other - model(input_ids=IDS, routes=torch.zeros_like(IDS)).logits).abs().max() <= 1e-5
    assert (other - out).abs().max() > 1e-4


def test_compiled_model_with_router_needs_routes_for_fullgraph():
    from routed_lora.testing import tiny_tokenizer

    torch._dynamo.reset()
    tok = tiny_tokenizer()
    model = tiny_model("qwen2", vocab_size=len(tok), hidden=32, layers=1)
    router = rl.TagRouter(tok)
    rl.apply_routed_lora(model, r=2, lora_alpha=4, router=router)
    ids = torch.tensor([[3, 20, 21, 5, 22]])
    with pytest.raises(Exception, match="torch.compiler.disable"):  # the router is a graph break
        torch.compile(model, fullgraph=True, backend="eager")(input_ids=ids)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        got = compiled(input_ids=ids, routes=router(ids)).logits
        assert torch.equal(got, model(input_ids=ids).logits)
