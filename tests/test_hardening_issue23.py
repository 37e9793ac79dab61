"""Issue 23, defects 3-5: ``load_adapters`` names a missing folder first; the retrieval server treats a falsy
``topk`` as its default (as Search-R1's does); a client that hangs up before its answer is written costs one log
line, not a traceback."""

from __future__ import annotations

import json
import socket
import struct
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("transformers")


# ------------------------------------------------------------------------------------ 3. load_adapters, no folder


def test_load_adapters_names_a_missing_folder_on_a_plain_model(tmp_path):
    import routed_lora as rl
    from routed_lora.testing import tiny_model

    plain = tiny_model()
    with pytest.raises(FileNotFoundError, match=r"nope: no such folder"):
        rl.load_adapters(plain, tmp_path / "nope")
    assert not any(isinstance(m, rl.RoutedLoRALinear) for m in plain.modules())  # nothing was patched
    # as on a patched model
    patched = rl.apply_routed_lora(tiny_model(), target_modules=["q_proj"], r=2, adapters=("a", "b"))
    with pytest.raises(FileNotFoundError, match=r"nope: no such folder"):
        rl.load_adapters(patched, tmp_path / "nope")
    # a folder that exists but holds no manifest still says what a plain model needs
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no RoutedLoRALinear layers"):
        rl.load_adapters(plain, tmp_path / "empty")


# ------------------------------------------------------------------------------------ 4-5. the retrieval server

CORPUS = [{"id": "w1", "contents": '"Engine"\nThe analytical engine of Babbage.'},
          {"id": "w2", "contents": '"Babbage"\nCharles Babbage designed the analytical engine.'},
          {"id": "w3", "contents": '"Lovelace"\nAda Lovelace wrote notes.'}]


@pytest.fixture(scope="module")
def server():
    pytest.importorskip("bm25s")
    from routed_lora.env.retriever import BM25Retriever, RetrievalServer

    srv = RetrievalServer(BM25Retriever(CORPUS), "127.0.0.1", 0, max_wait_s=0.01, default_topk=1, max_topk=3,
                          read_timeout_s=0.5)
    srv.start()
    yield srv
    srv.stop()


def _post(url, payload):
    req = urllib.request.Request(url, method="POST", headers={"Content-Type": "application/json"},
                                 data=json.dumps(payload).encode())
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("topk", [0, 0.0, None, "absent"])
def test_falsy_topk_means_the_default(server, topk):
    """Search-R1's server: ``if not request.topk: request.topk = config.retrieval_topk``. The default here is 1;
    two documents mention the engine."""
    payload = {"queries": ["analytical engine"], "return_scores": True}
    if topk != "absent":
        payload["topk"] = topk
    code, body = _post(server.url, payload)
    assert code == 200, body
    assert len(body["result"][0]) == 1
    assert len(_post(server.url, {**payload, "topk": 2})[1]["result"][0]) == 2  # and an explicit topk counts


@pytest.mark.parametrize("topk", [-1, False, True, "0", 2.5])
def test_other_bad_topk_still_400(server, topk):
    code, body = _post(server.url, {"queries": ["analytical engine"], "topk": topk})
    assert code == 400 and "topk" in body["error"], body


def test_client_hanging_up_is_one_log_line_not_a_traceback(server, capfd):
    """A client sends part of its body and hangs up (a reset) while the server waits for the rest: the server's
    400 then goes to a closed connection. That is logged as one line, and the server keeps serving."""
    host, port = server.server_address[:2]
    capfd.readouterr()
    s = socket.create_connection((host, port), timeout=5)
    s.sendall(b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: 100\r\n\r\n" + b'{"queries": ["x"]')
    time.sleep(0.1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a reset
    s.close()
    deadline = time.monotonic() + 5
    err = ""
    while time.monotonic() < deadline:
        time.sleep(0.1)
        err += capfd.readouterr().err
        if "hung up" in err or "Traceback" in err:
            time.sleep(0.2)
            err += capfd.readouterr().err
            break
    lines = [x for x in err.splitlines() if x.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1 and "hung up" in lines[0] and f"{host}:" in lines[0], lines
    assert _post(server.url, {"queries": ["babbage"], "topk": 1})[0] == 200
