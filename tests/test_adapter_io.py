"""save_adapters / load_adapters: PEFT-format folders, PEFT as the oracle (same logits), all-or-nothing loads."""

import json
import os

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from safetensors.torch import load_file, save_file  # noqa: E402

import routed_lora as rl  # noqa: E402
from routed_lora import adapter_io  # noqa: E402
from routed_lora.hf import routed_layers  # noqa: E402
from routed_lora.testing import tiny_model, tiny_tokenizer  # noqa: E402

VOCAB = 40


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _patched(family="qwen2", seed=0, lora_seed=1, **kw):
    model = rl.apply_routed_lora(tiny_model(family, vocab_size=VOCAB, seed=seed), **kw)
    g = torch.Generator().manual_seed(lora_seed)
    with torch.no_grad():
        for _, layer in routed_layers(model):
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.3)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)
    return model


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


IDS = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))


def _logits(model, routes=None):
    with torch.no_grad():
        return model(IDS, routes=routes).logits if routes is not None else model(IDS).logits


def test_files_follow_peft_layout(tmp_path):
    tok = tiny_tokenizer()
    model = rl.apply_routed_lora(tiny_model("qwen2", vocab_size=len(tok)), r=4, lora_alpha=8,
                                 router=rl.TagRouter(tok))
    out = rl.save_adapters(model, tmp_path / "ad")
    assert sorted(os.listdir(out)) == ["reasoning", "routed_lora.json", "tool"]
    manifest = json.loads((out / "routed_lora.json").read_text())
    assert manifest["adapters"] == ["reasoning", "tool"] and manifest["r"] == 4
    assert manifest["router"]["spans"] == [["tool", ["<search>", "</search>"]]]
    assert rl.TagRouter.from_dict(tok, manifest["router"], adapters=manifest["adapters"])(
        torch.tensor(tok("a <search> b </search>").input_ids)).tolist() == [0, 1, 1, 0]
    cfg = json.loads((out / "tool" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["use_rslora"] is False
    assert cfg["target_modules"] == sorted(rl.hf.DEFAULT_TARGET_MODULES)
    sd = load_file(out / "tool" / "adapter_model.safetensors")
    assert len(sd) == 2 * 14
    assert tuple(sd["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"].shape) == (4, 64)
    assert tuple(sd["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].shape) == (32, 4)
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]


@pytest.mark.parametrize(
    "family,kw",
    [
        ("qwen2", {}),
        ("llama", {"use_rslora": True, "r": 4, "lora_alpha": 6}),
        ("qwen3", {"target_modules": r"model\.layers\.1\.(self_attn\.q_proj|mlp\.up_proj)"}),
    ],
)
def test_peft_loads_our_folders_with_the_same_logits(tmp_path, family, kw):
    model = _patched(family, **kw)
    rl.save_adapters(model, tmp_path)
    for e, name in enumerate(("reasoning", "tool")):
        base = tiny_model(family, vocab_size=VOCAB)
        pm = peft.PeftModel.from_pretrained(base, tmp_path / name)
        with torch.no_grad():
            ref = pm(IDS).logits
        torch.testing.assert_close(_logits(model, torch.full_like(IDS, e)), ref, rtol=1e-5, atol=1e-5)
        assert (ref - _logits(model, torch.full_like(IDS, -1))).abs().max() > 1e-3  # adapters matter


def test_round_trip_is_exact_and_partial_adapter_list(tmp_path):
    model = _patched(lora_seed=1)
    rl.save_adapters(model, tmp_path / "a")
    other = _patched(lora_seed=2)
    assert rl.load_adapters(other, tmp_path / "a") is other
    assert _same(_snapshot(other), _snapshot(model))
    # only the tool adapter
    third = _patched(lora_seed=3)
    before = _snapshot(third)
    rl.save_adapters(model, tmp_path / "b", adapters=["tool"])
    rl.load_adapters(third, tmp_path / "b")
    for (_, a), (_, b), (n, c) in zip(routed_layers(third), routed_layers(model), routed_layers(third)):
        assert torch.equal(a.lora_A[1], b.lora_A[1]) and torch.equal(a.lora_B[1], b.lora_B[1])
        assert torch.equal(a.lora_A[0], before[f"{n}.lora_A"][0])
    # overwrite in place: the new save replaces the old one atomically, file by file
    rl.save_adapters(third, tmp_path / "a")
    fresh = _patched(lora_seed=4)
    rl.load_adapters(fresh, tmp_path / "a")
    assert _same(_snapshot(fresh), _snapshot(third))
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]


@pytest.mark.parametrize("rslora", [False, True])
def test_load_a_folder_written_by_peft(tmp_path, rslora):
    base = tiny_model("qwen2", vocab_size=VOCAB)
    cfg = peft.LoraConfig(r=8, lora_alpha=32, use_rslora=rslora, target_modules=list(rl.hf.DEFAULT_TARGET_MODULES),
                          init_lora_weights=False)  # random B as well as A
    torch.manual_seed(5)
    pm = peft.get_peft_model(base, cfg)
    pm.save_pretrained(tmp_path / "p")
    with torch.no_grad():
        ref = pm(IDS).logits
        with pm.disable_adapter():
            assert (pm(IDS).logits - ref).abs().max() > 1e-3  # the PEFT adapter is not a no-op
    model = _patched(lora_alpha=16)  # other alpha, no rsLoRA: B is rescaled to the model's scaling
    rl.load_adapters(model, tmp_path / "p", adapter="tool")
    torch.testing.assert_close(_logits(model, torch.ones_like(IDS)), ref, rtol=1e-5, atol=1e-5)
    # a mapping of PEFT folders loads several at once
    model2 = _patched()
    rl.load_adapters(model2, {"reasoning": tmp_path / "p", "tool": tmp_path / "p"})
    torch.testing.assert_close(_logits(model2, torch.zeros_like(IDS)), ref, rtol=1e-5, atol=1e-5)


def test_load_patches_a_plain_model_from_our_folder(tmp_path):
    tok = tiny_tokenizer()
    model = rl.apply_routed_lora(tiny_model("llama", vocab_size=len(tok)), target_modules=["v_proj", "up_proj"],
                                 r=2, lora_alpha=5, use_rslora=True, adapters=("a", "b", "c"),
                                 router=rl.TagRouter(tok, default="a", spans={"c": ("<search>", "</search>")}))
    with torch.no_grad():
        for _, layer in routed_layers(model):
            layer.lora_B.normal_()
    rl.save_adapters(model, tmp_path)
    router = rl.TagRouter(tok, default="a", spans={"c": ("<search>", "</search>")})
    plain = tiny_model("llama", vocab_size=len(tok))
    assert rl.load_adapters(plain, tmp_path, router=router) is plain
    assert [n for n, _ in routed_layers(plain)] == [n for n, _ in routed_layers(model)]
    assert _same(_snapshot(plain), _snapshot(model))
    ids = torch.tensor([tok("a <search> b </search> c").input_ids])
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, model(ids).logits, rtol=0, atol=0)
    # a failed load undoes the patch
    _edit_config(tmp_path / "b", use_dora=True)
    plain2 = tiny_model("llama", vocab_size=len(tok))
    with pytest.raises(adapter_io.AdapterLoadError, match="use_dora"):
        rl.load_adapters(plain2, tmp_path)
    assert not routed_layers(plain2) and all(p.requires_grad for p in plain2.parameters())
    with pytest.raises(ValueError, match="apply_routed_lora"):
        rl.load_adapters(plain2, tmp_path / "c", adapter="c")


def _edit_config(folder, **changes):
    p = folder / "adapter_config.json"
    cfg = json.loads(p.read_text())
    for k, v in changes.items():
        if v is KeyError:
            cfg.pop(k)
        else:
            cfg[k] = v
    p.write_text(json.dumps(cfg))


def _edit_weights(folder, fn):
    p = folder / "adapter_model.safetensors"
    sd = load_file(p)
    fn(sd)
    save_file(sd, p)


K = "base_model.model.model.layers.0.self_attn.q_proj"
CORRUPTIONS = {
    "missing key": (lambda f: _edit_weights(f, lambda sd: sd.pop(f"{K}.lora_B.weight")), "missing 1"),
    "unexpected key": (lambda f: _edit_weights(f, lambda sd: sd.__setitem__("base_model.model.x.lora_A.weight",
                                                                             torch.zeros(8, 4))), "unexpected 1"),
    "no .weight": (lambda f: _edit_weights(f, lambda sd: sd.__setitem__(f"{K}.lora_A", sd.pop(f"{K}.lora_A.weight"))),
                   "missing 1"),
    "wrong prefix": (lambda f: _edit_weights(f, lambda sd: [sd.__setitem__(k.replace("base_model.model.", ""),
                                                                           sd.pop(k)) for k in list(sd)]), "missing"),
    "shape": (lambda f: _edit_weights(f, lambda sd: sd.__setitem__(f"{K}.lora_A.weight", torch.zeros(8, 31))),
              "shape"),
    "rank": (lambda f: _edit_config(f, r=4), "rank r=4"),
    "dora": (lambda f: _edit_config(f, use_dora=True), "use_dora"),
    "rank_pattern": (lambda f: _edit_config(f, rank_pattern={"q_proj": 4}), "rank_pattern"),
    "alpha_pattern": (lambda f: _edit_config(f, alpha_pattern={"q_proj": 4}), "alpha_pattern"),
    "no target_modules": (lambda f: _edit_config(f, target_modules=KeyError), "target_modules' is missing"),
    "no lora_alpha": (lambda f: _edit_config(f, lora_alpha=KeyError), "lora_alpha' is missing"),
    "targets": (lambda f: _edit_config(f, target_modules=["q_proj"]), "selects other modules"),
    "peft_type": (lambda f: _edit_config(f, peft_type="IA3"), "peft_type"),
    "lora bias": (lambda f: _edit_config(f, bias="all"), "bias"),
    "unknown option": (lambda f: _edit_config(f, shiny_new_option=3), "unknown PEFT option"),
    "no weights": (lambda f: (f / "adapter_model.safetensors").unlink(), "missing"),
    "bad json": (lambda f: (f / "adapter_config.json").write_text("{"), "not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_bad_second_adapter_is_an_error_and_loads_nothing(tmp_path, case):
    rl.save_adapters(_patched(lora_seed=1), tmp_path)
    corrupt, match = CORRUPTIONS[case]
    corrupt(tmp_path / "tool")  # the second adapter; the first one is fine
    model = _patched(lora_seed=2)
    before = _snapshot(model)
    with pytest.raises(adapter_io.AdapterLoadError, match=match):
        rl.load_adapters(model, tmp_path)
    assert _same(_snapshot(model), before)


def test_failed_save_leaves_the_old_folder(tmp_path, monkeypatch):
    model = _patched(lora_seed=1)
    rl.save_adapters(model, tmp_path / "a")
    old = {p: p.read_bytes() for p in (tmp_path / "a").rglob("*") if p.is_file()}
    calls = []
    real = adapter_io._atomic_write_bytes

    def flaky(path, data):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        real(path, data)

    monkeypatch.setattr(adapter_io, "_atomic_write_bytes", flaky)
    with pytest.raises(OSError, match="disk full"):
        rl.save_adapters(_patched(lora_seed=2), tmp_path / "a")
    with pytest.raises(OSError, match="disk full"):
        calls.clear()
        rl.save_adapters(_patched(lora_seed=2), tmp_path / "new")
    assert {p: p.read_bytes() for p in (tmp_path / "a").rglob("*") if p.is_file()} == old
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temporary folder left


def test_bad_arguments(tmp_path):
    model = _patched()
    rl.save_adapters(model, tmp_path / "a")
    with pytest.raises(ValueError, match="adapter='name'"):
        rl.load_adapters(model, tmp_path / "a" / "tool")
    with pytest.raises(adapter_io.AdapterLoadError, match="not one of"):
        rl.load_adapters(model, tmp_path / "a" / "tool", adapter="planner")
    with pytest.raises(FileNotFoundError):
        rl.load_adapters(model, tmp_path / "nope")
    with pytest.raises(adapter_io.AdapterLoadError, match="neither"):
        rl.load_adapters(model, tmp_path)
    with pytest.raises(ValueError, match="adapters: expected"):
        rl.save_adapters(model, tmp_path / "b", adapters=["planner"])
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError):
        rl.save_adapters(model, tmp_path / "file")
    with pytest.raises(ValueError, match="no RoutedLoRALinear"):
        rl.save_adapters(tiny_model("qwen2", vocab_size=VOCAB), tmp_path / "c")
    with pytest.raises(ValueError, match="router: only used"):
        rl.load_adapters(model, tmp_path / "a", router=object())
    other = rl.apply_routed_lora(tiny_model("qwen2", vocab_size=VOCAB), adapters=("a", "b"))
    with pytest.raises(adapter_io.AdapterLoadError, match="not one of"):
        rl.load_adapters(other, tmp_path / "a")
