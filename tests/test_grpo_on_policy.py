"""The first mini-batch's old policy is the current one: its old-policy pass is skipped (its first update
forward, detached, gives the old log-probs) and the update is bit-for-bit the one with the separate pass.
With one mini-batch and one epoch no old-policy pass runs at all."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from routed_lora.grpo import trainer as T  # noqa: E402
from routed_lora.grpo import update as U  # noqa: E402  (where grpo_update reads the patched names)
from routed_lora.grpo.logprobs import routes_for  # noqa: E402
from test_grpo_update import _cfg, make_batch, make_model, tag_router  # noqa: E402


def count_no_grad_passes(monkeypatch) -> dict:
    """Count the trainer's no-grad ``token_logprobs`` calls (old-policy passes) into the returned dict."""
    calls = {"no_grad": 0}
    real = T.token_logprobs

    def counting(*a, **k):
        if not torch.is_grad_enabled():
            calls["no_grad"] += 1
        return real(*a, **k)

    monkeypatch.setattr(U, "token_logprobs", counting)
    return calls


def _run(monkeypatch, *, force: bool, mini_batches: int, epochs: int):
    model = make_model(seed=3)
    batch = make_batch(seed=4)
    routes = routes_for(batch.input_ids, batch.attention_mask, router=tag_router)
    cfg = _cfg(mini_batches=mini_batches, epochs=epochs, beta=0.0)
    opt = T.AdapterOptimizer(model, cfg.adapter_lrs())
    calls = count_no_grad_passes(monkeypatch)
    monkeypatch.setattr(U, "_FORCE_OLD_PASS", force)  # force: the old pass for every mini-batch, as before
    m = T.grpo_update(model, model, opt, batch, routes, cfg)
    monkeypatch.undo()
    return T.adapter_state(model), m, calls["no_grad"]


@pytest.mark.parametrize("mini_batches,epochs,skipped_passes", [(1, 1, 3), (2, 1, 2), (2, 2, 2)])
def test_first_mini_batch_reuses_its_forward_as_the_old_policy(monkeypatch, mini_batches, epochs, skipped_passes):
    # 12 rows, micro-batches of 4: one mini-batch holds 3 micro-batches, each of two mini-batches (6 rows) 2
    s_skip, m_skip, n_skip = _run(monkeypatch, force=False, mini_batches=mini_batches, epochs=epochs)
    s_full, m_full, n_full = _run(monkeypatch, force=True, mini_batches=mini_batches, epochs=epochs)
    assert n_full - n_skip == skipped_passes
    # with the pass (force), the metric compares the no-grad old log-probs with the first update forward; without
    # it they are that forward, detached, and the metric is 0 by construction
    assert m_full["first_update_max_abs_logratio"] == 0.0
    for k in s_skip:
        assert torch.equal(s_skip[k], s_full[k]), f"{k}: the skipped old pass changed the update"
    assert m_skip["loss"] == m_full["loss"] and m_skip["clip_frac"] == m_full["clip_frac"]
