import json
import math

import pytest
import torch
from torch import nn

from routed_lora.diagnostics.grad_angle import (
    ParamView,
    cosine_report,
    gradient_conflict,
    grpo_per_token_loss,
    role_masks_from_routes,
    select_params,
    write_report,
)
from routed_lora.layer import RoutedLoRALinear

torch.set_num_threads(2)


def _linear_setup(x_tool_dir):
    """l_bt = w . x_bt on a (2, 4) batch: reasoning tokens have x = e1, tool tokens x = x_tool_dir."""
    w = nn.Parameter(torch.randn(3, dtype=torch.float64))
    x = torch.zeros(2, 4, 3, dtype=torch.float64)
    reasoning = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 1]], dtype=torch.bool)
    tool = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 0]], dtype=torch.bool)
    x[reasoning] = torch.tensor([1.0, 0, 0], dtype=torch.float64)
    x[tool] = torch.tensor(x_tool_dir, dtype=torch.float64)
    loss = (x * w).sum(-1)
    return loss, {"reasoning": reasoning, "tool": tool}, [ParamView("w", w)]


@pytest.mark.parametrize("tool_dir,angle", [([0.0, 1.0, 0.0], 90.0), ([2.0, 0.0, 0.0], 0.0), ([-1.0, 0, 0], 180.0)])
def test_constructed_gradients_give_known_angles(tool_dir, angle):
    loss, roles, views = _linear_setup(tool_dir)
    rep = gradient_conflict(loss, roles, views)
    assert rep["batch"]["angle_deg"] == pytest.approx(angle, abs=1e-6)
    assert rep["batch"]["per_tensor"][0]["angle_deg"] == pytest.approx(angle, abs=1e-6)
    w = rep["within_rollout"]
    assert w["angle_deg"]["n"] == 2 and all(a == pytest.approx(angle, abs=1e-6) for a in w["angles_deg"])
    # same role across rollouts: the same direction
    for role in ("reasoning", "tool"):
        blk = rep["across_rollouts"][role]
        assert blk["pairs"] == [[0, 1]] and blk["angles_deg"][0] == pytest.approx(0.0, abs=1e-6)
    assert rep["backward_passes"] == 2 + 4
    assert "cross_talk" not in rep


def test_cosine_report_zero_gradient_has_no_angle():
    views = [ParamView("a", torch.zeros(2)), ParamView("b", torch.zeros(1))]
    rep = cosine_report(torch.tensor([1.0, 0, 0], dtype=torch.float64), torch.tensor([0.0, 1, 0], dtype=torch.float64), views)
    assert rep["cosine"] == 0.0 and rep["angle_deg"] == 90.0
    assert rep["per_tensor"][1]["cosine"] is None and rep["per_tensor"][1]["angle_deg"] is None


def test_zero_advantage_rollouts_are_skipped():
    logp = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    w = nn.Parameter(torch.ones((), dtype=torch.float64))
    per_token = grpo_per_token_loss(logp * w, torch.tensor([1.0, 0.0, -0.5]))
    roles = {"reasoning": torch.tensor([[1, 1, 0, 0]] * 3).bool(), "tool": torch.tensor([[0, 0, 1, 1]] * 3).bool()}
    rep = gradient_conflict(per_token, roles, [ParamView("w", w)])
    assert rep["within_rollout"]["skipped_zero"] == 1 and rep["within_rollout"]["angle_deg"]["n"] == 2
    assert rep["across_rollouts"]["tool"]["skipped_zero"] == 2  # (0,1) and (1,2)
    # opposite advantages: opposite directions on the one shared scalar parameter
    assert rep["across_rollouts"]["tool"]["cosines"][0] == pytest.approx(
        math.copysign(1.0, float(logp.detach()[0, 2:].sum() * logp.detach()[2, 2:].sum())) * -1.0)


def test_overlapping_roles_raise():
    loss, roles, views = _linear_setup([0.0, 1.0, 0.0])
    roles["tool"] = roles["tool"] | roles["reasoning"]
    with pytest.raises(ValueError, match="overlap"):
        gradient_conflict(loss, roles, views)


