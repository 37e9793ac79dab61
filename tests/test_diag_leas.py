import json

import numpy as np
import pytest

from routed_lora.diagnostics import COLUMNS, DESIGN, VARIANTS, leas, read_rates, write_leas
from routed_lora.diagnostics.leas import clip_eps, logit


def _rates_from(coef):
    """Exact rates for planted per-question coefficients (Q, 6): p = sigmoid(X lambda)."""
    z = coef @ DESIGN.T  # (Q, 6) in VARIANTS order
    p = 1.0 / (1.0 + np.exp(-z))
    return {v: p[:, j] for j, v in enumerate(VARIANTS)}


def test_design_is_the_papers_and_invertible():
    rows = dict(zip(VARIANTS, DESIGN.tolist()))
    assert COLUMNS == ("base", "tool", "reasoning", "base*tool", "base*reasoning", "tool*reasoning")
    assert rows["base"] == [1, 0, 0, 0, 0, 0]
    assert rows["reasoning"] == [1, 0, 1, 0, 1, 0]
    assert rows["tool"] == [1, 1, 0, 1, 0, 0]
    assert rows["unified"] == [1] * 6
    assert rows["hybrid_tool"] == [1, 1, 0, 0, 0, 0]
    assert rows["hybrid_reasoning"] == [1, 0, 1, 0, 0, 0]
    assert abs(abs(np.linalg.det(DESIGN)) - 1.0) < 1e-12


def test_planted_coefficients_recovered_exactly():
    rng = np.random.default_rng(0)
    coef = rng.uniform(-1.5, 1.5, size=(50, 6))
    res = leas(_rates_from(coef), eps=1e-9)
    assert res.method == "solve" and res.dropped == 0 and res.columns == COLUMNS
    np.testing.assert_array_equal(res.kept, np.arange(50))
    np.testing.assert_allclose(res.coefficients, coef, atol=1e-9, rtol=0)
    assert res.negative_interaction_share == pytest.approx(float((coef[:, 5] < 0).mean()))
    assert res.residual_max < 1e-9


def test_interaction_reads_as_a_double_difference():
    r = {"base": [0.2], "hybrid_tool": [0.4], "hybrid_reasoning": [0.3], "tool": [0.5], "reasoning": [0.35],
         "unified": [0.6]}
    res = leas(r, eps=1e-6)
    L = {k: logit(np.array(v))[0] for k, v in r.items()}
    want = L["unified"] - L["tool"] - L["reasoning"] + L["base"]
    assert res.column("tool*reasoning")[0] == pytest.approx(want, abs=1e-12)
    assert res.column("tool")[0] == pytest.approx(L["hybrid_tool"] - L["base"], abs=1e-12)
    assert res.column("base*tool")[0] == pytest.approx(L["tool"] - L["hybrid_tool"], abs=1e-12)


def test_clipping_rule():
    assert clip_eps(n_samples=8) == 1 / 16
    assert clip_eps(n_samples=1) == 0.25
    assert clip_eps(eps=0.05, n_samples=8) == 0.05
    assert clip_eps() == 0.01
    with pytest.raises(ValueError):
        clip_eps(eps=0.5)
    r = {v: [1.0] for v in VARIANTS}
    r["base"] = [0.0]
    res = leas(r, n_samples=8)
    # 0 -> 1/16, 1 -> 15/16: lambda_base = logit(1/16) = -log 15
    assert res.eps == 1 / 16
    assert res.column("base")[0] == pytest.approx(-np.log(15.0))
    assert np.all(np.isfinite(res.coefficients))


def test_never_solved_questions_are_dropped_and_counted():
    rng = np.random.default_rng(1)
    coef = rng.uniform(-1, 1, size=(5, 6))
    r = _rates_from(coef)
    for v in VARIANTS:
        r[v] = np.insert(r[v], [1, 3], 0.0)  # never-solved questions at input indices 1 and 4
    r["unified"][6] = 0.0  # a question solved by some variants only stays
    res = leas(r, eps=1e-9, question_ids=list("abcdefg"))
    assert res.dropped == 2 and res.n_questions == 7
    np.testing.assert_array_equal(res.kept, [0, 2, 3, 5, 6])
    assert res.question_ids == list("acdfg")
    np.testing.assert_allclose(res.coefficients[:4], coef[:4], atol=1e-9)
    s = res.summary()
    assert s["dropped_never_solved"] == 2 and s["kept"] == 5


