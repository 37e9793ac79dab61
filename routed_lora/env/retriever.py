"""Retrieval backends with one interface, ``search(queries, topk) -> list[list[dict]]``.

Each result dict has at least ``contents`` (the passage text) and ``score`` (when known), and ``id`` when the
corpus has one.

- :class:`BM25Retriever`: an in-process ``bm25s`` index over a JSONL corpus (``{"id", "contents"}`` rows).
- :class:`HTTPRetriever`: a client for Search-R1's retrieval server protocol::

      POST /retrieve  {"queries": [str, ...], "topk": k, "return_scores": bool}
      ->  {"result": [[{"document": {"id": ..., "contents": ...}, "score": float}, ...], ...]}   (return_scores)
      ->  {"result": [[{"id": ..., "contents": ...}, ...], ...]}                                  (otherwise)

- :func:`serve` / :class:`RetrievalServer`: a real HTTP server (stdlib ``ThreadingHTTPServer``) speaking that
  protocol over any retriever, batching the queries of concurrent requests into one ``search`` call.
- :func:`format_passages`: the text spliced between ``<information>`` and ``</information>``, byte-identical to
  Search-R1's ``_passages2string``.

Search-R1 conventions kept (DESIGN.md §5): a query that matches no document (BM25 score 0) gets no documents;
the server refuses ``topk`` above ``max_topk`` (default 100) with HTTP 400, accepts integral floats (``3.0``),
treats a falsy ``topk`` (absent, null, 0) as its default as Search-R1's server does, answers a request whose
body is shorter than its ``Content-Length`` with 400 after ``read_timeout_s``, and logs a client that hangs up
before its answer is written as one line.
"""

from __future__ import annotations

import json
import queue
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Protocol

from .data import read_jsonl_objects


class RetrieverError(RuntimeError):
    """Retrieval failed."""


class RetrieverUnavailable(RetrieverError):
    """The retrieval server could not be reached (down, wrong host or port)."""


class RetrieverTimeout(RetrieverError):
    """The retrieval server did not answer in time."""


class RetrieverProtocolError(RetrieverError):
    """The retrieval server answered with something that is not the Search-R1 protocol (bad JSON, wrong shape)."""


class Retriever(Protocol):
    def search(self, queries: Sequence[str], topk: int = 3) -> list[list[dict]]: ...


def format_passages(docs: Sequence[dict]) -> str:
    """The text spliced in between ``<information>`` and ``</information>``: byte for byte what Search-R1's
    ``_passages2string`` (``search_r1/llm_agent/generation.py``) builds from the same documents.

    Per document ``i`` (from 1), with ``title`` the first line of ``contents`` and ``text`` the other lines
    joined by ``"\\n"`` (kept as they are, not re-spaced): ``f"Doc {i}(Title: {title}) {text}\\n"``. A one-line
    entry (the built-in world) is all title: ``Doc 1(Title: funmar is a city .) \\n``. No documents give ``""``."""
    out = []
    for i, d in enumerate(docs, 1):
        title, *rest = str(d.get("contents", "")).split("\n")
        text = "\n".join(rest)
        out.append(f"Doc {i}(Title: {title}) {text}\n")
    return "".join(out)


def check_unique_ids(docs: Sequence[dict], lines: Sequence[int] | None = None, *, source: str = "corpus") -> None:
    """Refuse two documents with one ``id`` (results would be ambiguous), naming the first duplicate and where
    both are: their line numbers (``lines[i]``, 1-based) or else their positions in the list."""
    seen: dict[str, int] = {}
    for i, d in enumerate(docs):
        key = str(d.get("id"))
        if key in seen:
            if lines is not None:
                raise RetrieverError(f"{source}:{lines[i]}: duplicate id {key!r} (first on line {lines[seen[key]]}); "
                                     "document ids must be unique")
            raise RetrieverError(f"{source}: documents {seen[key]} and {i} share the id {key!r}; "
                                 "document ids must be unique")
        seen[key] = i


def load_corpus(path: str | Path) -> list[dict]:
    """Read a JSONL corpus of ``{"id", "contents"}`` rows (``id`` optional, defaults to the row number among the
    documents). Duplicate ids are refused, the first one named with its line."""
    path = Path(path)
    if not path.exists():
        raise RetrieverError(f"corpus {path}: no such file")
    if path.is_dir():
        raise RetrieverError(f"corpus {path}: is a directory; expected a JSONL file")
    docs, lines = [], []
    for lineno, row in read_jsonl_objects(path, error=RetrieverError, what="corpus "):
        if not isinstance(row.get("contents"), str):
            raise RetrieverError(f"corpus {path}:{lineno}: expected an object with a 'contents' string")
        docs.append({"id": str(row.get("id", len(docs))), "contents": row["contents"]})
        lines.append(lineno)
    if not docs:
        raise RetrieverError(f"corpus {path}: empty")
    check_unique_ids(docs, lines, source=f"corpus {path}")
    return docs


