import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from routed_lora.env.retriever import (
    BM25Retriever,
    HTTPRetriever,
    RetrievalServer,
    RetrieverProtocolError,
    RetrieverTimeout,
    RetrieverUnavailable,
    format_passages,
)

DOCS = [
    {"id": "0", "contents": "zalgros gakdru was born in funmar ."},
    {"id": "1", "contents": "funmar is a city in the country teldia ."},
    {"id": "2", "contents": "quellcorp is headquartered in funmar ."},
    {"id": "3", "contents": "zalgros gakdru is employed by quellcorp ."},
    {"id": "4", "contents": "Title Line\nbody text here"},
]


@pytest.fixture(scope="module")
def bm25():
    return BM25Retriever(DOCS)


@pytest.fixture(scope="module")
def server(bm25):
    srv = RetrievalServer(bm25, "127.0.0.1", 0, max_wait_s=0.05)
    srv.start()
    yield srv
    srv.stop()


def test_bm25_search(bm25, tmp_path):
    res = bm25.search(["funmar country", "zalgros gakdru born", "the of a"], topk=3)
    assert len(res) == 3 and [len(r) for r in res[:2]] == [3, 2]  # docs sharing a term
    assert res[2] == []  # only stopwords: nothing matches, no documents (Search-R1's BM25 server; issue 14)
    assert res[0][0]["contents"] == DOCS[1]["contents"] and res[0][0]["score"] > res[0][1]["score"]
    assert res[1][0]["id"] == "0"
    assert bm25.search([], topk=3) == []
    # topk clamped to the corpus, and only the documents that share a term with the query (issue 14)
    assert sorted(d["id"] for d in bm25.search(["funmar"], topk=50)[0]) == ["0", "1", "2"]
    with pytest.raises(TypeError):
        bm25.search("one string", topk=1)
    p = tmp_path / "c.jsonl"
    p.write_text("\n".join(json.dumps(d) for d in DOCS))
    assert BM25Retriever(p).search(["quellcorp headquartered"], 1)[0][0]["id"] == "2"


def test_format_passages():
    # issue 14 changed this pin: Search-R1's _passages2string (a one-line entry is all title, one "\n" per doc)
    text = format_passages([DOCS[0], DOCS[4]])
    assert text == "Doc 1(Title: zalgros gakdru was born in funmar .) \nDoc 2(Title: Title Line) body text here\n"


def test_http_client_matches_in_process(server, bm25):
    client = HTTPRetriever(server.url, timeout=5)
    queries = ["funmar country", "zalgros gakdru employed"]
    got = client.search(queries, topk=2)
    want = bm25.search(queries, topk=2)
    assert [[d["contents"] for d in r] for r in got] == [[d["contents"] for d in r] for r in want]
    assert [[d["id"] for d in r] for r in got] == [[d["id"] for d in r] for r in want]
    assert all(abs(a["score"] - b["score"]) < 1e-5 for ra, rb in zip(got, want) for a, b in zip(ra, rb))
    # without scores, Search-R1 returns the bare documents
    plain = HTTPRetriever(server.url.rsplit("/", 1)[0], timeout=5, return_scores=False).search(queries, 1)
    assert plain[0][0] == {"id": "1", "contents": DOCS[1]["contents"]}
    assert client.search([], 3) == []


def test_server_speaks_search_r1_protocol(server):
    import urllib.request

    req = urllib.request.Request(server.url, method="POST", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"queries": ["funmar country"], "topk": 1,
                                                  "return_scores": True}).encode())
    body = json.loads(urllib.request.urlopen(req, timeout=5).read())
    assert body["result"][0][0]["document"]["contents"] == DOCS[1]["contents"]
    assert isinstance(body["result"][0][0]["score"], float)
    bad = urllib.request.Request(server.url, method="POST", data=b'{"queries": "not a list"}')
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(bad, timeout=5)
    assert e.value.code == 400
    health = json.loads(urllib.request.urlopen(server.url.replace("/retrieve", "/health"), timeout=5).read())
    assert health == {"status": "ok", "docs": len(DOCS)}


def test_server_batches_concurrent_requests(server):
    client = HTTPRetriever(server.url, timeout=10)
    before = server.batcher.batches
    results = [None] * 8
    barrier = threading.Barrier(8)

    def work(i):
        barrier.wait()
        results[i] = client.search([f"funmar country", "zalgros gakdru born"], topk=1)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r[0][0]["id"] == "1" and r[1][0]["id"] == "0" for r in results)
    assert server.batcher.batches - before < 8, "concurrent requests were not batched"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_down_is_a_clear_error():
    client = HTTPRetriever(f"http://127.0.0.1:{_free_port()}/retrieve", timeout=2)
    t0 = time.perf_counter()
    with pytest.raises(RetrieverUnavailable, match="down or unreachable"):
        client.search(["x"], 1)
    assert time.perf_counter() - t0 < 2


class _Stub(ThreadingHTTPServer):
    daemon_threads = True


def _stub(handler_body):
    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            handler_body(self)

    srv = _Stub(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}/retrieve"


def _reply(h, code, body: bytes):
    h.send_response(code)
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    h.wfile.write(body)


def test_slow_server_times_out():
    srv, url = _stub(lambda h: (time.sleep(1.5), _reply(h, 200, b'{"result": [[]]}')))
    try:
        t0 = time.perf_counter()
        with pytest.raises(RetrieverTimeout, match="did not answer within 0.3 s"):
            HTTPRetriever(url, timeout=0.3).search(["x"], 1)
        assert time.perf_counter() - t0 < 1.2
        # retries are off by default, and on request they retry the timeout
        t0 = time.perf_counter()
        with pytest.raises(RetrieverTimeout):
            HTTPRetriever(url, timeout=0.2, retries=1, backoff=0.01).search(["x"], 1)
        assert time.perf_counter() - t0 >= 0.4
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.mark.parametrize("code,body,match", [
    (200, b"<html>not json</html>", "invalid JSON"),
    (200, b'{"oops": 1}', "no 'result' list"),
    (200, b'{"result": [[{"document": {"title": "no contents"}, "score": 1.0}]]}', "'contents'"),
    (500, b'{"error": "boom"}', "HTTP 500"),
])
def test_bad_answers_are_protocol_errors(code, body, match):
    srv, url = _stub(lambda h: _reply(h, code, body))
    try:
        with pytest.raises(RetrieverProtocolError, match=match):
            HTTPRetriever(url, timeout=2).search(["x"], 1)
    finally:
        srv.shutdown()
        srv.server_close()


def test_bad_url():
    with pytest.raises(ValueError):
        HTTPRetriever("ftp://host/x")
