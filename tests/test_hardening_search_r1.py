"""Issue 14, item 4: a drop-in for Search-R1 (DESIGN.md §5). The passage text is byte-identical to Search-R1's
``_passages2string`` (oracle written below from its definition), no-match queries return no documents, the
server caps ``topk`` (``max_topk``), accepts integral floats, answers a short body with 400 instead of hanging,
and veRL-style data rows load. Duplicate corpus ids are refused. The rollout path through the HTTP server
splices the same ids as in-process search."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request

import pytest

from routed_lora.env.data import SEARCH_R1_PROMPT, DataError, load_qa, make_prompt
from routed_lora.env.retriever import (BM25Retriever, HTTPRetriever, RetrievalServer, RetrieverError,
                                       format_passages, load_corpus)

pytest.importorskip("bm25s")


def search_r1_passages(docs) -> str:
    """The oracle, from Search-R1's definition: per document i (from 1), title = first line of contents, text =
    the other lines joined by a newline, f"Doc {i}(Title: {title}) {text}" and a newline."""
    s = ""
    for i, d in enumerate(docs):
        lines = d["document"]["contents"].split("\n")
        s += "Doc " + str(i + 1) + "(Title: " + lines[0] + ") " + "\n".join(lines[1:]) + "\n"
    return s


CORPUS = [
    {"id": "w1", "contents": '"Ada Lovelace"\nAda Lovelace was an English mathematician.\nShe wrote the first '
                             "program."},
    {"id": "w2", "contents": '"Charles Babbage"\nCharles Babbage  designed   the Analytical Engine.'},
    {"id": "w3", "contents": "one line passage about the analytical engine ."},
    {"id": "w4", "contents": '"Trailing"\ntext with a trailing newline\n'},
    {"id": "w5", "contents": '"Blank lines"\n\nafter a blank line\n\n\nand more'},
    {"id": "w6", "contents": ""},
]


def test_passages_are_byte_identical_to_search_r1():
    for k in range(len(CORPUS) + 1):
        docs = CORPUS[:k]
        assert format_passages(docs) == search_r1_passages([{"document": d} for d in docs]), k
    # any order and repetition
    docs = [CORPUS[4], CORPUS[0], CORPUS[4]]
    assert format_passages(docs) == search_r1_passages([{"document": d} for d in docs])
    assert format_passages([]) == ""


@pytest.fixture(scope="module")
def bm25():
    return BM25Retriever(CORPUS)


@pytest.fixture(scope="module")
def server(bm25):
    srv = RetrievalServer(bm25, "127.0.0.1", 0, max_wait_s=0.01, max_topk=4, read_timeout_s=0.5)
    srv.start()
    yield srv
    srv.stop()


def _post(url, payload, timeout=5):
    req = urllib.request.Request(url, method="POST", headers={"Content-Type": "application/json"},
                                 data=json.dumps(payload).encode())
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_no_match_returns_no_documents(bm25, server):
    assert bm25.search(["zzzunknownword qqq"], topk=3) == [[]]
    assert bm25.search(["the of a"], topk=3) == [[]]  # only stopwords
    both = bm25.search(["babbage", "zzzunknownword"], topk=3)
    assert [d["id"] for d in both[0]] == ["w2"] and both[1] == []
    assert all(d["score"] > 0 for d in both[0])
    code, body = _post(server.url, {"queries": ["zzzunknownword", "babbage"], "topk": 3, "return_scores": True})
    assert code == 200 and body["result"][0] == [] and body["result"][1][0]["document"]["id"] == "w2"
    assert HTTPRetriever(server.url, timeout=5).search(["zzzunknownword"], 2) == [[]]


@pytest.mark.parametrize("topk,code,n", [(3.0, 200, 2), (1, 200, 1), (4, 200, 2), (5, 400, None),
                                         (10**9, 400, None), (2.5, 400, None), (0, 200, 2), (-1, 400, None),
                                         (True, 400, None), ("3", 400, None), (None, 200, 2)])
def test_topk_values(server, topk, code, n):
    got, body = _post(server.url, {"queries": ["analytical engine"], "topk": topk, "return_scores": True})
    assert got == code, body
    if code == 200:
        assert len(body["result"][0]) == n  # two documents mention the engine; the default topk is 3
    else:
        assert "topk" in body["error"]
    if topk == 5:
        assert "limit of 4" in body["error"]


def test_short_body_is_answered_400_not_a_hang(server):
    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=5) as s:
        body = b'{"queries": ["x"]'
        s.sendall(b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n" + body)
        t0 = time.perf_counter()
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        waited = time.perf_counter() - t0
    assert data.startswith(b"HTTP/1.1 400"), data[:200]
    assert b"shorter than its Content-Length" in data
    assert 0.3 < waited < 3.0, waited
    # the server still answers others
    assert _post(server.url, {"queries": ["babbage"], "topk": 1})[0] == 200


def test_bad_content_length(server):
    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 400")


def test_max_topk_must_cover_the_default():
    with pytest.raises(ValueError, match="default_topk"):
        RetrievalServer(BM25Retriever(CORPUS[:2]), "127.0.0.1", 0, default_topk=5, max_topk=4)


def test_duplicate_ids_are_refused_naming_the_first(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('{"id": "a", "contents": "x"}\n\n{"id": "b", "contents": "y"}\n{"id": "b", "contents": "z"}\n'
                 '{"id": "a", "contents": "w"}\n')
    with pytest.raises(RetrieverError, match=r"c.jsonl:4: duplicate id 'b' \(first on line 3\)"):
        load_corpus(p)
    with pytest.raises(RetrieverError, match="share the id 'a'"):
        BM25Retriever([{"id": "a", "contents": "x"}, {"id": "a", "contents": "y"}])
    # an id given as a number and the same as a string are one id
    p.write_text('{"id": 1, "contents": "x"}\n{"id": "1", "contents": "y"}\n')
    with pytest.raises(RetrieverError, match="duplicate id '1'"):
        load_corpus(p)


# ------------------------------------------------------------------------------------------------ data rows


def _verl_row(question, answers):
    """A row as Search-R1's scripts/data_process/nq_search.py writes it (without its extra 'question' key)."""
    return {"data_source": "nq", "prompt": [{"role": "user", "content": make_prompt(question, SEARCH_R1_PROMPT)}],
            "ability": "fact-reasoning", "reward_model": {"style": "rule", "ground_truth": {"target": answers}},
            "extra_info": {"split": "train", "index": 0}}


