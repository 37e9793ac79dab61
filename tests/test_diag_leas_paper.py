"""`eval leas --paper`: the six variants from separately trained single-adapter runs; checks of the runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("bm25s")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from routed_lora.testing import tiny_world

    return tiny_world(tmp_path_factory.mktemp("world"), layers=1)


def _run(world, out, *, loss_on, mode="joint", r=2, b_std=0.0, seed=0):
    """A fake `train --out` folder: adapters of the given layout and the config the trainer writes."""
    import routed_lora as rl
    from routed_lora.grpo.trainer import GRPOConfig, build_policy, load_model_and_tokenizer, routed_layers

    torch.manual_seed(seed)
    model, tok = load_model_and_tokenizer(world / "model")
    cfg = GRPOConfig(mode=mode, r=r, lora_alpha=2.0 * r, loss_on=loss_on, target_modules=("q_proj", "v_proj"))
    model, _ = build_policy(model, tok, cfg)
    if b_std:
        with torch.no_grad():
            for layer in routed_layers(model):
                layer.lora_B.normal_(0, b_std)
    out.mkdir(parents=True)
    rl.save_adapters(model, out / "adapters")
    (out / "config.json").write_text(json.dumps(cfg.to_dict()))
    return out


def test_variants_are_the_paper_models_and_hybrids_compose_them(world, tmp_path, monkeypatch):
    """Which model decodes which variant (hybrids: the 2-Agent loop with (reasoner, tool writer) = (M_Base, M_Tool)
    and (M_Reas, M_Base)), rates from N samples, and the LEAS of those rates."""
    import routed_lora.diagnostics.evaluate as ev
    import routed_lora.diagnostics.leas_paper as lp
    import routed_lora.env.rollout as ro
    from routed_lora.diagnostics.leas import DESIGN, VARIANTS, logit

    runs = {v: _run(world, tmp_path / v, loss_on=lo) for v, lo in
            (("reasoning", "reasoning"), ("tool", "tool"), ("unified", "all"))}
    rows = [{"question": f"q{i}", "golden_answers": ["yes"], "hops": 1 + i % 2} for i in range(3)]
    N = 4
    # correct answers out of N per question for each system (model, or (reasoner, tool writer) pair)
    wins = {"base": [1, 2, 0], "reasoning": [2, 1, 0], "tool": [3, 2, 0], "unified": [1, 4, 0],
            ("base", "tool"): [2, 3, 0], ("reasoning", "base"): [3, 1, 0]}
    monkeypatch.setattr(lp, "_load", lambda model_dir, adapters: (adapters.parent.name if adapters else "base",
                                                                   None))
    seen = {}

    def answer(system, prompts):
        out = []
        for p in prompts:
            i = int(p.split("q")[-1].split()[0])
            k = seen.setdefault((system, i), 0)
            seen[(system, i)] = k + 1
            out.append(ro.Rollout([1], [], [], text="<answer> yes </answer>" if k < wins[system][i] else ""))
        return out

    monkeypatch.setattr(ro, "generate_rollouts", lambda model, tok, prompts, retr, **kw: answer(model, prompts))
    monkeypatch.setattr(ev, "two_agent_rollouts",
                        lambda a, b, tok, prompts, retr, **kw: (answer((a, b), prompts), {}))
    monkeypatch.setattr("routed_lora.env.data.make_prompt", lambda q, t=None: q)
    out = lp.paper_leas(world / "model", runs, rows, None, samples=N, n_boot=500, batch_size=5)
    names = {"hybrid_tool": ("base", "tool"), "hybrid_reasoning": ("reasoning", "base")}
    for q, row in enumerate(out["per_question"]):
        for v in VARIANTS:
            assert row[v] == wins[names.get(v, v)][q] / N, (v, q)
    res = out["_result"]
    assert list(res.kept) == [0, 1] and res.dropped == 1  # question 2: no variant solved it
    P = np.array([[wins[names.get(v, v)][q] / N for v in VARIANTS] for q in (0, 1)])
    lam = np.linalg.solve(DESIGN, logit(np.clip(P, 1 / 8, 7 / 8)).T).T  # eps = 1/(2N)
    assert np.allclose(res.coefficients, lam)
    # tool*reasoning = l(unified) - l(tool) - l(reasoning) + l(base): q0 negative, q1 positive
    assert lam[0, 5] < 0 < lam[1, 5] and out["negative_interaction_share"] == 0.5
    lo, hi = out["negative_interaction_share_ci95"]
    assert lo == 0.0 and hi == 1.0


def test_runs_of_the_wrong_mode_rank_or_role_are_refused(world, tmp_path):
    from routed_lora.diagnostics.leas_paper import check_runs

    good = {"reasoning": _run(world, tmp_path / "r", loss_on="reasoning"),
            "tool": _run(world, tmp_path / "t", loss_on="tool"),
            "unified": _run(world, tmp_path / "u", loss_on="all")}
    assert set(check_runs(good)) == {"reasoning", "tool", "unified"}
    with pytest.raises(ValueError, match="--tool .*expected one adapter"):
        check_runs({**good, "tool": _run(world, tmp_path / "d", loss_on="tool", mode="dart")})
    with pytest.raises(ValueError, match="--tool .*loss_on 'all', expected 'tool'"):
        check_runs({**good, "tool": _run(world, tmp_path / "a", loss_on="all")})
    with pytest.raises(ValueError, match="adapters of one size"):
        check_runs({**good, "unified": _run(world, tmp_path / "big", loss_on="all", r=4)})
    with pytest.raises(ValueError, match="--unified: missing"):
        check_runs({**good, "unified": None})


def test_cli_requires_paper_flag(world, tmp_path):
    from routed_lora.cli import main

    with pytest.raises(SystemExit, match="give --paper"):
        main(["eval", "leas", "--world-dir", str(world), "--out", str(tmp_path / "x")])
