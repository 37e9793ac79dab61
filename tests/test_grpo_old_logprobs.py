"""Old log-probs of the later mini-batches from the rollout (GRPOConfig.old_logprobs): no old-policy pass, the
sampler's values at the sampled tokens are the ones the loss reads, nothing else of them is, and "auto" falls back
to the teacher-forced pass where the rollout's values are missing or not float32."""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("transformers")

from routed_lora.grpo import trainer as T  # noqa: E402
from routed_lora.grpo.logprobs import routes_for, token_logprobs  # noqa: E402
from test_grpo_on_policy import count_no_grad_passes  # noqa: E402
from test_grpo_update import _cfg, make_batch, make_model, tag_router  # noqa: E402


def _with_rollout_logprobs(model, batch, routes, cfg):
    """The batch with rollout log-probs as a sampler would have recorded them: the policy's log-probs of the
    sampled targets before any update (one teacher-forced pass over the whole batch), 0 elsewhere."""
    with torch.no_grad():
        lp, _ = token_logprobs(model, batch.input_ids, batch.attention_mask, routes=routes,
                               temperature=cfg.temperature)
    return dataclasses.replace(batch, rollout_logprobs=torch.where(batch.loss_mask, lp, torch.zeros(())))


def _update(batch, cfg):
    model = make_model(seed=3)
    routes = routes_for(batch.input_ids, batch.attention_mask, router=tag_router)
    opt = T.AdapterOptimizer(model, cfg.adapter_lrs())
    with pytest.MonkeyPatch.context() as mp:
        calls = count_no_grad_passes(mp)
        m = T.grpo_update(model, model, opt, batch, routes, cfg)
    return T.adapter_state(model), m, calls["no_grad"]


@pytest.fixture
def rolled():
    model = make_model(seed=3)
    batch = make_batch(seed=4)
    routes = routes_for(batch.input_ids, batch.attention_mask, router=tag_router)
    return _with_rollout_logprobs(model, batch, routes, _cfg(beta=0.0))


def _max_diff(a, b):
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_rollout_old_logprobs_skip_the_pass_and_give_the_same_update(rolled):
    s_re, m_re, n_re = _update(rolled, _cfg(mini_batches=2, beta=0.0, old_logprobs="recompute"))
    s_ro, m_ro, n_ro = _update(rolled, _cfg(mini_batches=2, beta=0.0, old_logprobs="rollout"))
    s_auto, _, n_auto = _update(rolled, _cfg(mini_batches=2, beta=0.0))  # float32 model, log-probs present
    assert n_re == 1 and n_ro == 0 and n_auto == 0  # the second mini-batch (question 1): one micro-batch
    # the rollout values equal the teacher-forced ones to float rounding, so the updates agree to rounding
    assert _max_diff(s_ro, s_re) < 1e-6
    assert all(torch.equal(s_auto[k], s_ro[k]) for k in s_ro)
    assert m_ro["rollout_vs_teacher_forced_max_abs_logprob_diff"] < 1e-5  # measured on the rows with a teacher-forced old pass


def test_the_loss_reads_the_rollout_values_at_sampled_tokens_only(rolled):
    cfg = _cfg(mini_batches=2, beta=0.0, old_logprobs="rollout")
    s0, _, _ = _update(rolled, cfg)
    second = T.mini_batch_rows(rolled.group_ids, 2)[1]
    # garbage (NaN, huge values) where no token was sampled: the same update, bit for bit
    junk = rolled.rollout_logprobs.clone()
    off = ~rolled.loss_mask
    junk[off] = torch.tensor([float("nan"), 1e4, -1e4])[torch.arange(int(off.sum())) % 3]
    s1, _, _ = _update(dataclasses.replace(rolled, rollout_logprobs=junk), cfg)
    assert all(torch.equal(s0[k], s1[k]) for k in s0)
    # a shift of the second mini-batch's old log-probs at sampled tokens changes the ratio, so the update
    shifted = rolled.rollout_logprobs.clone()
    rows = torch.tensor(second)
    shifted[rows] = torch.where(rolled.loss_mask[rows], shifted[rows] + 0.5, shifted[rows])
    s2, m2, _ = _update(dataclasses.replace(rolled, rollout_logprobs=shifted), cfg)
    assert _max_diff(s2, s0) > 1e-4
    assert m2["clip_frac"] > 0


def test_auto_recomputes_without_rollout_logprobs_and_rollout_refuses():
    batch = make_batch(seed=4)  # no rollout log-probs
    _, _, n = _update(batch, _cfg(mini_batches=2, beta=0.0))
    assert n == 1
    with pytest.raises(ValueError, match="old_logprobs='rollout'.*no rollout log-probs"):
        _update(batch, _cfg(mini_batches=2, beta=0.0, old_logprobs="rollout"))


def test_auto_recomputes_for_a_half_precision_model(rolled):
    model = make_model(seed=3).to(torch.bfloat16)
    assert not T.old_logprobs_from_rollout(_cfg(), model, rolled)
    assert T.old_logprobs_from_rollout(_cfg(old_logprobs="rollout"), model, rolled)
    assert T.old_logprobs_from_rollout(_cfg(), make_model(seed=3), rolled)


def test_config_refuses_unknown_source():
    with pytest.raises(ValueError, match="old_logprobs"):
        T.GRPOConfig(old_logprobs="vllm").check()
