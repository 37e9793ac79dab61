"""One epoch, one mini-batch: the old-policy pass is skipped (the update's own forward, detached, is the old
policy) and the update is bit-for-bit the one with the separate old pass."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from routed_lora.grpo import trainer as T  # noqa: E402
from routed_lora.grpo.logprobs import routes_for  # noqa: E402
from test_grpo_update import _cfg, make_batch, make_model, tag_router  # noqa: E402


def _run(monkeypatch, skip: bool):
    model = make_model(seed=3)
    batch = make_batch(seed=4)
    routes = routes_for(batch.input_ids, batch.attention_mask, router=tag_router)
    cfg = _cfg(mini_batches=1, epochs=1, beta=0.0)
    opt = T.AdapterOptimizer(model, cfg.adapter_lrs())
    calls = {"no_grad": 0}
    real = T.token_logprobs

    def counting(*a, **k):
        if not torch.is_grad_enabled():
            calls["no_grad"] += 1
        return real(*a, **k)

    monkeypatch.setattr(T, "token_logprobs", counting)
    if not skip:  # the separate old pass, as before: the switch the trainer keeps for this comparison
        monkeypatch.setattr(T, "_FORCE_OLD_PASS", True)
    m = T.grpo_update(model, model, opt, batch, routes, cfg)
    return T.adapter_state(model), m, calls["no_grad"]


def test_on_policy_step_skips_the_old_pass_and_matches_it(monkeypatch):
    s_skip, m_skip, n_skip = _run(monkeypatch, skip=True)
    monkeypatch.undo()
    s_full, m_full, n_full = _run(monkeypatch, skip=False)
    assert n_skip == 0 and n_full > 0
    assert m_skip["first_update_max_abs_logratio"] == 0.0 and m_skip["ratio_max"] == 1.0
    assert s_skip.keys() == s_full.keys()
    for k in s_skip:
        assert torch.equal(s_skip[k], s_full[k]), f"{k}: the skipped old pass changed the update"
    assert m_skip["loss"] == m_full["loss"]
