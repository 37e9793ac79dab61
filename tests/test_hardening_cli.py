"""Issue 14, item 3: every user error of every sub-command is one line ``routed-lora: error: ...`` on stderr,
exit status 2, no traceback (``--debug`` shows it), and nothing is written to ``--out`` before all inputs are
checked. Item 2's ``--resume`` checks run through the CLI too (test_resume_*)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("bm25s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny world (model, corpus, train/test data) and broken input files. Line 5 of ``no_gold.jsonl`` lacks
    golden_answers, with blank lines before it (1-based numbering counts them)."""
    from routed_lora.testing import tiny_world

    root = tmp_path_factory.mktemp("cli")
    tiny_world(root / "world", layers=2)
    good = json.dumps({"question": "who ?", "golden_answers": ["x"]})
    (root / "no_gold.jsonl").write_text(f"{good}\n\n{good}\n\n" + json.dumps({"question": "q"}) + "\n")
    (root / "bad_json.jsonl").write_text(f"{good}\n\n{{not json\n")
    (root / "dup.jsonl").write_text('{"id": "a", "contents": "one"}\n\n{"id": "b", "contents": "two"}\n'
                                    '{"id": "a", "contents": "three"}\n')
    (root / "a_file").write_text("x")
    (root / "bench.jsonl").write_text('{"run_id": "r1", "provider": "linear"}\n')
    (root / "nowords.jsonl").write_text('{"id": "1", "contents": "a b the"}\n')  # bm25s drops all of it
    (root / "rates.csv").write_text("id,base\n1,0.5\n")
    (root / "empty_dir").mkdir()
    return root


def _fill(args: list[str], f: Path) -> list[str]:
    w = f / "world"
    subs = {"{model}": str(w / "model"), "{data}": str(w / "train.jsonl"), "{test}": str(w / "test.jsonl"),
            "{corpus}": str(w / "corpus.jsonl"), "{world}": str(w), "{out}": str(f / "out"),
            "{no_gold}": str(f / "no_gold.jsonl"), "{bad_json}": str(f / "bad_json.jsonl"),
            "{dup}": str(f / "dup.jsonl"), "{file}": str(f / "a_file"), "{missing}": str(f / "missing.jsonl"),
            "{rates}": str(f / "rates.csv"), "{nowords}": str(f / "nowords.jsonl"),
            "{bench_rows}": str(f / "bench.jsonl"), "{empty_dir}": str(f / "empty_dir"),
            "{down}": f"http://127.0.0.1:{_free_port()}/retrieve"}
    out = []
    for a in args:
        for k, v in subs.items():
            a = a.replace(k, v)
        out.append(a)
    return out


# a run that would be short if a bad value got through (each case's flags come after these: the last one counts)
TRAIN = ["train", "--model", "{model}", "--data", "{data}", "--retriever", "bm25:{corpus}", "--out", "{out}",
         "--no-progress", "--steps", "1", "--prompts-per-step", "2", "-G", "2", "--max-new-tokens", "2",
         "--max-total-tokens", "8", "--threads", "1", "--target-modules", "q_proj"]

