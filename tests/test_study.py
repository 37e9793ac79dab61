"""`routed-lora study` on a tiny world: every arm runs, per-question JSONL, the report, resume arm by arm, and
bad input refused before any training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("bm25s")

from routed_lora.study.run import StudyConfig, run_study  # noqa: E402


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    from routed_lora.testing import tiny_world

    return tiny_world(tmp_path_factory.mktemp("world"), layers=1)


def _cfg(**kw):
    base = dict(seeds=2, steps=2, prompts_per_step=2, group_size=2, r=2, lora_alpha=4.0, eval_n=8, sft_steps=3,
                max_new_tokens=8, max_total_tokens=48, max_turns=1)
    base.update(kw)
    return StudyConfig(**base)


def test_study_runs_resumes_and_reports(tiny_world, tmp_path, one_thread):
    out = tmp_path / "study"
    logs = []
    a = run_study(out, _cfg(), world=tiny_world, threads=1, progress=False, log=logs.append)
    assert set(a["arms"]) == {"warm", "dart", "joint", "sft"}
    meta = json.loads((out / "study.json").read_text())
    assert meta["primary"]["comparison"] == ["dart", "joint"] and "2-hop" in meta["primary"]["metric"]
    recs = [json.loads(x) for x in (out / "arms" / "dart" / "seed1" / "per_question.jsonl").read_text().splitlines()]
    assert len(recs) == 8 and {r["hops"] for r in recs} == {1, 2} and all(r["greedy"] in (0, 1) for r in recs)
    # equal trainable parameters: two rank-r adapters vs one of rank 2r
    res = {k: json.loads((out / "arms" / k / "seed0" / "result.json").read_text()) for k in ("dart", "joint", "sft")}
    assert res["dart"]["trainable_parameters"] == res["joint"]["trainable_parameters"] \
        == res["sft"]["trainable_parameters"] > 0
    prim = [t for t in a["tests"] if t["primary"]]
    assert len(prim) == 1 and prim[0]["hop"] == "2hop" and prim[0]["seeds"] == [0, 1]
    report = (out / "report.md").read_text()
    assert "Primary result" in report and "DART - joint" in report and (out / "em.png").exists()

    # resume: finished arms are kept as they are
    stamp = (out / "arms" / "joint" / "seed0" / "result.json").read_text()
    shutil_rm = out / "arms" / "sft" / "seed1" / "result.json"
    shutil_rm.unlink()  # an arm that did not finish
    logs.clear()
    run_study(out, _cfg(), world=tiny_world, threads=1, progress=False, log=logs.append)
    assert (out / "arms" / "joint" / "seed0" / "result.json").read_text() == stamp
    kept = [x for x in logs if "done before, kept" in x]
    assert len(kept) == 6 and not any("sft/seed1" in x for x in kept)
    assert (out / "arms" / "sft" / "seed1" / "result.json").exists()

    # adapters of the wrong rank in a finished arm: refused before anything trains
    man = out / "arms" / "dart" / "seed0" / "adapters" / "routed_lora.json"
    m = json.loads(man.read_text())
    m["r"] = 4
    man.write_text(json.dumps(m))
    before = sorted(p.name for p in (out / "arms").rglob("*"))
    with pytest.raises(ValueError, match=r"dart/seed0: adapters .* \(adapters, r, lora_alpha\)"):
        run_study(out, _cfg(), world=tiny_world, threads=1, progress=False, log=logs.append)
    assert sorted(p.name for p in (out / "arms").rglob("*")) == before
    # other settings in the same folder: refused
    with pytest.raises(ValueError, match="steps: saved 2, asked 3"):
        run_study(out, _cfg(steps=3), world=tiny_world, threads=1, progress=False)


@pytest.mark.parametrize("kw,match", [
    (dict(seeds=0), "seeds: expected an integer >= 1, got 0"),
    (dict(eval_n=0), "eval_n: expected >= 2"),
    (dict(arms=("dart", "lora")), "arms: expected a non-empty subset"),
])
def test_bad_settings_are_refused(kw, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        run_study(tmp_path / "s", _cfg(**kw), world=tmp_path, progress=False)
    assert not (tmp_path / "s").exists()


def test_empty_evaluation_set_is_refused_before_training(tiny_world, tmp_path):
    import shutil

    w = tmp_path / "w"
    shutil.copytree(tiny_world, w)
    (w / "test.jsonl").write_text("")
    with pytest.raises(ValueError, match="evaluation set: .* 0 held-out questions"):
        run_study(tmp_path / "s", _cfg(), world=w, progress=False)
    assert not (tmp_path / "s" / "warm_start").exists() and not (tmp_path / "s" / "arms").exists()
    _ = torch, Path
