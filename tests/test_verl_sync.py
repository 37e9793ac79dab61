"""The weight-sync payload of the veRL engine (routed_lora/integrations/verl_sync.py; no veRL or vLLM needed):
every adapter's tensors under the PEFT names save_adapters writes + @routed_lora/<adapter>, one PEFT config
listing the adapters and the router; the receiving side splits it back exactly and refuses incomplete or foreign
streams; the base stream is the backbone's state dict without the LoRA tensors."""

from __future__ import annotations

import pytest
import torch

import routed_lora as rl
from routed_lora.integrations import verl_sync as vs
from routed_lora.testing import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def routed():
    tok = tiny_tokenizer()
    model = tiny_model("qwen2", vocab_size=len(tok), hidden=32, layers=2, seed=0)
    router = rl.TagRouter(tok, default="reasoning")
    rl.apply_routed_lora(model, r=4, lora_alpha=8, router=router)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in rl.hf.routed_layers(model):
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g))
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))
    return model, router


def test_payload_matches_saved_adapters(routed, tmp_path):
    from safetensors.torch import load_file

    model, router = routed
    named, cfg = vs.lora_payload(model)
    assert vs.is_routed_config(cfg)
    meta = cfg[vs.ROUTED_KEY]
    assert meta["adapters"] == ["reasoning", "tool"] and meta["router"] == router.to_dict()
    rl.save_adapters(model, tmp_path / "a")
    per, plain, meta2 = vs.split_payload(named, cfg)
    assert meta2 == meta and vs.ROUTED_KEY not in plain
    import json

    for a in ("reasoning", "tool"):
        saved = load_file(tmp_path / "a" / a / "adapter_model.safetensors")
        assert sorted(saved) == sorted(per[a])
        for k, t in saved.items():
            assert torch.equal(t, per[a][k]), k
        assert json.loads((tmp_path / "a" / a / "adapter_config.json").read_text()) == plain
    # the adapters differ (each its own row of the stacked parameters)
    k = next(iter(per["tool"]))
    assert not torch.equal(per["tool"][k], per["reasoning"][k])


def test_split_refuses_incomplete_and_foreign_streams(routed):
    model, _ = routed
    named, cfg = vs.lora_payload(model)
    with pytest.raises(vs.SyncPayloadError, match="peft_config: expected a dict with a 'routed_lora' entry"):
        vs.split_payload(named, {k: v for k, v in cfg.items() if k != vs.ROUTED_KEY})
    with pytest.raises(vs.SyncPayloadError, match="adapter 'tool': 1 tensors, 'reasoning' has"):
        vs.split_payload([x for x in named if not x[0].endswith("@routed_lora/tool")] + named[-1:], cfg)
    with pytest.raises(vs.SyncPayloadError, match="adapter 'tool': no tensors"):
        vs.split_payload([x for x in named if not x[0].endswith("@routed_lora/tool")], cfg)
    with pytest.raises(vs.SyncPayloadError, match="expected a name base_model.model...@routed_lora/<adapter>"):
        vs.split_payload([("base_model.model.x.lora_A.weight", torch.zeros(1))], cfg)
    with pytest.raises(vs.SyncPayloadError, match="adapter 'other' is not among"):
        vs.split_payload([("base_model.model.x.lora_A.weight@routed_lora/other", torch.zeros(1))], cfg)
    with pytest.raises(vs.SyncPayloadError, match="expected base_model.model.<module>.lora_A/B.weight before"):
        vs.split_payload([("model.x.weight@routed_lora/tool", torch.zeros(1))], cfg)
    bad = dict(cfg, routed_lora=dict(cfg[vs.ROUTED_KEY], version=99))
    with pytest.raises(vs.SyncPayloadError, match="'version'\\]: expected 1, got 99"):
        vs.split_payload(named, bad)


def test_payload_needs_a_tag_router(routed):
    model, _ = routed
    with pytest.raises(ValueError, match="needs a routed_lora.TagRouter .* got function"):
        vs.lora_payload(model, router=lambda ids, att=None: ids * 0)


def test_base_stream_is_the_backbone(routed):
    model, _ = routed
    names = dict(vs.base_tensors(model))
    assert not any(n.endswith(("lora_A", "lora_B")) for n in names)
    plain = tiny_model("qwen2", vocab_size=model.config.vocab_size, hidden=32, layers=2, seed=0)
    ref = plain.state_dict()
    assert sorted(names) == sorted(ref)
    for n, t in ref.items():
        assert torch.equal(names[n], t), n
