"""Rollout throughput side by side on the same cores (docs/vllm.md, issue 19), repeats interleaved:

- ``hf_routed_generate``: our HF routed model's ``generate`` (the package's own rollout engine);
- ``vllm_no_lora``: vLLM without LoRA (an engine built without ``enable_lora``);
- ``vllm_one_lora``: one plain LoRA on every request, vLLM's own CPU LoRA ops;
- ``vllm_one_lora_our_op``: the same, with our op (``ROUTED_LORA_VLLM_CPU_OP=all``);
- ``vllm_routed``: routed requests (the plugin, with our op: its default);
- ``vllm_routed_vllm_ops``: routed requests on vLLM's ops (``ROUTED_LORA_VLLM_CPU_OP=off``).

    .venv-vllm/bin/python benchmarks/vllm_rollout.py [--model tiny|HF_FOLDER] [--prompts 32] [--group 8]
        [--tokens 64] [--repeats 3] [--engines ...] [--out runs/bench/vllm_rollout.jsonl]

``--model tiny``: a tiny Qwen2 built from a config (hidden 64, 2 layers, head size 32; no download). Else an HF
model folder vLLM can load (e.g. the float32 SmolLM2-135M folder of ``routed_lora.pretrained.resolve_model``).
fp32, adapters (reasoning, tool; r 8 on every attention/MLP projection) with random weights, sampled at
temperature 1 with EOS ignored (every sequence is ``--tokens`` long), ``logprobs=0`` (a GRPO rollout records them).

Each vLLM engine lives in its own process (spawned; in-process engine core), both alive for the whole run, so the
engines take turns: one warm-up run each, then ``--repeats`` rounds in which every engine runs once, the order
rotated each round. Threads: vLLM binds ``--threads`` cores (VLLM_CPU_OMP_THREADS_BIND=0-(threads-1)), HF uses
``torch.set_num_threads(--threads)``. Rows (JSON lines): engine, median and min/max throughput in generated
tokens/s, each run's figure, and the load average (1 min) before and after; also per CPU second
(``cpu_tok_per_s_*``: tokens / the process's CPU time), which other jobs on the same cores disturb far less than
wall time when ``--threads 1`` (with 2 bound threads it counts OpenMP spin-waits too). For routed requests the front end
also computes every position's route (``RoutedOutput.routes``, TagRouter in Python): its time is reported
(``routes_s``) and the throughput without it (``engine_tok_per_s_median``). A last row (``per_round_ratios``)
gives the issue's targets as throughput ratios taken round by round, median [min-max]: routed / one plain LoRA
(overhead <= 5%: >= 0.95), routed / no LoRA (>= 0.8), and routed / HF routed ``generate``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

TEXTS = ["who was born in paris ? <think>", "the capital of france is", "what river is in rome ? <search>",
         "who founded the company ? <think> bob"]
VLLM_ENGINES = {"vllm_no_lora": ("nolora", None, None), "vllm_one_lora": ("lora", "reasoning", "routed"),
                "vllm_one_lora_our_op": ("lora", "reasoning", "all"), "vllm_routed": ("lora", "routed", "routed"),
                "vllm_routed_vllm_ops": ("lora", "routed", "off")}


# the targets, as per-round throughput ratios (numerator, denominator, target or None)
RATIOS = [("vllm_routed", "vllm_one_lora_our_op", 0.95), ("vllm_routed_vllm_ops", "vllm_one_lora", 0.95),
          ("vllm_routed", "vllm_no_lora", 0.8), ("vllm_one_lora_our_op", "vllm_no_lora", None),
          ("vllm_routed", "hf", None)]


def _ratios(results: dict) -> dict:
    """{"a/b": {median, min, max, target, met}} of throughput ratios taken round by round (the two runs of a round
    are back to back, so a ratio is far steadier than either figure on a shared machine). ``results``: engine ->
    [(seconds, extra)] per round."""
    from routed_lora.bench.timing import paired_ratio

    rounds = [{}]
    for e, runs in results.items():
        for i, (dt, _) in enumerate(runs):
            while len(rounds) <= i:
                rounds.append({})
            rounds[i][e] = dt
    out = {}
    for a, b, target in RATIOS:
        st = paired_ratio(rounds, b, a)  # time[b] / time[a] = throughput[a] / throughput[b]
        if not st.n:
            continue
        vals = sorted(st.times)
        out[f"{a}/{b}"] = dict(median=round(st.median, 3), min=round(vals[0], 3), max=round(vals[-1], 3),
                               target=target, met=None if target is None else st.median >= target)
    return out


def _env(threads: int, kv_gib: int) -> None:
    for k, v in {"VLLM_CPU_KVCACHE_SPACE": str(kv_gib), "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}",
                 "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}.items():
        os.environ.setdefault(k, v)


def _build(args, work: Path):
    """(model folder, routed HF model, tokenizer, adapter folder)."""
    import torch

    import routed_lora as rl

    if args.model == "tiny":
        from routed_lora.testing import tiny_model, tiny_tokenizer

        tok = tiny_tokenizer()
        model = tiny_model("qwen2", vocab_size=len(tok), hidden=64, layers=2, num_attention_heads=2,
                           num_key_value_heads=1, head_dim=32)
        model.save_pretrained(work / "model")
        tok.save_pretrained(work / "model")
        folder = work / "model"
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = Path(args.model)
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    router = rl.TagRouter(tok, default="reasoning")
    rl.apply_routed_lora(model, r=8, lora_alpha=16, router=router)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in rl.hf.routed_layers(model):
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.1)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
    rl.save_adapters(model, work / "adapters")
    return folder, model, tok, work / "adapters"


def _child(conn, kind: str, folder: str, adapters: str, prompts, cfg: dict) -> None:
    """One vLLM engine in its own process: answers ("run", adapter, op_mode) with (seconds, extra)."""
    _env(cfg["threads"], cfg["kv_gib"])
    import vllm

    from routed_lora.integrations.vllm import RoutedLLM, engine_kwargs

    kw = dict(max_num_seqs=len(prompts), enforce_eager=True, enable_prefix_caching=False, seed=0,
              max_model_len=cfg["max_model_len"])
    sp = vllm.SamplingParams(max_tokens=cfg["tokens"], temperature=1.0, ignore_eos=True, logprobs=0)
    if kind == "nolora":
        llm = vllm.LLM(model=folder, dtype="float32", **kw)
        toks = [vllm.inputs.TokensPrompt(prompt_token_ids=p) for p in prompts]
        routed = None
    else:
        llm = vllm.LLM(model=folder, **engine_kwargs(adapters), **kw)
        routed = RoutedLLM(llm, adapters)
        spent = [0.0]
        orig_routes = routed.routes_of_many

        def routes_of_many(seqs):  # the front end's route computation, timed apart
            t = time.perf_counter()
            try:
                return orig_routes(seqs)
            finally:
                spent[0] += time.perf_counter() - t

        routed.routes_of_many = routes_of_many
    conn.send(("ready", vllm.__version__))
    while True:
        msg = conn.recv()
        if msg[0] == "stop":
            break
        _, adapter, mode = msg
        extra = {}
        c = time.process_time()
        if routed is None:
            t = time.perf_counter()
            llm.generate(toks, sp, use_tqdm=False)
            dt = time.perf_counter() - t
        else:
            os.environ["ROUTED_LORA_VLLM_CPU_OP"] = mode  # read by the plugin every step (in-process engine core)
            spent[0] = 0.0
            t = time.perf_counter()
            outs = routed.generate(prompts, sp, adapter=adapter)
            dt = time.perf_counter() - t
            if adapter == "routed":
                gen = [r for o in outs for r in o.routes[len(o.prompt_ids):]]
                extra = dict(routes_s=spent[0], tool_fraction=sum(r == 1 for r in gen) / max(1, len(gen)),
                             sequences_with_tool=sum(1 in o.routes[len(o.prompt_ids):] for o in outs))
        extra["cpu_s"] = time.process_time() - c
        conn.send((dt, extra))
    conn.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kv-gib", type=int, default=2)
    ap.add_argument("--engines", default="hf," + ",".join(VLLM_ENGINES))
    ap.add_argument("--out", default="runs/bench/vllm_rollout.jsonl")
    args = ap.parse_args()
    _env(args.threads, args.kv_gib)

    import multiprocessing as mp

    import torch

    import routed_lora as rl

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="vllm-bench-"))
    folder, model, tok, adapters = _build(args, work)
    prompts = [tok(TEXTS[i % len(TEXTS)])["input_ids"] for i in range(args.prompts) for _ in range(args.group)]
    n_seq, n_tok = len(prompts), len(prompts) * args.tokens
    engines = args.engines.split(",")
    bad = [e for e in engines if e != "hf" and e not in VLLM_ENGINES]
    if bad:
        raise SystemExit(f"--engines: unknown {bad}; expected hf or {sorted(VLLM_ENGINES)}")
    cfg = dict(threads=args.threads, kv_gib=args.kv_gib, tokens=args.tokens,
               max_model_len=max(len(p) for p in prompts) + args.tokens + 8)

    ctx = mp.get_context("spawn")
    children, vllm_version = {}, None
    for kind in sorted({VLLM_ENGINES[e][0] for e in engines if e != "hf"}):
        a, b = ctx.Pipe()
        p = ctx.Process(target=_child, args=(b, kind, str(folder), str(adapters), prompts, cfg), daemon=True)
        p.start()
        children[kind] = (p, a)
        msg = a.recv()  # one engine starts at a time (start-up is not measured)
        vllm_version = msg[1]

    def hf_run():
        from transformers import GenerationConfig

        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(p[::-1]) for p in prompts], batch_first=True,
                                              padding_value=pad).flip(1)
        att = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            att[i, ids.shape[1] - len(p):] = 1
        gc = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=args.tokens,
                              min_new_tokens=args.tokens, pad_token_id=pad, eos_token_id=None)
        t, c = time.perf_counter(), time.process_time()
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=att, generation_config=gc)
        return time.perf_counter() - t, {"cpu_s": time.process_time() - c}

    def run(engine):
        if engine == "hf":
            return hf_run()
        kind, adapter, mode = VLLM_ENGINES[engine]
        conn = children[kind][1]
        conn.send(("run", adapter, mode))
        return conn.recv()

    load0 = os.getloadavg()[0]
    for e in engines:  # warm-up
        run(e)
    results = {e: [] for e in engines}
    for rep in range(args.repeats):
        k = rep % len(engines)
        for e in engines[k:] + engines[:k]:
            dt, extra = run(e)
            results[e].append((dt, extra))
            print(json.dumps({"engine": e, "repeat": rep, "seconds": round(dt, 3), "tok_per_s": round(n_tok / dt, 1),
                              "loadavg": os.getloadavg()[0], **{k: round(v, 4) for k, v in extra.items()}}),
                  flush=True)
    load1 = os.getloadavg()[0]
    for kind, (p, conn) in children.items():
        conn.send(("stop",))
        p.join(timeout=60)

    import vllm  # noqa: F401 - only for the version in the rows (the engines ran in the children)

    rows = []
    for e in engines:
        tps = [n_tok / dt for dt, _ in results[e]]
        row = dict(engine=("hf_routed_generate" if e == "hf" else e), tok_per_s_median=round(statistics.median(tps), 1),
                   tok_per_s_min=round(min(tps), 1), tok_per_s_max=round(max(tps), 1),
                   tok_per_s_runs=[round(x, 1) for x in tps], sequences=n_seq, prompts=args.prompts,
                   group=args.group, new_tokens=args.tokens, dtype="float32",
                   model="tiny qwen2 h64 l2" if args.model == "tiny" else str(args.model), threads=args.threads,
                   repeats=args.repeats, routed_lora=rl.__version__, vllm=vllm_version, torch=torch.__version__,
                   loadavg_before=load0, loadavg_after=load1, device="cpu")
        cps = [n_tok / x["cpu_s"] for _, x in results[e]]
        row.update(cpu_tok_per_s_median=round(statistics.median(cps), 1), cpu_tok_per_s_min=round(min(cps), 1),
                   cpu_tok_per_s_max=round(max(cps), 1))
        ex = [x for _, x in results[e] if "routes_s" in x]
        if ex:
            row["routes_s_median"] = round(statistics.median(x["routes_s"] for x in ex), 3)
            row["engine_tok_per_s_median"] = round(statistics.median(
                n_tok / (dt - x["routes_s"]) for dt, x in results[e]), 1)
            row["tool_fraction"] = round(statistics.median(x["tool_fraction"] for x in ex), 4)
            row["sequences_with_tool"] = int(statistics.median(x["sequences_with_tool"] for x in ex))
        rows.append(row)
        print(json.dumps(row), flush=True)
    ratios = _ratios(results)
    if ratios:
        rows.append(dict(engine="per_round_ratios", ratios=ratios, model=rows[0]["model"], sequences=n_seq,
                         repeats=args.repeats, loadavg_before=load0, loadavg_after=load1))
        print(json.dumps(rows[-1]), flush=True)
        print("\nper-round throughput ratios, median [min-max] (target):")
        for k, v in ratios.items():
            t = "" if v["target"] is None else f"  (>= {v['target']}: {'met' if v['met'] else 'NOT met'})"
            print(f"  {k:45s} {v['median']:.3f} [{v['min']:.3f}-{v['max']:.3f}]{t}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"rows appended to {out}")


if __name__ == "__main__":
    main()
