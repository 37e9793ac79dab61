"""Extra peak memory of the GRPO log-prob pass with a real vocabulary: chunked output layer vs fp32 logits.

    python benchmarks/logprob_memory.py [--out DIR] [--tokens 1024] [--batch 8] [--full-baseline]

A Qwen2-shaped config with Qwen2's vocabulary (V = 151,936) and a small body (hidden 64, 1 layer, fp32) so it
runs on a CPU; the output layer, whose logits are what grows with V, is real size. For each case the script
measures, in a fresh subprocess, the extra peak memory while the pass runs (above what was allocated when it
started) in two independent ways:

- ``profiler``: the torch profiler's allocation events (``profile_memory=True``, every CPU allocation torch
  makes, custom autograd functions included), via ``routed_lora.bench.memory.extra_peak_bytes``;
- ``rss``: the process's peak resident set (``VmHWM`` after resetting it through ``/proc/self/clear_refs``)
  minus its resident set before the pass; it includes allocator slack, so it is an upper bound.

Cases: ``no_grad`` (old and reference log-probs, with entropy) and ``grad`` (forward + backward of the new
pass), chunked (default chunk, ``CHUNK_ELEMENTS // V`` = 220 tokens) for B x T tokens; the unchunked path is
measured at 1 x T tokens (its 8 x 1,024 run needs ~15 GB, add ``--full-baseline`` for it). The figure of merit
is extra peak / (B * T * V * 4 bytes), the size of the fp32 logits alone. Writes ``logprob_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def _child(batch: int, tokens: int, chunk: int | None, grad: bool, method: str) -> dict:
    sys.path.insert(0, str(ROOT))
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    import routed_lora as rl
    from routed_lora.bench.memory import extra_peak_bytes
    from routed_lora.grpo.logprobs import token_logprobs

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    V = 151_936
    cfg = Qwen2Config(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                      tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg)
    rl.apply_routed_lora(model, r=8, lora_alpha=16)
    ids = torch.randint(0, V, (batch, tokens))
    att = torch.ones_like(ids)
    routes = torch.randint(0, 2, ids.shape)

    def run():
        with torch.set_grad_enabled(grad):
            logp, ent = token_logprobs(model, ids, att, routes=routes, with_entropy=True, chunk_tokens=chunk)
            if grad:
                logp.sum().backward()
        return float(logp.detach().sum())

    # warm-up at a small size (library initialisation is not the pass's memory)
    with torch.no_grad():
        token_logprobs(model, ids[:1, :8], att[:1, :8], routes=routes[:1, :8], chunk_tokens=chunk)
    model.zero_grad(set_to_none=True)
    if method == "profiler":
        peak = extra_peak_bytes(run)
    else:
        before = _rss_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        run()
        peak = (_rss_kib("VmHWM") - before) * 1024
    return {"extra_peak_bytes": int(peak)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or "runs/bench")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--full-baseline", action="store_true", help="also the unchunked pass at batch x tokens")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(_child(**json.loads(args.child))))
        return 0
    sys.path.insert(0, str(ROOT))
    import torch

    import routed_lora
    from routed_lora.grpo.logprobs import CHUNK_ELEMENTS

    V = 151_936
    cases = []
    for grad in (False, True):
        cases.append(dict(batch=args.batch, tokens=args.tokens, chunk=None, grad=grad))
        cases.append(dict(batch=1, tokens=args.tokens, chunk=None, grad=grad))
        cases.append(dict(batch=1, tokens=args.tokens, chunk=0, grad=grad))
        if args.full_baseline:
            cases.append(dict(batch=args.batch, tokens=args.tokens, chunk=0, grad=grad))
    rows = []
    for case in cases:
        for method in ("profiler", "rss"):
            out = subprocess.run([sys.executable, __file__, "--child", json.dumps({**case, "method": method})],
                                 capture_output=True, text=True, check=True)
            res = json.loads(out.stdout.strip().splitlines()[-1])
            logits = case["batch"] * (case["tokens"] - 1) * V * 4
            row = {
                "case": ("grad" if case["grad"] else "no_grad"),
                "path": "unchunked" if case["chunk"] == 0 else f"chunked({max(1, CHUNK_ELEMENTS // V)} tokens)",
                "batch": case["batch"], "tokens": case["tokens"], "vocab": V, "method": method,
                "extra_peak_bytes": res["extra_peak_bytes"], "fp32_logits_bytes": logits,
                "ratio_to_fp32_logits": res["extra_peak_bytes"] / logits,
                "device": platform.processor() or platform.machine(), "dtype": "float32",
                "torch": torch.__version__, "routed_lora": routed_lora.__version__,
            }
            rows.append(row)
            print(f"{row['case']:8s} {row['path']:22s} {case['batch']}x{case['tokens']:<5d} {method:8s} "
                  f"extra peak {row['extra_peak_bytes'] / 2**20:9.1f} MiB = "
                  f"{row['ratio_to_fp32_logits']:6.3f} x fp32 logits ({logits / 2**20:.0f} MiB)", flush=True)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "logprob_memory.json").write_text(json.dumps(rows, indent=1))
    print(f"wrote {out_dir / 'logprob_memory.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