def test_singular_design_falls_back_to_least_squares():
    X = DESIGN.copy()
    X[:, 5] = X[:, 4]
    rng = np.random.default_rng(2)
    r = {v: rng.uniform(0.1, 0.9, size=3) for v in VARIANTS}
    res = leas(r, design=X)
    assert res.method == "lstsq" and res.notes


def test_bad_inputs_raise():
    good = {v: [0.5, 0.5] for v in VARIANTS}
    with pytest.raises(KeyError, match="missing"):
        leas({k: v for k, v in good.items() if k != "tool"})
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        leas({**good, "tool": [0.5, 1.5]})
    with pytest.raises(ValueError, match="one rate per question"):
        leas({**good, "tool": [0.5]})
    with pytest.raises(ValueError, match="non-finite"):
        leas({**good, "tool": [0.5, float("nan")]})


def test_read_wide_csv_and_long_jsonl(tmp_path):
    rng = np.random.default_rng(3)
    coef = rng.uniform(-1, 1, size=(4, 6))
    r = _rates_from(coef)
    wide = tmp_path / "rates.csv"
    lines = ["id," + ",".join(VARIANTS)]
    lines += [f"q{i}," + ",".join(repr(float(r[v][i])) for v in VARIANTS) for i in range(4)]
    wide.write_text("\n".join(lines) + "\n")
    rates, ids, n = read_rates(wide)
    assert ids == ["q0", "q1", "q2", "q3"] and n is None
    np.testing.assert_allclose(leas(rates, eps=1e-9).coefficients, coef, atol=1e-9)

    # long form, as `routed-lora eval` writes it: one file per variant, correct counts over n samples
    paths = []
    for v in VARIANTS:
        p = tmp_path / f"eval_{v}.jsonl"
        with p.open("w") as fh:
            for i in (2, 0, 1):  # any order
                fh.write(json.dumps({"variant": v, "dataset": "hop1", "id": i, "n": 4,
                                     "correct": [1, 0, 0, 0] if v == "unified" else [0, 0, 0, 0]}) + "\n")
        paths.append(p)
    rates, ids, n = read_rates(paths)
    assert n == 4 and ids == ["hop1/2", "hop1/0", "hop1/1"]
    np.testing.assert_allclose(rates["unified"], 0.25)
    res = leas(rates, n_samples=n)
    assert res.dropped == 0 and res.eps == 1 / 8
    paths[0].write_text(paths[0].read_text().splitlines()[0] + "\n")
    with pytest.raises(ValueError, match="no rate for 2"):
        read_rates(paths)


def test_write_leas(tmp_path):
    r = {v: [0.5, 0.0] for v in VARIANTS}
    out = write_leas(leas(r, n_samples=2, question_ids=["x", "y"]), tmp_path)
    assert out["csv"].read_text().splitlines()[0] == "index,id," + ",".join(COLUMNS)
    assert len(out["csv"].read_text().splitlines()) == 2  # header + the one kept question
    s = json.loads(out["summary"].read_text())
    assert s["dropped_never_solved"] == 1 and s["columns"]["tool*reasoning"]["mean"] == 0.0


def test_read_greedy_only_rows(tmp_path):
    p = tmp_path / "g.jsonl"
    p.write_text("".join(json.dumps({"variant": v, "id": i, "n": 0, "correct": [], "rate": None,
                                     "greedy": int(v == "unified" and i == 0)}) + "\n"
                         for v in VARIANTS for i in range(2)))
    rates, ids, n = read_rates(p)
    assert n == 1 and ids == [0, 1] and list(rates["unified"]) == [1.0, 0.0]
    res = leas(rates, n_samples=n)
    assert res.dropped == 1 and res.eps == 0.25  # min(1/(2n), 1/4)
    assert res.column("tool*reasoning")[0] == pytest.approx(2 * np.log(3.0))
