"""The conflict world (issue 21): codes in queries and passages, natural names in questions, thoughts and answers;
scripted queries retrieve their fact first; expert trajectories route the codes to the tool adapter."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("bm25s")

from routed_lora.env.conflict_world import CODE_WORD, build_conflict_world  # noqa: E402
from routed_lora.env.retriever import BM25Retriever  # noqa: E402
from routed_lora.env.world import build_world  # noqa: E402

SMALL = dict(n_first=8, n_last=8, n_people=40, n_countries=3, n_cities=8, n_companies=6)


@pytest.fixture(scope="module")
def world():
    return build_conflict_world(seed=1, **SMALL)


def test_deterministic_and_same_questions_as_the_default_world(world):
    again = build_conflict_world(seed=1, **SMALL)
    assert again.passages == world.passages and again.train == world.train and again.codes == world.codes
    base = build_world(seed=1, **SMALL)
    strip = lambda rows: [(r["question"], r["golden_answers"], r["hops"]) for r in rows]  # noqa: E731
    assert strip(world.train) == strip(base.train) and strip(world.test) == strip(base.test)
    assert build_conflict_world(seed=2, **SMALL).codes != world.codes


def test_codes_are_a_bijection_disjoint_from_names(world):
    names = world.first_names + world.last_names + world.countries + list(world.cities) + list(world.companies)
    assert sorted(world.codes) == sorted(names)
    codes = list(world.codes.values())
    assert len(set(codes)) == len(codes) and not set(codes) & set(names)
    assert all(re.fullmatch(r"[a-z]+[0-9][a-z]+", c) for c in codes)
    assert CODE_WORD not in names


def test_languages_by_role(world):
    codes = set(world.codes.values())
    names = set(world.codes)
    for row in world.train + world.test:
        words = set(row["question"].split()) | {w for a in row["golden_answers"] for w in a.split()}
        assert not words & codes, row  # codes never in questions or answers
        for step in row["plan"]:
            q = step["query"].split()
            assert set(q[:-1]) <= codes and q[-1] not in codes and q[-1] not in names  # codes + the keyword
            assert not set(step["fact"].split()) & codes  # thoughts: natural names only
            p = step["passage"].split()
            # the passage mixes both: the subject in code, the object by name followed by "code <its code>"
            assert p[: len(q) - 1] == q[:-1]
            obj = step["object"].split()
            i = p.index(CODE_WORD)
            assert p[i - len(obj): i] == obj and p[i + 1: i + 1 + len(obj)] == [world.codes[w] for w in obj]


def test_scripted_queries_retrieve_their_fact_first(world):
    r = BM25Retriever(world.passages)
    steps = [s for row in world.train + world.test for s in row["plan"]]
    top = r.search([s["query"] for s in steps], topk=3)
    wrong = [s["query"] for s, t in zip(steps, top) if not t or t[0]["contents"] != s["passage"]]
    assert not wrong, wrong[:5]
    # the natural name as a query (a tool that copies instead of translating) does not find the fact first
    row = next(r_ for r_ in world.test if r_["hops"] == 2)
    natural = f"{row['plan'][0]['object']} country"
    assert r.search([natural], topk=1)[0][0]["contents"] != row["plan"][1]["passage"]


def test_held_out_names_are_new_combinations_of_coded_words(world):
    train_words = {w for row in world.train for w in row["question"].split()}
    for p in world.held_out_people:
        assert all(w in train_words for w in p.split()), p


def test_world_build_cli_conflict(tmp_path):
    import json

    from routed_lora.cli import main

    assert main(["world", "build", "--kind", "conflict", "--out", str(tmp_path / "w"), "--people", "30",
                 "--hidden", "16", "--layers", "1"]) == 0
    meta = json.loads((tmp_path / "w" / "world.json").read_text())
    assert meta["kind"] == "conflict" and len(meta["codes"]) > 30
    row = json.loads((tmp_path / "w" / "train.jsonl").read_text().splitlines()[0])
    assert "passage" in row["plan"][0]
    from routed_lora.env.tokenizer import load_tokenizer

    tok = load_tokenizer(tmp_path / "w" / "model")
    # the codes of every city are words of the vocabulary (every city has a passage)
    assert all(tok.convert_tokens_to_ids(meta["codes"][c]) != tok.unk_token_id for c in meta["cities"])


def test_expert_trajectory_routes_codes_to_the_tool(world, tmp_path):
    import routed_lora as rl
    from routed_lora.env.tokenizer import build_tokenizer
    from routed_lora.env.trajectories import build_trajectories, vocab_texts

    tok = build_tokenizer(vocab_texts(world))
    row = next(r for r in world.train if r["hops"] == 2)
    traj = build_trajectories(tok, [row], BM25Retriever(world.passages))[0]
    router = rl.TagRouter(tok, spans={"tool": ("<search>", "</search>")}, default="reasoning",
                          adapters=("reasoning", "tool"))
    import torch

    routes = router(torch.tensor(traj["input_ids"])).tolist()
    codes = {tok.convert_tokens_to_ids(c) for c in world.codes.values()}
    names = {tok.convert_tokens_to_ids(n) for n in world.codes}
    written = [(t, r) for t, r, m in zip(traj["input_ids"], routes, traj["loss_mask"]) if m]
    # every code the expert writes is written by the tool adapter, every name by the reasoning adapter
    assert {r for t, r in written if t in codes} == {1}
    assert {r for t, r in written if t in names} == {0}
    assert sum(t in codes for t, _ in written) >= 3 and sum(t in names for t, _ in written) >= 3