def test_verl_rows_are_accepted(tmp_path):
    rows = [_verl_row("who wrote the first program?", ["Ada Lovelace", "Lovelace"]),
            {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q: who?"}],
             "reward_model": {"ground_truth": {"target": "Babbage"}}}]
    p = tmp_path / "verl.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    got = load_qa(p)
    assert got[0]["question"] == "who wrote the first program?"
    assert got[0]["golden_answers"] == ["Ada Lovelace", "Lovelace"]
    # the Search-R1 template rebuilds the row's own prompt exactly
    assert make_prompt(got[0]["question"], SEARCH_R1_PROMPT) == rows[0]["prompt"][0]["content"]
    # another prompt: the first user message is the question as it is
    assert got[1]["question"] == "q: who?" and got[1]["golden_answers"] == ["Babbage"]
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([rows[0]]), tmp_path / "verl.parquet")
    assert load_qa(tmp_path / "verl.parquet")[0]["question"] == "who wrote the first program?"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": [{"role": "assistant", "content": "x"}], "golden_answers": ["a"]}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: no 'question' string, nor a user message"):
        load_qa(bad)


def test_data_errors_name_the_line_as_editors_count(tmp_path):
    good = json.dumps({"question": "q", "golden_answers": ["a"]})
    p = tmp_path / "d.jsonl"
    p.write_text(f"{good}\n\n{good}\n   \n" + json.dumps({"question": "q"}) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl:5: no 'golden_answers'"):
        load_qa(p)
    p.write_bytes(good.encode() + b"\n\n" + b'{"question": "\xff"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:3: not UTF-8"):
        load_qa(p)
    p.write_bytes(b"\xef\xbb\xbf" + good.encode() + b"\n")  # a UTF-8 byte order mark is not data
    assert load_qa(p)[0]["question"] == "q"


# ------------------------------------------------------------------------------------------------ rollout path


def test_http_and_in_process_give_the_same_information_ids(bm25, server):
    """What the model is fed after each search: same documents, same text, same token ids via the server."""
    pytest.importorskip("transformers")
    from routed_lora.env.rollout import information_ids
    from routed_lora.env.tokenizer import build_tokenizer

    tok = build_tokenizer([format_passages(CORPUS)])
    client = HTTPRetriever(server.url, timeout=5)
    queries = ["analytical engine", "ada lovelace program", "zzzunknownword", "trailing newline", "blank lines"]
    for k in (1, 3, 4):
        a, b = bm25.search(queries, topk=k), client.search(queries, topk=k)
        assert [[d["id"] for d in r] for r in a] == [[d["id"] for d in r] for r in b]
        for ra, rb in zip(a, b):
            assert format_passages(ra) == format_passages(rb)
            assert information_ids(tok, ra) == information_ids(tok, rb)
    assert format_passages(client.search(["zzzunknownword"], 3)[0]) == ""
