"""The GRPO loss pieces against hand-computed values (DESIGN.md §3)."""

from __future__ import annotations

import math

import pytest
import torch

from routed_lora.grpo.loss import (
    aggregate,
    clipped_surrogate,
    group_advantages,
    grpo_loss,
    k3_kl,
    step_normalizer,
    zero_std_fraction,
)


def test_group_advantages_hand_computed():
    # group 7: rewards 1, 0, 0, 1 -> mean 0.5, unbiased std sqrt(1/3); group 3: 1, 1 -> all equal -> 0
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0])
    groups = torch.tensor([7, 7, 3, 7, 7, 3])
    adv = group_advantages(rewards, groups, eps=0.0)
    s = math.sqrt(1.0 / 3.0)
    expected = torch.tensor([0.5 / s, -0.5 / s, 0.0, -0.5 / s, 0.5 / s, 0.0])
    torch.testing.assert_close(adv, expected, rtol=1e-6, atol=1e-6)
    # eps in the denominator
    adv_eps = group_advantages(rewards, groups, eps=0.1)
    assert abs(float(adv_eps[0]) - 0.5 / (s + 0.1)) < 1e-6
    # Dr.GRPO: no std scaling
    torch.testing.assert_close(
        group_advantages(rewards, groups, scale_rewards=False), torch.tensor([0.5, -0.5, 0.0, -0.5, 0.5, 0.0])
    )
    assert zero_std_fraction(rewards, groups) == 0.5


def test_group_advantages_uneven_groups_and_singletons():
    rewards = torch.tensor([2.0, 4.0, 9.0, 3.0])
    groups = torch.tensor([0, 0, 1, 0])  # group 0: 2, 4, 3 (mean 3, std 1); group 1 a singleton
    adv = group_advantages(rewards, groups, eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="same length"):
        group_advantages(rewards, groups[:3])


def test_k3_hand_computed():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.0, -1.0, -1.5])
    x = ref - logp  # 0, 1, -1
    expected = torch.tensor([0.0, math.e - 2.0, math.exp(-1) + 1 - 1])
    torch.testing.assert_close(k3_kl(logp, ref), expected)
    assert bool((k3_kl(torch.randn(100), torch.randn(100)) >= 0).all())
    del x


def test_clipped_surrogate_hand_computed():
    # ratios 1.5, 0.5, 1.1, 0.7 with A = +1, -1, -2, +2; eps_low 0.2, eps_high 0.28
    ratio = torch.tensor([[1.5, 0.5, 1.1, 0.7]])
    old = torch.zeros(1, 4)
    logp = torch.log(ratio)
    adv = torch.tensor([[1.0, -1.0, -2.0, 2.0]])
    loss, r, clipped = clipped_surrogate(logp, old, adv, eps_low=0.2, eps_high=0.28)
    # token 0: min(1.5, 1.28) = 1.28 -> -1.28 (clipped); token 1: min(-0.5, -0.8) = -0.8 -> 0.8 (clipped)
    # token 2: min(-2.2, -2.2) -> 2.2 (ratio inside); token 3: min(1.4, 1.6) = 1.4 -> -1.4 (not clipped: A>0, r<1)
    torch.testing.assert_close(loss, torch.tensor([[-1.28, 0.8, 2.2, -1.4]]))
    assert clipped.tolist() == [[True, True, False, False]]
    torch.testing.assert_close(r, ratio)


def test_clipped_tokens_get_no_gradient():
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 0.7]])).requires_grad_()
    adv = torch.tensor([[1.0, -1.0, -2.0, 2.0]])
    loss, ratio, _ = clipped_surrogate(logp, torch.zeros(1, 4), adv, eps_low=0.2, eps_high=0.28)
    loss.sum().backward()
    # d(-rho A)/dlogp = -rho A where unclipped, 0 where clipped
    expected = torch.tensor([[0.0, 0.0, 2.2, -1.4]])
    torch.testing.assert_close(logp.grad, expected)


def test_aggregations_hand_computed():
    per = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, float("nan"), float("inf"), 5.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    # token-mean: (1+2+3+4)/4
    assert float(aggregate(per, mask, "token-mean")) == pytest.approx(2.5)
    # seq-mean-token-mean: (6/3 + 4/1)/2
    assert float(aggregate(per, mask, "seq-mean-token-mean")) == pytest.approx(3.0)
    # dr-grpo: 10 / (2 * 8)
    assert float(aggregate(per, mask, "dr-grpo", max_len=8)) == pytest.approx(10 / 16)
    with pytest.raises(ValueError, match="max_len"):
        aggregate(per, mask, "dr-grpo")
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(per, mask, "sum")


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "dr-grpo"])
def test_microbatch_split_equals_whole_step(aggregation):
    torch.manual_seed(0)
    per = torch.randn(6, 9)
    mask = torch.rand(6, 9) > 0.3
    mask[:, 0] = True
    whole = aggregate(per, mask, aggregation, max_len=9)
    parts = [(per[:2], mask[:2]), (per[2:5], mask[2:5]), (per[5:], mask[5:])]
    norm = step_normalizer([m for _, m in parts], aggregation, max_len=9)
    split = sum(aggregate(p, m, aggregation, normalizer=norm, max_len=9) for p, m in parts)
    torch.testing.assert_close(split, whole)