# (invocation, a piece the one-line message must contain)
CASES = [
    # train: flag values
    (TRAIN + ["--steps", "0"], "--steps: expected an integer >= 1, got '0'"),
    (TRAIN + ["--steps", "two"], "--steps"),
    (TRAIN + ["--prompt", "q {foo}"], "--prompt: unknown field {foo}"),
    (TRAIN + ["--prompt", "a prompt without a field"], "--prompt: the template has no {question}"),
    (TRAIN + ["--prompt", "q {question} {"], "--prompt: not a valid template"),
    (TRAIN + ["--lr", "nan"], "--lr: expected a finite number > 0, got 'nan'"),
    (TRAIN + ["--lr", "inf"], "--lr"),
    (TRAIN + ["--lr", "-1e-3"], "--lr"),
    (TRAIN + ["--lr-tool", "nan"], "--lr-tool"),
    (TRAIN + ["--topk", "0"], "--topk: expected an integer >= 1"),
    (TRAIN + ["--max-turns", "-1"], "--max-turns: expected an integer >= 0"),
    (TRAIN + ["-G", "1"], "--group-size"),
    (TRAIN + ["--lora-alpha", "nan"], "--lora-alpha"),
    (TRAIN + ["--temperature", "0"], "--temperature"),
    (TRAIN + ["--beta", "-0.1"], "--beta"),
    (TRAIN + ["--max-grad-norm", "inf"], "--max-grad-norm"),
    (TRAIN + ["--limit", "0"], "--limit"),
    (TRAIN + ["--mode", "bogus"], "--mode"),
    (TRAIN + ["--aggregation", "sum"], "--aggregation"),
    (["train", "--data", "{data}", "--retriever", "bm25:{corpus}", "--out", "{out}"], "--model"),
    # train: files
    (TRAIN[:4] + ["{no_gold}"] + TRAIN[5:], "--data: " + "{no_gold}" + ":5: no 'golden_answers'"),
    (TRAIN[:4] + ["{bad_json}"] + TRAIN[5:], "{bad_json}:3: invalid JSON"),
    (TRAIN[:4] + ["{missing}"] + TRAIN[5:], "--data: {missing}: no such file"),
    (TRAIN + ["--eval-data", "{no_gold}"], "--eval-data: {no_gold}:5:"),
    (TRAIN[:6] + ["bm25:{dup}"] + TRAIN[7:], "--retriever: corpus {dup}:4: duplicate id 'a' (first on line 1)"),
    (TRAIN[:6] + ["ftp://host/x"] + TRAIN[7:], "--retriever: expected bm25:PATH or http://host:port"),
    (TRAIN[:6] + ["{down}"] + TRAIN[7:], "--retriever: retrieval server"),
    (TRAIN[:2] + ["{empty_dir}"] + TRAIN[3:], "--model: {empty_dir} is not a model folder"),
    (TRAIN + ["--resume"], "--resume: no checkpoint at"),
    (TRAIN[:8] + ["{file}"] + TRAIN[9:], "--out: {file} exists and is not a folder"),
    (TRAIN + ["--adapters", "{missing}"], "--adapters"),
    (TRAIN[:-1] + ["nope_proj"], "--target-modules"),
    # demo
    (["demo", "--threads", "0"], "demo: argument --threads"),
    (["demo", "--two-hop-frac", "2"], "--two-hop-frac"),
    (["demo", "--lr", "nan"], "--lr"),
    (["demo", "--out", "{file}"], "--out"),
    # world build
    (["world", "build", "--out", "{file}"], "--out: {file} exists and is not a folder"),
    (["world", "build", "--out", "{out}", "--people", "0"], "--people"),
    (["world", "build", "--out", "{out}", "--people", "10000"], "--people"),
    (["world", "build", "--out", "{out}", "--hidden", "0"], "--hidden"),
    (["world"], "world: the following arguments are required"),
    # sft
    (["sft", "--world-dir", "{world}", "--out", "{out}", "--steps", "0"], "--steps"),
    (["sft", "--world-dir", "{world}", "--out", "{out}", "--lr", "inf"], "--lr"),
    (["sft", "--world-dir", "{world}", "--out", "{out}", "--model", "{empty_dir}"], "--model"),
    (["sft", "--world-dir", "{file}", "--out", "{out}"], "--world-dir"),
    # retriever serve (all refused before the server listens)
    (["retriever", "serve", "--corpus", "{dup}"], "--corpus: corpus {dup}:4: duplicate id 'a'"),
    (["retriever", "serve", "--corpus", "{missing}"], "--corpus"),
    (["retriever", "serve", "--corpus", "{nowords}"], "--corpus: corpus of 1 documents has no searchable word"),
    (["retriever", "serve", "--corpus", "{corpus}", "--port", "70000"], "--port"),
    (["retriever", "serve", "--corpus", "{corpus}", "--topk", "0"], "--topk"),
    (["retriever", "serve", "--corpus", "{corpus}", "--topk", "200"], "--topk: the default topk 200 is over"),
    (["retriever", "serve", "--corpus", "{corpus}", "--max-topk", "0"], "--max-topk"),
    (["retriever", "serve", "--corpus", "{corpus}", "--max-wait-ms", "nan"], "--max-wait-ms"),
    (["retriever", "serve", "--corpus", "{corpus}", "--read-timeout", "0"], "--read-timeout"),
    # eval
    (["eval", "--world-dir", "{missing}", "--out", "{out}"], "--world-dir"),
    (["eval", "--model", "{empty_dir}", "--data", "{data}", "--corpus", "{corpus}", "--out", "{out}"], "--model"),
    (["eval", "--model", "{model}", "--data", "{no_gold}", "--corpus", "{corpus}", "--out", "{out}"],
     "--data: {no_gold}:5:"),
    (["eval", "--model", "{model}", "--data", "{data}", "--corpus", "{dup}", "--out", "{out}"], "duplicate id"),
    (["eval", "--world-dir", "{world}", "--out", "{out}", "--topk", "0"], "--topk"),
    (["eval", "--world-dir", "{world}", "--out", "{out}", "--temperature", "nan"], "--temperature"),
    (["eval", "--world-dir", "{world}", "--out", "{out}", "--samples", "0", "--no-greedy"], "--samples"),
    (["eval", "--world-dir", "{world}", "--out", "{file}"], "--out"),
    (["eval", "--world-dir", "{world}", "--out", "{out}", "--adapters", "{missing}"], "--adapters"),
    (["eval", "--out", "{out}"], "give --model"),
    # diagnose
    (["diagnose", "grad-angle", "--world-dir", "{world}", "--out", "{out}", "--questions", "0"], "--questions"),
    (["diagnose", "grad-angle", "--world-dir", "{world}", "--out", "{out}", "--group-size", "1"], "--group-size"),
    (["diagnose", "grad-angle", "--world-dir", "{world}", "--out", "{out}", "--hops", "9"], "--hops"),
    (["diagnose", "leas", "--rates", "{missing}", "--out", "{out}"], "--rates"),
    (["diagnose", "leas", "--rates", "{rates}", "--out", "{out}", "--eps", "0.7"], "--eps"),
    (["diagnose"], "diagnose: the following arguments are required"),
    # bench
    (["bench", "--device", "tpu"], "--device"),
    (["bench", "--providers", "linear,foo"], "--providers"),
    (["bench", "--threads", "0"], "--threads"),
    (["bench", "report", "{missing}"], "results: {missing}: no such file"),
    (["bench", "report", "{bench_rows}", "--run-id", "bogus"], "--run-id: no run 'bogus'"),
    (["bench", "compile-report", "--arch", "x"], "--arch"),
    # the top level
    (["frobnicate"], "invalid choice: 'frobnicate'"),
]