class BM25Retriever:
    """BM25 (``bm25s``, Lucene variant, English stopwords dropped) over a list of docs or a JSONL corpus file."""

    def __init__(self, corpus: str | Path | Sequence[dict], *, k1: float = 1.5, b: float = 0.75):
        import bm25s

        self._bm25s = bm25s
        if isinstance(corpus, (str, Path)):
            self.docs = load_corpus(corpus)
        else:
            self.docs = [dict(d) for d in corpus]
            if not self.docs:
                raise RetrieverError("empty corpus")
            if any("id" in d for d in self.docs):
                check_unique_ids(self.docs)
        tokens = bm25s.tokenize([d["contents"] for d in self.docs], return_ids=False, show_progress=False)
        if not any(len(t) for t in tokens):
            raise RetrieverError(f"corpus of {len(self.docs)} documents has no searchable word (bm25s drops English "
                                 "stopwords and 1-character tokens)")
        self.index = bm25s.BM25(k1=k1, b=b)
        self.index.index(tokens, show_progress=False)

    def __len__(self) -> int:
        return len(self.docs)

    def search(self, queries: Sequence[str], topk: int = 3) -> list[list[dict]]:
        if isinstance(queries, str):
            raise TypeError("search() takes a list of queries, not one string")
        if not queries:
            return []
        if isinstance(topk, bool) or int(topk) != topk or topk < 1:
            raise ValueError(f"topk: expected an integer >= 1, got {topk!r}")
        k = min(int(topk), len(self.docs))
        toks = self._bm25s.tokenize(list(queries), return_ids=False, show_progress=False)
        idx, scores = self.index.retrieve(toks, k=k, show_progress=False, n_threads=1)
        out = []
        for row_i, row_s in zip(idx.tolist(), scores.tolist()):
            # BM25 scores a document > 0 exactly when it shares a query term (idf > 0 in every bm25s variant):
            # score 0 means no match, and Search-R1's BM25 server returns no such documents
            out.append([{**self.docs[i], "score": float(s)} for i, s in zip(row_i, row_s) if s > 0])
        return out


def _normalise_doc(item, return_scores: bool) -> dict:
    if return_scores and isinstance(item, dict) and "document" in item:
        doc, score = item["document"], item.get("score")
    else:
        doc, score = item, None
    if not isinstance(doc, dict) or not isinstance(doc.get("contents"), str):
        raise RetrieverProtocolError(f"a result is not a document with a 'contents' string: {str(item)[:200]}")
    out = dict(doc)
    if score is not None:
        out["score"] = float(score)
    return out


class HTTPRetriever:
    """Client for a Search-R1 retrieval server (``retrieval_server.py`` or ``routed-lora retriever serve``).

    ``url`` is the full endpoint (``http://127.0.0.1:8000/retrieve``) or the server root (``/retrieve`` is added).
    ``timeout`` (seconds) bounds connecting and each read. ``retries`` (0 = off, the default) re-sends a request
    that failed because the server was unreachable or slow, after ``backoff * 2**attempt`` seconds; protocol
    errors are never retried. Raises :class:`RetrieverUnavailable`, :class:`RetrieverTimeout` or
    :class:`RetrieverProtocolError`, each naming the URL."""

    def __init__(self, url: str, *, timeout: float = 10.0, retries: int = 0, backoff: float = 0.5,
                 return_scores: bool = True):
        parsed = urllib.parse.urlparse(url if "://" in url else f"http://{url}")
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"not an http(s) URL: {url!r}")
        path = parsed.path if parsed.path not in ("", "/") else "/retrieve"
        self.url = urllib.parse.urlunparse(parsed._replace(path=path))
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.return_scores = bool(return_scores)

    def _post(self, payload: dict) -> bytes:
        data = json.dumps(payload).encode()
        req = urllib.request.Request(self.url, data=data, method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.read()
        except urllib.error.HTTPError as exc:
            body = exc.read()[:300].decode(errors="replace")
            raise RetrieverProtocolError(f"retrieval server {self.url} answered HTTP {exc.code}: {body}") from exc
        except (socket.timeout, TimeoutError) as exc:
            raise RetrieverTimeout(f"retrieval server {self.url} did not answer within {self.timeout:g} s") from exc
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, (socket.timeout, TimeoutError)):
                raise RetrieverTimeout(
                    f"retrieval server {self.url} did not answer within {self.timeout:g} s") from exc
            raise RetrieverUnavailable(
                f"retrieval server {self.url} is down or unreachable ({exc.reason}); start one with "
                f"`routed-lora retriever serve --corpus corpus.jsonl --port PORT`") from exc
        except (ConnectionError, OSError) as exc:
            raise RetrieverUnavailable(f"retrieval server {self.url} is down or unreachable ({exc})") from exc

    def search(self, queries: Sequence[str], topk: int = 3) -> list[list[dict]]:
        if isinstance(queries, str):
            raise TypeError("search() takes a list of queries, not one string")
        queries = list(queries)
        if not queries:
            return []
        payload = {"queries": queries, "topk": int(topk), "return_scores": self.return_scores}
        for attempt in range(self.retries + 1):
            try:
                raw = self._post(payload)
                break
            except (RetrieverUnavailable, RetrieverTimeout):
                if attempt == self.retries:
                    raise
                time.sleep(self.backoff * 2 ** attempt)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RetrieverProtocolError(
                f"retrieval server {self.url} returned invalid JSON: {raw[:200]!r}") from exc
        result = body.get("result") if isinstance(body, dict) else None
        if not isinstance(result, list) or len(result) != len(queries):
            raise RetrieverProtocolError(
                f"retrieval server {self.url} returned no 'result' list with one entry per query "
                f"({len(queries)} queries): {str(body)[:200]}")
        out = []
        for row in result:
            if not isinstance(row, list):
                raise RetrieverProtocolError(f"retrieval server {self.url}: a result row is not a list: {row!r:.200}")
            out.append([_normalise_doc(item, self.return_scores) for item in row])
        return out