def test_grpo_loss_hand_computed_with_kl_and_metrics():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]], requires_grad=True)
    old = torch.tensor([[-1.0, -2.5, -3.0], [-0.5, -0.2, -9.0]])
    ref = torch.tensor([[-1.0, -1.0, -3.0], [-1.5, -0.5, -9.0]])
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    ent = torch.tensor([[0.1, 0.2, 5.0], [0.3, 0.4, 5.0]])
    out = grpo_loss(logp, old, adv, mask, ref_logp=ref, beta=0.1, eps_low=0.2, eps_high=0.2, entropy=ent)
    r = [1.0, math.exp(0.5), 1.0, math.exp(-0.3)]
    a = [1.0, 1.0, -1.0, -1.0]
    surr = [-min(ri * ai, max(min(ri, 1.2), 0.8) * ai) for ri, ai in zip(r, a)]
    x = [0.0, 1.0, -1.0, 0.0]
    k3 = [math.exp(v) - v - 1 for v in x]
    expected = sum(s + 0.1 * k for s, k in zip(surr, k3)) / 4
    assert float(out.loss.detach()) == pytest.approx(expected, rel=1e-6)
    assert out.tokens == 4
    assert out.clip_sum == 2  # token (0, 1): ratio e^0.5 > 1.2 with A > 0; token (1, 1): 0.74 < 0.8 with A < 0
    del out
    out = grpo_loss(logp, old, adv, mask, ref_logp=ref, beta=0.1, eps_low=0.2, eps_high=0.2, entropy=ent)
    assert out.kl_sum == pytest.approx(sum(k3))
    assert out.entropy_sum == pytest.approx(1.0)
    out.loss.backward()
    assert logp.grad[:, 2].abs().sum() == 0  # masked tokens carry no gradient


def test_clip_fraction_counts_both_sides():
    logp = torch.log(torch.tensor([[1.5, 0.7]]))
    out = grpo_loss(logp, torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]), torch.ones(1, 2))
    assert out.clip_sum == 2


def test_beta_needs_reference():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(x, x, torch.ones(1), torch.ones(1, 2), beta=0.1)


def test_ratio_one_gives_policy_gradient():
    # at rho = 1 the gradient of the token-mean loss is -A_i / N_tokens for each token
    logp = torch.tensor([[-1.0, -2.0], [-0.3, -0.4]], requires_grad=True)
    mask = torch.tensor([[1, 1], [1, 0]])
    out = grpo_loss(logp, logp.detach(), torch.tensor([2.0, -1.0]), mask)
    out.loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-2 / 3, -2 / 3], [1 / 3, 0.0]]))
    assert out.ratio_sum == 3 and out.clip_sum == 0


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "dr-grpo"])
def test_non_finite_old_and_ref_at_masked_positions_leave_gradients_finite(aggregation):
    """old_logp / ref_logp holding -inf or nan where the mask is 0 (padding, retrieved text) change neither the
    loss nor logp's gradient: it equals the gradient with finite values there, and is 0 at masked positions."""
    torch.manual_seed(0)
    logp0 = -torch.rand(3, 7) - 0.1
    old = logp0 + 0.1 * torch.randn(3, 7)
    ref = logp0 + 0.1 * torch.randn(3, 7)
    mask = torch.ones(3, 7)
    mask[0, :2] = 0
    mask[1, 5:] = 0
    mask[2, 3] = 0
    bad_old, bad_ref = old.clone(), ref.clone()
    bad_old[mask == 0] = torch.tensor([float("-inf"), float("nan"), float("inf"), float("-inf"), float("nan")])
    bad_ref[mask == 0] = float("nan")
    adv = torch.tensor([1.0, -0.5, 2.0])
    grads, losses = [], []
    for o, r in ((old, ref), (bad_old, bad_ref)):
        logp = logp0.clone().requires_grad_(True)
        out = grpo_loss(logp, o, adv, mask, ref_logp=r, beta=0.04, aggregation=aggregation, max_len=7)
        out.loss.backward()
        grads.append(logp.grad)
        losses.append(out.loss.detach())
        assert math.isfinite(out.kl_sum) and math.isfinite(out.ratio_sum) and math.isfinite(out.ratio_max)
    assert torch.isfinite(grads[1]).all()
    torch.testing.assert_close(losses[1], losses[0])
    torch.testing.assert_close(grads[1], grads[0])
    assert (grads[1][mask == 0] == 0).all()