@pytest.mark.parametrize("argv,expect", CASES, ids=[" ".join(a[:2] + a[-2:]) for a, _ in CASES])
def test_every_user_error_is_one_line_exit_2(files, argv, expect, capsys):
    from routed_lora.cli import main

    out = files / "out"
    try:
        code = main(_fill(argv, files))
        written = out.exists()
    finally:
        shutil.rmtree(out, ignore_errors=True)  # so that one failing case cannot fail the next ones
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, (code, captured.err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("routed-lora: error: "), captured.err[-2000:]
    assert "Traceback" not in captured.err
    assert _fill([expect], files)[0] in lines[0], lines[0]
    assert not written, f"{out} was written before the inputs were checked"


def test_bench_without_cuda_is_a_user_error(capsys):
    from routed_lora.cli import main

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert main(["bench", "--device", "cuda"]) == 2
    assert capsys.readouterr().err.startswith("routed-lora: error: --device: cuda asked for")


def test_serve_on_a_taken_port_is_a_user_error(files, capsys):
    import threading

    from routed_lora.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        res = []
        t = threading.Thread(target=lambda: res.append(main(_fill(
            ["retriever", "serve", "--corpus", "{corpus}", "--port", str(port)], files))), daemon=True)
        t.start()
        t.join(60)
        assert not t.is_alive(), "serve started on a port that is in use"
    assert res == [2]
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"routed-lora: error: --host/--port: cannot listen on 127.0.0.1:{port} (Address already in use)"]


def test_debug_shows_the_traceback(files):
    from routed_lora.cli import main
    from routed_lora.errors import UsageError

    argv = _fill(TRAIN + ["--steps", "0"], files)
    with pytest.raises(UsageError, match="--steps"):
        main(argv + ["--debug"])
    with pytest.raises(UsageError, match="--steps"):
        main(["--debug"] + argv)


