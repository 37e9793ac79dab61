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
