"""Sub-commands of the search environment: ``world build``, ``retriever serve``, ``sft``.

Registered by ``routed_lora.cli`` (``routed_lora.env.cli`` in ``_COMMAND_MODULES``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from routed_lora.argtypes import finite_float, int_at_least, int_in
from routed_lora.errors import UsageError, for_flag


WORLD_KINDS = ("default", "conflict")


def build_default_world(out: str | Path, *, seed: int = 0, hidden: int = 128, layers: int = 2,
                        intermediate: int = 512, people: int = 400, kind: str = "default") -> dict:
    """Generate the world under ``out`` (corpus / train / test JSONL) and a randomly initialised tiny model with
    its word-level tokenizer under ``out/model``. Returns the paths and sizes.

    ``kind``: ``"default"`` (:mod:`.world`, the demo's) or ``"conflict"`` (:mod:`.conflict_world`: queries in
    codes, thoughts and answers in natural names)."""
    from .conflict_world import build_conflict_world
    from .tokenizer import build_tiny_model, build_tokenizer
    from .trajectories import vocab_texts
    from .world import build_world, write_world

    if kind not in WORLD_KINDS:
        raise ValueError(f"kind: expected one of {WORLD_KINDS}, got {kind!r}")
    out = Path(out)
    world = (build_conflict_world if kind == "conflict" else build_world)(seed=seed, n_people=people)
    paths = write_world(world, out)
    tok = build_tokenizer(vocab_texts(world))
    model = build_tiny_model(tok, hidden=hidden, layers=layers, intermediate=intermediate, seed=seed,
                             out_dir=out / "model")
    return {
        "world_dir": str(out), "kind": kind, "corpus": str(paths["corpus"]), "train": str(paths["train"]),
        "test": str(paths["test"]), "model": str(out / "model"), "passages": len(world.passages),
        "train_questions": len(world.train), "test_questions": len(world.test), "vocab": len(tok),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def _out_folder(flag: str, path) -> Path:
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag}: {path} exists and is not a folder")
    return path


def _world_build(args) -> int:
    _out_folder("--out", args.out)
    info = build_default_world(args.out, seed=args.seed, hidden=args.hidden, layers=args.layers,
                               people=args.people, kind=args.kind)
    print(json.dumps(info, indent=1))
    return 0


def _retriever_serve(args) -> int:
    from .retriever import BM25Retriever, serve

    if args.topk > args.max_topk:
        raise UsageError(f"--topk: the default topk {args.topk} is over --max-topk {args.max_topk}")
    with for_flag("--corpus"):
        retriever = BM25Retriever(args.corpus)
    try:
        serve(retriever, args.host, args.port, default_topk=args.topk, max_batch=args.max_batch,
              max_wait_s=args.max_wait_ms / 1000.0, verbose=args.verbose, max_topk=args.max_topk,
              read_timeout_s=args.read_timeout)
    except OSError as exc:  # port taken, host not local, no permission for a port < 1024
        raise UsageError(f"--host/--port: cannot listen on {args.host}:{args.port} ({exc.strerror or exc})") from exc
    return 0


def _sft(args) -> int:
    from .sft import run_sft

    world_dir = _out_folder("--world-dir", args.world_dir)
    _out_folder("--out", args.out)
    if args.model is not None and not (Path(args.model) / "config.json").is_file():
        raise UsageError(f"--model: {args.model} is not a model folder (no config.json)")
    if not (world_dir / "corpus.jsonl").exists():
        print(f"no world in {world_dir}; building one")
        build_default_world(world_dir, seed=args.seed)
    summary = run_sft(world_dir, args.out, model_dir=args.model, steps=args.steps, batch_size=args.batch_size,
                      lr=args.lr, two_hop_frac=args.two_hop_frac, eval_n=args.eval_n, eval_every=args.eval_every, threads=args.threads,
                      seed=args.seed, progress=not args.no_progress)
    ev = summary["eval"]
    print(f"SFT: {summary['steps']} steps in {summary['train_seconds']:.1f} s ({summary['steps_per_s']:.1f} steps/s); "
          f"held-out greedy EM {ev['em']:.3f} (1-hop {ev.get('em_1hop', float('nan')):.3f}, "
          f"2-hop {ev.get('em_2hop', float('nan')):.3f}, n={ev['n']}); model saved to {args.out}")
    return 0


def register(subparsers) -> None:
    pos, nonneg = int_at_least(1), int_at_least(0)
    w = subparsers.add_parser("world", help="the generated world of the built-in demo")
    wsub = w.add_subparsers(dest="world_command", metavar="ACTION", required=True)
    wb = wsub.add_parser("build", help="write corpus.jsonl, train.jsonl, test.jsonl and a tiny model under --out")
    wb.add_argument("--out", required=True, help="output folder")
    wb.add_argument("--seed", type=nonneg, default=0)
    wb.add_argument("--people", type=int_in(1, 576), default=400, help="people in the world (at most 24 x 24 names)")
    wb.add_argument("--kind", choices=WORLD_KINDS, default="default",
                    help="default: the demo's world; conflict: queries in codes, thoughts and answers in natural "
                         "names (docs/study.md, issue 21)")
    wb.add_argument("--hidden", type=pos, default=128)
    wb.add_argument("--layers", type=pos, default=2)
    wb.set_defaults(func=_world_build)

    r = subparsers.add_parser("retriever", help="retrieval backends")
    rsub = r.add_subparsers(dest="retriever_command", metavar="ACTION", required=True)
    rs = rsub.add_parser("serve", help="serve a BM25 index over Search-R1's POST /retrieve protocol")
    rs.add_argument("--corpus", required=True, help="JSONL corpus with {\"id\", \"contents\"} rows")
    rs.add_argument("--host", default="127.0.0.1")
    rs.add_argument("--port", type=int_in(0, 65535), default=8000, help="0: any free port")
    rs.add_argument("--topk", type=pos, default=3, help="default topk when a request gives none (or a falsy one: null, 0, as Search-R1)")
    rs.add_argument("--max-topk", type=pos, default=100, help="largest topk a request may ask for (HTTP 400 above)")
    rs.add_argument("--max-batch", type=pos, default=512, help="most queries searched in one batch")
    rs.add_argument("--max-wait-ms", type=finite_float(0), default=2.0,
                    help="how long a request waits for others to batch")
    rs.add_argument("--read-timeout", type=finite_float(0, low_open=True), default=5.0,
                    help="seconds a request body may take to arrive (a shorter body than its Content-Length: HTTP 400)")
    rs.add_argument("--verbose", action="store_true", help="log every request")
    rs.set_defaults(func=_retriever_serve)

    s = subparsers.add_parser("sft", help="warm-start the tiny model on scripted expert trajectories")
    s.add_argument("--world-dir", required=True, help="folder from `world build` (built there if missing)")
    s.add_argument("--out", required=True, help="where the fine-tuned model (HF folder) and metrics go")
    s.add_argument("--model", default=None,
                   help="model folder to start from, or smollm2-135m (default: WORLD_DIR/model)")
    s.add_argument("--steps", type=pos, default=300)
    s.add_argument("--batch-size", type=pos, default=32)
    s.add_argument("--lr", type=finite_float(0, low_open=True), default=3e-3)
    s.add_argument("--two-hop-frac", type=finite_float(0, 1), default=0.1,
                   help="share of the 2-hop training questions used (1-hop all); < 1 leaves 2-hop room for GRPO")
    s.add_argument("--eval-n", type=pos, default=200, help="held-out questions evaluated (half 1-hop, half 2-hop)")
    s.add_argument("--eval-every", type=nonneg, default=0, help="evaluate every N steps too (0: only at the end)")
    s.add_argument("--threads", type=pos, default=1,
                   help="torch threads (1: two threads were ~5x slower per step on a busy 2-core machine)")
    s.add_argument("--seed", type=nonneg, default=0)
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=_sft)