@pytest.mark.slow  # a fresh interpreter importing torch: 4-10 s on a loaded 2-core CPU
def test_subprocess_one_line(files):
    """The real entry point, as a user runs it: one line on stderr, exit status 2, no traceback."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    argv = [sys.executable, "-m", "routed_lora.cli"] + _fill(TRAIN + ["--lr", "nan"], files)
    p = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.splitlines() == ["routed-lora: error: train: argument --lr: expected a finite number > 0, "
                                     "got 'nan'"], p.stderr[-2000:]
    assert p.stdout == ""


# ------------------------------------------------------------------------------------------------ resume (item 2)


def _small(files: Path, out: Path, *extra: str) -> list[str]:
    return _fill(TRAIN[:8] + [str(out), "--no-progress", "--target-modules", "q_proj"], files) + [
        "--prompts-per-step", "2", "-G", "2", "--max-turns", "1", "--max-new-tokens", "4", "--max-total-tokens",
        "24", "--lr", "1e-3", "--save-every", "1", "--threads", "1", *extra]


@pytest.mark.slow  # two real (tiny) training runs and resumes: about 9 s on a loaded 2-core CPU
def test_resume_refuses_changed_settings_and_survives_torn_files(files, tmp_path, capsys):
    from routed_lora.cli import main

    out = tmp_path / "run"
    assert main(_small(files, out, "--steps", "1")) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["lr"] == 1e-3 and saved["run"]["prompt"] == "question : {question}\n"
    capsys.readouterr()

    # every run-changing difference is listed, on one line, and nothing is touched
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    argv = _small(files, out, "--steps", "2", "--resume")
    argv[argv.index("--lr") + 1] = "2e-3"
    argv[argv.index("-G") + 1] = "3"
    argv[argv.index("--prompts-per-step") + 1] = "4"
    assert main(argv + ["--prompt", "q : {question}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("routed-lora: error: --resume: "), err
    for piece in ("--lr 0.001 -> 0.002", "--group-size/-G 2 -> 3", "--prompts-per-step 2 -> 4", "--prompt ",
                  "--allow-changes"):
        assert piece in err[0], (piece, err[0])
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    # the adapters' shapes can never change, even when changes are allowed
    assert main(_small(files, out, "--steps", "2", "--resume", "--allow-changes", "--mode", "joint")) == 2
    assert "--mode 'dart' -> 'joint'" in capsys.readouterr().err
    # a fresh run into a folder holding one is refused (it would delete metrics.jsonl)
    assert main(_small(files, out, "--steps", "2")) == 2
    assert "--overwrite" in capsys.readouterr().err

    # a kill left a half-written metrics row, a half-written config.json and a temporary of a dead writer
    with open(out / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 2, "reward_mean": 0.')
    (out / "config.json").write_text('{"mode": "da')
    stale = out / "checkpoint.pt.tmp99999999"
    stale.write_bytes(b"partial")
    with pytest.warns(UserWarning, match=r"metrics.jsonl:\d+: dropped a truncated last line"):
        assert main(_small(files, out, "--steps", "2", "--resume", "--no-eval-before")) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert json.loads((out / "config.json").read_text())["steps"] == 2
    assert not stale.exists()
    # an allowed change goes through and is reported
    argv = _small(files, out, "--steps", "3", "--resume", "--no-eval-before", "--allow-changes")
    argv[argv.index("--lr") + 1] = "5e-4"
    assert main(argv) == 0
    assert "changed settings: --lr 0.001 -> 0.0005" in capsys.readouterr().err
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 3 and ckpt["config"]["lr"] == 5e-4 and ckpt["extra"]["run"]["data"].endswith("train.jsonl")
    # --steps not above the checkpoint's step: refused, nothing rewritten (config.json kept its 3)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    for n in ("3", "2"):
        argv = _small(files, out, "--steps", n, "--resume", "--allow-changes")
        argv[argv.index("--lr") + 1] = "5e-4"
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"--steps {n}: " in err and "is at step 3 already" in err, err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