# ---------------------------------------------------------------------------------------------------------------
# server


class _Batcher:
    """Collects the queries of concurrent requests and answers them with one ``retriever.search`` call.

    A request waits at most ``max_wait_s`` for others to join its batch; a batch holds at most ``max_batch``
    queries (a single larger request is searched alone)."""

    def __init__(self, retriever, max_batch: int = 512, max_wait_s: float = 0.002):
        self.retriever = retriever
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.queue: queue.Queue = queue.Queue()
        self.batches = 0  # number of search calls, for tests and logs
        self.lock = threading.Lock()  # one search at a time (bm25s is not documented thread-safe)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="retrieval-batcher", daemon=True)
        self.thread.start()

    def submit(self, queries: list[str], topk: int) -> list[list[dict]]:
        job = {"queries": queries, "topk": topk, "done": threading.Event(), "result": None, "error": None}
        self.queue.put(job)
        job["done"].wait()
        if job["error"] is not None:
            raise job["error"]
        return job["result"]

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                first = self.queue.get(timeout=0.1)
            except queue.Empty:
                continue
            jobs = [first]
            n = len(first["queries"])
            deadline = time.monotonic() + self.max_wait_s
            while n < self.max_batch:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    job = self.queue.get(timeout=left)
                except queue.Empty:
                    break
                jobs.append(job)
                n += len(job["queries"])
            self._run(jobs)

    def _run(self, jobs: list[dict]) -> None:
        queries = [q for j in jobs for q in j["queries"]]
        k = max(j["topk"] for j in jobs)
        try:
            with self.lock:
                results = self.retriever.search(queries, topk=k)
                self.batches += 1
        except Exception as exc:  # hand the error to every waiting request
            for j in jobs:
                j["error"] = exc
                j["done"].set()
            return
        i = 0
        for j in jobs:
            j["result"] = [r[: j["topk"]] for r in results[i: i + len(j["queries"])]]
            i += len(j["queries"])
            j["done"].set()

    def stop(self) -> None:
        self._stop.set()


class RetrievalServer(ThreadingHTTPServer):
    """Search-R1 protocol over HTTP: ``POST /retrieve``; ``GET /health`` answers ``{"status": "ok", "docs": N}``."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, retriever, host: str = "127.0.0.1", port: int = 8000, *, default_topk: int = 3,
                 max_batch: int = 512, max_wait_s: float = 0.002, verbose: bool = False, max_topk: int = 100,
                 read_timeout_s: float = 5.0, max_body_bytes: int = 64 << 20):
        if not 1 <= default_topk <= max_topk:
            raise ValueError(f"default_topk: expected an integer in [1, max_topk={max_topk}], got {default_topk!r}")
        self.retriever = retriever
        self.default_topk = default_topk
        self.max_topk = max_topk
        self.read_timeout_s = read_timeout_s
        self.max_body_bytes = max_body_bytes
        self.verbose = verbose
        self.batcher = _Batcher(retriever, max_batch=max_batch, max_wait_s=max_wait_s)
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/retrieve"

    def handle_error(self, request, client_address) -> None:
        """A client that went away before its answer was written (it hung up, e.g. as the read timeout fired,
        or reset the connection) is one log line on stderr; anything else keeps socketserver's traceback."""
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError):  # BrokenPipeError, ConnectionResetError, ConnectionAbortedError
            host, port = client_address[:2]
            print(f"retrieval server: client {host}:{port} hung up before its answer was sent "
                  f"({type(exc).__name__})", file=sys.stderr, flush=True)
            return
        super().handle_error(request, client_address)

    def start(self) -> threading.Thread:
        """Serve in a daemon thread (for tests and notebooks); stop with :meth:`stop`."""
        t = threading.Thread(target=self.serve_forever, name="retrieval-server", daemon=True)
        t.start()
        return t

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        self.batcher.stop()


