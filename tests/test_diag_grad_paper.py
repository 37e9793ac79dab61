"""The paper's gradient-conflict comparison: de-duplication, disjoint halves of groups, per-tensor quartiles."""

import pytest
import torch
from torch import nn

from routed_lora.diagnostics.grad_angle import ParamView, dedup_rows, split_conflict


def test_split_conflict_on_constructed_gradients():
    # 4 groups x 2 rollouts x 4 tokens; l = x[:2] . wa + x[2] * wb; reasoning x = (1, 0, 1), tool x = (0, 1, 1)
    wa = nn.Parameter(torch.randn(2, dtype=torch.float64))
    wb = nn.Parameter(torch.randn(1, dtype=torch.float64))
    B, T = 8, 4
    x = torch.zeros(B, T, 3, dtype=torch.float64)
    reasoning = torch.zeros(B, T, dtype=torch.bool)
    reasoning[:, :2] = True
    tool = torch.zeros(B, T, dtype=torch.bool)
    tool[:, 2:] = True
    x[reasoning] = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    x[tool] = torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64)
    loss = (x[..., :2] * wa).sum(-1) + x[..., 2] * wb
    gids = torch.arange(4).repeat_interleave(2)
    adv = torch.ones(B)
    adv[gids == 3] = 0.0  # a group with no signal is left out of the halves
    rep = split_conflict(loss, {"reasoning": reasoning, "tool": tool}, [ParamView("wa", wa), ParamView("wb", wb)],
                         gids, adv, splits=5, seed=0)
    assert rep["groups_with_signal"] == 3 and rep["splits"] == 5
    for k in ("same_reasoning", "same_tool"):
        assert rep[k]["flat"]["cosine"]["median"] == pytest.approx(1.0) and rep[k]["flat"]["angle_deg"]["median"] < 1e-4
        assert rep[k]["per_tensor"]["cosine"]["q1"] == pytest.approx(1.0)
    cross = rep["cross"]
    assert cross["flat"]["cosine"]["median"] == pytest.approx(0.5)  # (1,0,1) vs (0,1,1)
    assert cross["flat"]["angle_deg"]["median"] == pytest.approx(60.0)
    # per tensor: wa gives cos 0, wb gives cos 1, as many of each
    assert cross["per_tensor"]["cosine"]["n"] == 2 * 2 * 5
    assert cross["per_tensor"]["cosine"]["q1"] == pytest.approx(0.0)
    assert cross["per_tensor"]["cosine"]["q3"] == pytest.approx(1.0)


def test_too_few_groups_and_dedup():
    ids = torch.tensor([[5, 6, 7, 0], [5, 6, 7, 0], [5, 6, 8, 0], [5, 6, 7, 9]])
    att = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1]])
    assert dedup_rows(ids, att) == [0, 2, 3]
    w = nn.Parameter(torch.ones(1, dtype=torch.float64))
    loss = w * torch.ones(2, 2, dtype=torch.float64)
    m = torch.tensor([[True, False], [True, False]])
    rep = split_conflict(loss, {"reasoning": m, "tool": ~m}, [ParamView("w", w)], torch.tensor([0, 0]),
                         torch.ones(2))
    assert rep["splits"] == 0 and "fewer than 2 groups" in rep["note"]
