import json

import pytest

from routed_lora.env.data import DataError, load_qa
from routed_lora.env.retriever import BM25Retriever
from routed_lora.env.world import build_world, write_world


@pytest.fixture(scope="module")
def world():
    return build_world(seed=0)


def test_deterministic():
    a, b = build_world(seed=3, n_people=50), build_world(seed=3, n_people=50)
    assert a.passages == b.passages and a.train == b.train and a.test == b.test
    assert build_world(seed=4, n_people=50).passages != a.passages


def test_passages_unique_and_one_per_fact(world):
    contents = [p["contents"] for p in world.passages]
    assert len(set(contents)) == len(contents)
    assert len({p["id"] for p in world.passages}) == len(contents)
    assert len(contents) == 3 * len(world.people) + len(world.cities) + len(world.companies)


def test_names_survive_bm25_tokenisation(world):
    import bm25s

    names = world.first_names + world.last_names + world.countries + list(world.cities) + list(world.companies)
    assert len(set(names)) == len(names)
    toks = bm25s.tokenize(names, return_ids=False, show_progress=False)
    for name, t in zip(names, toks):
        assert t == [name], f"bm25s tokenises the name {name!r} as {t}"


def test_bridges_are_single_words(world):
    for q in world.train + world.test:
        if q["hops"] == 2:
            assert len(q["plan"][0]["object"].split()) == 1, q


def test_held_out_split_disjoint(world):
    train_q = {q["question"] for q in world.train}
    test_q = {q["question"] for q in world.test}
    assert train_q.isdisjoint(test_q)
    held = set(world.held_out_people)
    assert held and all(q["subject"] not in held for q in world.train)
    # every part of a held-out person's name was seen among training people
    train_people = {q["subject"] for q in world.train if q["subject"] in world.people}
    firsts = {p.split()[0] for p in train_people}
    lasts = {p.split()[1] for p in train_people}
    for p in held:
        f, l = p.split()
        assert f in firsts and l in lasts
    hops = {q["hops"] for q in world.test}
    assert hops == {1, 2}


def test_every_hop_answerable_by_bm25_top3(world):
    r = BM25Retriever(world.passages)
    qs = world.train + world.test
    steps = [(q, s) for q in qs for s in q["plan"]]
    results = r.search([s["query"] for _, s in steps], topk=3)
    for (q, s), docs in zip(steps, results):
        contents = [d["contents"] for d in docs]
        assert s["fact"] in contents, (q["question"], s["query"], contents)
        assert s["object"] in s["fact"].split()
    # the 1-hop question text itself (as a query) also finds the fact
    one = [q for q in qs if q["hops"] == 1][:200]
    for q, docs in zip(one, r.search([q["question"] for q in one], topk=3)):
        assert q["plan"][0]["fact"] in [d["contents"] for d in docs], q["question"]


def test_answers_follow_the_plan(world):
    for q in world.test[:100]:
        assert q["golden_answers"] == [q["plan"][-1]["object"]]
        if q["hops"] == 2:
            assert q["plan"][1]["query"].split()[0] == q["plan"][0]["object"]


def test_write_world_and_load(tmp_path, world):
    paths = write_world(world, tmp_path)
    corpus = [json.loads(line) for line in open(paths["corpus"])]
    assert corpus[0].keys() == {"id", "contents"}
    train = load_qa(paths["train"])
    assert len(train) == len(world.train)
    assert all(isinstance(r["golden_answers"], list) and r["hops"] in (1, 2) for r in train)
    assert json.loads(paths["world"].read_text())["sizes"]["test"] == len(world.test)


def test_load_qa_formats_and_errors(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"question": "who?", "golden_answers": ["a", "b"]}, {"question": "what?", "golden_answers": "c"}]
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    got = load_qa(p)
    assert [r["golden_answers"] for r in got] == [["a", "b"], ["c"]]
    # Search-R1 parquet layout: answers under reward_model.ground_truth.target
    t = pa.Table.from_pylist([{"question": "q1", "golden_answers": None,
                               "reward_model": {"ground_truth": {"target": ["x"]}}},
                              {"question": "q2", "golden_answers": ["y"], "reward_model": None}])
    pq.write_table(t, tmp_path / "d.parquet")
    got = load_qa(tmp_path / "d.parquet")
    assert [r["golden_answers"] for r in got] == [["x"], ["y"]]
    assert len(load_qa(p, limit=1)) == 1

    with pytest.raises(DataError, match="no such file"):
        load_qa(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "golden_answers": ["a"]}\n{oops\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: invalid JSON"):
        load_qa(bad)
    noans = tmp_path / "noans.jsonl"
    noans.write_text('{"question": "q"}\n')
    with pytest.raises(DataError, match="golden_answers"):
        load_qa(noans)
    (tmp_path / "d.csv").write_text("x")
    with pytest.raises(DataError, match="unknown format"):
        load_qa(tmp_path / "d.csv")