class _Handler(BaseHTTPRequestHandler):
    server: RetrievalServer
    protocol_version = "HTTP/1.1"

    def setup(self):
        # a socket timeout for every read: a request whose body is shorter than its Content-Length (or an idle
        # keep-alive connection) is answered or closed after read_timeout_s instead of holding a thread forever
        self.timeout = self.server.read_timeout_s
        super().setup()

    def log_message(self, fmt, *args):  # quiet unless asked
        if self.server.verbose:
            super().log_message(fmt, *args)

    def _send(self, code: int, obj) -> None:
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path.rstrip("/") in ("/health", ""):
            n = len(self.server.retriever) if hasattr(self.server.retriever, "__len__") else None
            self._send(200, {"status": "ok", "docs": n})
        else:
            self._send(404, {"error": f"unknown path {self.path}; POST /retrieve"})

    def do_POST(self):
        if self.path.rstrip("/") != "/retrieve":
            self._send(404, {"error": f"unknown path {self.path}; POST /retrieve"})
            return
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            self._send(400, {"error": f"bad Content-Length {self.headers.get('Content-Length')!r}"})
            return
        if length > self.server.max_body_bytes:
            self.close_connection = True
            self._send(413, {"error": f"request body of {length} bytes is over the {self.server.max_body_bytes} "
                                      "byte limit"})
            return
        try:
            raw = self.rfile.read(length)
        except (TimeoutError, OSError):
            raw = b""
        if len(raw) < length:
            self.close_connection = True  # the rest of the body may still come; never read it as a request
            self._send(400, {"error": f"request body shorter than its Content-Length of {length} bytes (the rest "
                                      f"did not come within {self.server.read_timeout_s:g} s)"})
            return
        try:
            req = json.loads(raw or b"null")
        except (ValueError, UnicodeDecodeError) as exc:
            self._send(400, {"error": f"invalid JSON: {exc}"})
            return
        if not isinstance(req, dict) or not isinstance(req.get("queries"), list) or not all(
                isinstance(q, str) for q in req["queries"]):
            self._send(400, {"error": "expected {\"queries\": [str, ...], \"topk\": int, \"return_scores\": bool}"})
            return
        topk = req.get("topk")
        # JSON clients may send 3.0 for 3 (Python's json keeps the float): integral floats are accepted
        if isinstance(topk, float) and topk.is_integer():
            topk = int(topk)
        # Search-R1's server: ``if not request.topk: request.topk = config.retrieval_topk`` (absent, null, 0);
        # booleans are refused below rather than read as 0 / 1
        if topk is None or (topk == 0 and not isinstance(topk, bool)):
            topk = self.server.default_topk
        if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
            self._send(400, {"error": f"topk must be a positive integer, got {topk!r}"})
            return
        if topk > self.server.max_topk:
            self._send(400, {"error": f"topk {topk} is over this server's limit of {self.server.max_topk} "
                                      "(retriever serve --max-topk)"})
            return
        return_scores = bool(req.get("return_scores", False))
        try:
            results = self.server.batcher.submit(req["queries"], topk) if req["queries"] else []
        except Exception as exc:
            self._send(500, {"error": f"retrieval failed: {type(exc).__name__}: {exc}"})
            return
        resp = []
        for row in results:
            docs = []
            for d in row:
                doc = {k: v for k, v in d.items() if k != "score"}
                docs.append({"document": doc, "score": d.get("score")} if return_scores else doc)
            resp.append(docs)
        self._send(200, {"result": resp})


def serve(retriever, host: str = "127.0.0.1", port: int = 8000, *, default_topk: int = 3, max_batch: int = 512,
          max_wait_s: float = 0.002, verbose: bool = False, max_topk: int = 100, read_timeout_s: float = 5.0) -> None:
    """Serve ``retriever`` over the Search-R1 protocol until interrupted (Ctrl-C)."""
    server = RetrievalServer(retriever, host, port, default_topk=default_topk, max_batch=max_batch,
                             max_wait_s=max_wait_s, verbose=verbose, max_topk=max_topk,
                             read_timeout_s=read_timeout_s)
    print(f"retrieval server on {server.url} ({len(retriever) if hasattr(retriever, '__len__') else '?'} docs)",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        server.batcher.stop()
