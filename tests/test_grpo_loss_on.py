"""--loss-on: the role mask keeps the loss on one role's sampled tokens (LEAS's M_Reas / M_Tool)."""

import pytest
import torch

from routed_lora.env.tokenizer import build_tokenizer
from routed_lora.grpo.trainer import GRPOConfig, role_mask


def test_role_mask_splits_targets_by_the_tag_router():
    tok = build_tokenizer(["alice born where paris doc"])
    text = "q <think> alice </think> <search> alice born </search> <information> doc </information> <answer> paris </answer>"
    ids = torch.tensor([tok.encode(text, add_special_tokens=False) + [tok.pad_token_id]])
    att = torch.ones_like(ids)
    att[0, -1] = 0
    words = text.split() + ["<pad>"]
    tool = role_mask(tok, ids, att, "tool")[0].tolist()
    reas = role_mask(tok, ids, att, "reasoning")[0].tolist()
    # target t+1 is tool when position t is inside the open span: the query words and </search>
    tool_targets = [words[t + 1] for t in range(len(words) - 1) if tool[t]]
    assert tool_targets == ["alice", "born", "</search>"]
    assert all(a != b for a, b in zip(tool, reas))  # a partition of the targets
    assert "<search>" in [words[t + 1] for t in range(len(words) - 1) if reas[t]]  # decided by reasoning


def test_loss_on_is_checked():
    with pytest.raises(ValueError, match="loss_on: expected one of"):
        GRPOConfig(loss_on="query").check()


def test_trainer_collect_masks_the_loss_by_role(tmp_path, monkeypatch):
    import routed_lora.env.rollout as ro
    from routed_lora.env.tokenizer import build_tiny_model
    from routed_lora.grpo.trainer import Trainer, build_policy

    tok = build_tokenizer(["alice born where paris doc question"])
    comp = tok.encode("<think> alice </think> <search> alice born </search> <information> doc </information> "
                      "<answer> paris </answer>", add_special_tokens=False)
    info = [0] * len(comp)
    i0 = comp.index(tok.convert_tokens_to_ids("<information>"))
    i1 = comp.index(tok.convert_tokens_to_ids("</information>"))
    for i in range(i0, i1 + 1):
        info[i] = 1

    def fake(model, tokenizer, prompts, retriever, **kw):
        return [ro.Rollout(list(tokenizer(p)["input_ids"]), list(comp), list(info), text="<answer> paris </answer>",
                           logprobs=[0.0] * len(comp)) for p in prompts]

    monkeypatch.setattr(ro, "generate_rollouts", fake)
    rows = [{"question": "where was alice born ?", "golden_answers": ["paris"]}]
    masks = {}
    for role in ("all", "tool", "reasoning"):
        cfg = GRPOConfig(mode="joint", r=2, group_size=2, prompts_per_step=1, loss_on=role,
                         target_modules=("q_proj",)).check()
        model = build_tiny_model(tok, hidden=16, layers=1, heads=2, kv_heads=1, intermediate=32)
        model, router = build_policy(model, tok, cfg)
        t = Trainer(cfg, model, tok, router, None, rows, out=tmp_path / role, progress=False)
        batch, _, _ = t.collect(rows)
        masks[role] = batch.loss_mask
    assert masks["tool"].sum() == 2 * 3  # "alice born </search>" in each of the 2 rollouts
    assert torch.equal(masks["tool"] | masks["reasoning"], masks["all"])
    assert not (masks["tool"] & masks["reasoning"]).any()