class _Toy(nn.Module):
    """Embedding -> routed linear -> (optional causal mean over positions) -> routed linear -> logits."""

    def __init__(self, mix: bool, vocab=11, d=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.l1 = RoutedLoRALinear(d, d, r=2)
        self.l2 = RoutedLoRALinear(d, vocab, r=2)
        self.mix = mix
        for p in (self.emb.weight,):
            p.requires_grad_(False)
        with torch.no_grad():  # non-zero B so both A and B get gradients
            self.l1.lora_B.normal_(0, 0.5)
            self.l2.lora_B.normal_(0, 0.5)

    def forward(self, ids, routes):
        h = torch.tanh(self.l1(self.emb(ids), routes))
        if self.mix:
            h = h.cumsum(1) / torch.arange(1, h.shape[1] + 1).view(1, -1, 1)
        return self.l2(h, routes)


def _toy_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 11, (4, 9), generator=g)
    routes = torch.tensor([[0, 0, 1, 1, 1, 0, 0, 1, 0]] * 4)
    return ids, routes


@pytest.mark.parametrize("mix", [False, True])
def test_cross_talk_zero_without_mixing_positive_with(mix):
    torch.manual_seed(0)
    model = _Toy(mix)
    ids, routes = _toy_batch()
    logits = model(ids, routes)[:, :-1]
    logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    per_token = grpo_per_token_loss(logp, torch.tensor([1.0, -1.0, 0.5, -0.5]))
    roles = role_masks_from_routes(routes, torch.ones_like(ids))
    views = select_params(model, "lora")
    assert [v.name for v in views][:2] == ["l1.lora_A[reasoning]", "l1.lora_B[reasoning]"]
    rep = gradient_conflict(per_token, roles, views)
    ct = rep["cross_talk"]
    assert set(ct) == {"reasoning", "tool"}
    # the definition: g_e(all) = g_e(own) + g_e(other), checked against a direct pass on all tokens
    from routed_lora.diagnostics.grad_angle import flat_gradient

    N = float((roles["reasoning"] | roles["tool"]).sum())
    g_all = flat_gradient((per_token * (roles["reasoning"] | roles["tool"])).sum() / N, views)
    sel = torch.cat([torch.full((v.numel(),), v.adapter == "tool") for v in views])
    assert ct["tool"]["norm_all"] == pytest.approx(float(g_all[sel].norm()), rel=1e-5)
    for a in ("reasoning", "tool"):
        if mix:
            assert ct[a]["cross_talk"] > 0.01 and 0 < ct[a]["cross_talk_share"] < 1
        else:  # the layer isolates positions: no other-role gradient at all
            assert ct[a]["norm_other"] == 0.0 and ct[a]["cross_talk"] == 0.0
    if not mix:  # and then the two roles' gradients live on disjoint adapters: exactly 90 degrees
        assert rep["batch"]["angle_deg"] == pytest.approx(90.0, abs=1e-9)


def test_full_mode_and_report_files(tmp_path):
    torch.manual_seed(0)
    model = _Toy(True)
    for p in model.parameters():
        p.requires_grad_(False)
    ids, routes = _toy_batch(1)
    views = select_params(model, "full")
    assert {v.name for v in views} >= {"emb.weight", "l1.weight", "l2.lora_A"}
    from routed_lora.diagnostics.grad_angle import _grad_enabled_for, _unique_params

    with _grad_enabled_for(_unique_params(views)):
        logp = torch.log_softmax(model(ids, routes)[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        rep = gradient_conflict(grpo_per_token_loss(logp, None, objective="logp"),
                                role_masks_from_routes(routes, torch.ones_like(ids)), views, max_rollouts=3)
    assert not any(p.requires_grad for p in model.parameters())  # restored
    assert 0.0 < rep["batch"]["angle_deg"] < 180.0
    assert rep["within_rollout"]["angle_deg"]["n"] == 3
    assert len(rep["across_rollouts"]["tool"]["pairs"]) == 3
    out = write_report(rep, tmp_path)
    assert json.loads(out["json"].read_text())["num_rollouts"] == 4
    assert out["png"].stat().st_size > 1000
