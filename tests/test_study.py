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
    assert set(a["arms"]) == {"warm", "dart", "joint", "sft", "two_agent"}
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
    # the controls: every arm also with retrieval held constant, the dart arm also as the 2-Agent system
    for arm in ("warm", "dart", "joint", "sft"):
        gold = (out / "arms" / arm / "seed0" / "per_question_gold.jsonl").read_text().splitlines()
        assert len(gold) == 8
    two = [json.loads(x) for x in (out / "arms" / "dart" / "seed1" / "per_question_two_agent.jsonl").read_text()
           .splitlines()]
    assert [r["id"] for r in two] == [r["id"] for r in recs]
    r1 = json.loads((out / "arms" / "dart" / "seed1" / "result.json").read_text())
    # the DART system inside the 2-Agent comparison decodes exactly as the arm's own greedy evaluation
    assert r1["eval_two_agent"]["dart_records_agree"] == r1["eval_two_agent"]["dart_records"] == 8
    assert "two_agent" in a["arms"] and any(t["b"] == "two_agent" for t in a["tests"])
    assert set(a["held_constant"]["arms"]) == {"warm", "dart", "joint", "sft"} and a["held_constant"]["tests"]
    assert "With retrieval held constant" in report

    # a finished arm without its controls (finished before they existed) gets them from its saved adapters
    gold_file = out / "arms" / "joint" / "seed0" / "per_question_gold.jsonl"
    gold_before = gold_file.read_text()
    gold_file.unlink()

    # resume: finished arms are kept as they are
    stamp = (out / "arms" / "joint" / "seed0" / "result.json").read_text()
    shutil_rm = out / "arms" / "sft" / "seed1" / "result.json"
    shutil_rm.unlink()  # an arm that did not finish
    logs.clear()
    run_study(out, _cfg(), world=tiny_world, threads=1, progress=False, log=logs.append)
    assert gold_file.read_text() == gold_before
    res = json.loads((out / "arms" / "joint" / "seed0" / "result.json").read_text())
    assert {k: v for k, v in res.items() if k != "eval_gold"} == \
        {k: v for k, v in json.loads(stamp).items() if k != "eval_gold"}
    assert any("joint/seed0: controls added" in x for x in logs)
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


def test_changed_primary_metric_is_refused(tmp_path, tiny_world):
    """The primary metric is pre-registered in study.json: a study folder whose saved primary differs from the
    one this version asks is refused before anything trains."""
    from routed_lora.study.design import PRIMARY

    out = tmp_path / "s"
    out.mkdir()
    cfg = _cfg()
    changed = {**PRIMARY, "metric": "held-out greedy EM, 1-hop questions"}
    (out / "study.json").write_text(json.dumps({"primary": changed, "config": cfg.to_dict()}))
    with pytest.raises(ValueError, match="pre-registered the primary metric"):
        run_study(out, cfg, world=tiny_world, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["study.json"]
    # a world of another kind than the settings name: refused too, before training
    with pytest.raises(ValueError, match="a 'default' world, but the study's world kind is 'conflict'"):
        run_study(tmp_path / "s2", _cfg(world_kind="conflict"), world=tiny_world, progress=False)
    assert not (tmp_path / "s2" / "warm_start").exists()


def test_settings_added_later_read_as_their_old_default(tmp_path, tiny_world):
    """A study.json written before ``world_kind`` existed resumes with world_kind 'default' and is refused with
    'conflict'."""
    from routed_lora.study.design import PRIMARY

    out = tmp_path / "s"
    out.mkdir()
    old = _cfg().to_dict()
    old.pop("world_kind")
    (out / "study.json").write_text(json.dumps({"primary": PRIMARY, "config": old}))
    with pytest.raises(ValueError, match="world_kind: saved 'default', asked 'conflict'"):
        run_study(out, _cfg(world_kind="conflict"), world=tiny_world, progress=False)


def test_empty_evaluation_set_is_refused_before_training(tiny_world, tmp_path):
    import shutil

    w = tmp_path / "w"
    shutil.copytree(tiny_world, w)
    (w / "test.jsonl").write_text("")
    with pytest.raises(ValueError, match="evaluation set: .* 0 held-out questions"):
        run_study(tmp_path / "s", _cfg(), world=w, progress=False)
    assert not (tmp_path / "s" / "warm_start").exists() and not (tmp_path / "s" / "arms").exists()
    _ = torch, Path
