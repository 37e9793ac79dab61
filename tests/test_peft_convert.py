"""peft_to_routed: a model built with peft.get_peft_model becomes routed in place. Oracle: PEFT itself (its
logits with the adapter active, and under disable_adapter()); bad input leaves the PEFT model untouched."""

from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

import routed_lora as rl  # noqa: E402
from routed_lora.testing import tiny_model  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]
IDS = torch.tensor([[5, 9, 3, 17, 22, 41, 8, 12, 30], [7, 7, 2, 19, 33, 4, 15, 60, 1]])


def _peft_model(extra=None, **kw):
    from peft import LoraConfig, get_peft_model

    model = tiny_model("qwen2", vocab_size=64, hidden=32, layers=2, seed=0)
    cfg = dict(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0)
    cfg.update(kw)
    pm = get_peft_model(model, LoraConfig(**cfg), adapter_name="reasoning" if extra is not None else "default")
    if extra is not None:
        pm.add_adapter("tool", LoraConfig(**{**cfg, **extra}))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return pm.eval()


def _logits(m, **kw):
    with torch.no_grad():
        return m(input_ids=IDS, **kw).logits


def test_single_adapter_converted_in_place(one_thread):
    pm = _peft_model()
    want = _logits(pm)
    with pm.disable_adapter():
        backbone = _logits(pm)
    q = pm.get_base_model().model.layers[0].self_attn.q_proj
    w_ptr = q.base_layer.weight.data_ptr()
    assert rl.peft_to_routed(pm, adapters=("reasoning", "tool")) is pm
    layer = pm.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(layer, rl.RoutedLoRALinear) and layer.weight.data_ptr() == w_ptr  # same tensor, no copy
    assert len(rl.hf.routed_layers(pm.get_base_model())) == 2 * len(TARGETS)
    for e in (0, 1):  # every routed adapter starts as a copy of PEFT's single adapter
        got = _logits(pm, routes=torch.full_like(IDS, e))
        assert (got - want).abs().max() <= 1e-5, f"adapter {e}: {(got - want).abs().max():.3g}"
    assert (_logits(pm, routes=torch.full_like(IDS, -1)) - backbone).abs().max() <= 1e-6
    # PEFT's reference-pass context still gives the backbone, and the adapters come back after it
    rl.set_routes(pm, 0)
    with pm.disable_adapter():
        assert (_logits(pm) - backbone).abs().max() <= 1e-6
    assert (_logits(pm) - want).abs().max() <= 1e-5
    pm.base_model.disable_adapter_layers()
    assert (_logits(pm) - backbone).abs().max() <= 1e-6
    pm.base_model.enable_adapter_layers()
    assert (_logits(pm) - want).abs().max() <= 1e-5
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert len(trainable) == 2 * 2 * len(TARGETS)


def test_named_adapters_map_to_their_namesakes(one_thread, tmp_path):
    pm = _peft_model(extra={})
    pm.set_adapter("tool")
    want_tool = _logits(pm)
    pm.set_adapter("reasoning")
    want_reasoning = _logits(pm)
    assert (want_tool - want_reasoning).abs().max() > 1e-3
    rl.peft_to_routed(pm, adapters=("reasoning", "tool"))
    assert (_logits(pm, routes=torch.zeros_like(IDS)) - want_reasoning).abs().max() <= 1e-5
    assert (_logits(pm, routes=torch.ones_like(IDS)) - want_tool).abs().max() <= 1e-5
    # gradients reach only the adapter that owns the tokens
    out = pm(input_ids=IDS, routes=torch.ones_like(IDS)).logits.square().mean()
    out.backward()
    layer = pm.get_base_model().model.layers[1].mlp.down_proj
    assert layer.lora_B.grad[0].abs().max() == 0 and layer.lora_B.grad[1].abs().max() > 0
    # saved with routed_lora: PEFT loads the folder and gives the same logits
    rl.save_adapters(pm.get_base_model(), tmp_path / "ad")
    fresh = tiny_model("qwen2", vocab_size=64, hidden=32, layers=2, seed=0)
    loaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "ad" / "tool").eval()
    assert (_logits(loaded) - want_tool).abs().max() <= 1e-5
    with pytest.raises(RuntimeError, match="save_adapters"):
        pm.save_pretrained(tmp_path / "peft")
    with pytest.raises(RuntimeError, match="peft_to_routed"):
        pm.merge_and_unload()


def test_router_routes_through_the_peft_call(one_thread):
    from routed_lora.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    from peft import LoraConfig, get_peft_model

    model = tiny_model("qwen2", vocab_size=len(tok), hidden=32, layers=1, seed=0)
    pm = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"])).eval()
    router = rl.TagRouter(tok)
    rl.peft_to_routed(pm, router=router)
    with torch.no_grad():
        for layer in (m for m in pm.modules() if isinstance(m, rl.RoutedLoRALinear)):
            layer.lora_B.normal_(0, 0.3)
    ids = torch.tensor([tok("who is <search> alice </search> yes", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        self_routed = pm(input_ids=ids).logits
        explicit = pm(input_ids=ids, routes=router(ids)).logits
    assert torch.equal(self_routed, explicit)
    gen = pm.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert gen.shape[1] == ids.shape[1] + 3


@pytest.mark.parametrize("extra,match", [
    (dict(r=8, lora_alpha=16), "different ranks"),
    (dict(lora_alpha=16), "different scalings"),
    (dict(target_modules=["q_proj", "v_proj"]), "target different modules"),
])
def test_mismatched_adapters_are_refused_untouched(extra, match):
    pm = _peft_model(extra=extra)
    before = [(n, type(m)) for n, m in pm.named_modules()]
    with pytest.raises(ValueError, match=match):
        rl.peft_to_routed(pm, adapters=("reasoning", "tool"))
    assert [(n, type(m)) for n, m in pm.named_modules()] == before
    assert not any(isinstance(m, rl.RoutedLoRALinear) for m in pm.modules())


@pytest.mark.parametrize("kw,match", [
    (dict(lora_dropout=0.1), "lora_dropout"),
    (dict(use_dora=True), "use_dora"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
])
def test_unsupported_peft_options(kw, match):
    pm = _peft_model(**kw)
    with pytest.raises(ValueError, match=match):
        rl.peft_to_routed(pm)
    assert not any(isinstance(m, rl.RoutedLoRALinear) for m in pm.modules())


def test_bad_arguments():
    with pytest.raises(TypeError, match="peft.PeftModel"):
        rl.peft_to_routed(tiny_model("qwen2", vocab_size=64))
    pm = _peft_model(extra={})
    with pytest.raises(ValueError, match="name the routed adapters"):
        rl.peft_to_routed(pm, adapters=("a", "b"))
    rl.peft_to_routed(pm, adapters=("reasoning", "tool"))
    with pytest.raises(ValueError, match="already converted"):
        rl.peft_to_routed(pm, adapters=("reasoning", "tool"))
