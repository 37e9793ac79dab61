"""``routed-lora train``: GRPO with routed LoRA adapters on a local HF model, a QA file and a retriever.

    routed-lora train --mode dart --model runs/demo/sft --data runs/demo/world/train.jsonl \\
        --eval-data runs/demo/world/test.jsonl --retriever bm25:runs/demo/world/corpus.jsonl --out runs/grpo

Under ``torchrun --nproc-per-node N`` the loop runs with DistributedDataParallel (gloo on CPU, nccl on GPUs).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .trainer import DEFAULT_TARGETS, GRPOConfig


def make_retriever(spec: str, *, timeout: float = 30.0):
    """``bm25:PATH`` (in-process BM25 over a JSONL corpus) or ``http://host:port[/retrieve]`` (Search-R1's
    retrieval server protocol)."""
    from routed_lora.env.retriever import BM25Retriever, HTTPRetriever

    if spec.startswith("bm25:"):
        return BM25Retriever(spec[len("bm25:"):])
    if spec.startswith(("http://", "https://")):
        return HTTPRetriever(spec, timeout=timeout)
    raise ValueError(f"--retriever: expected bm25:PATH or http://host:port, got {spec!r}")


def _init_distributed() -> bool:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    return True


def config_from_args(args) -> GRPOConfig:
    return GRPOConfig(
        mode=args.mode, r=args.r, lora_alpha=args.lora_alpha, target_modules=tuple(args.target_modules),
        group_size=args.group_size, prompts_per_step=args.prompts_per_step, steps=args.steps,
        max_turns=args.max_turns, topk=args.topk, max_new_tokens=args.max_new_tokens,
        max_total_tokens=args.max_total_tokens, temperature=args.temperature, lr=args.lr, lr_tool=args.lr_tool,
        weight_decay=args.weight_decay, beta=args.beta, eps_low=args.eps_low,
        eps_high=args.eps_high if args.eps_high is not None else args.eps_low, aggregation=args.aggregation,
        scale_rewards=not args.no_scale_rewards, format_reward=args.format_reward, epochs=args.epochs,
        mini_batches=args.mini_batches, micro_batch_size=args.micro_batch_size, max_grad_norm=args.max_grad_norm,
        seed=args.seed, save_every=args.save_every, eval_every=args.eval_every,
        loss_on=getattr(args, "loss_on", "all"),
    ).check()


def _run(args) -> int:
    import torch

    from routed_lora.env.data import SEARCH_R1_PROMPT, TINY_PROMPT, load_qa

    from .evaluate import format_eval
    from .trainer import Trainer, build_policy, load_model_and_tokenizer, world_info

    if args.threads:
        torch.set_num_threads(args.threads)
    distributed = _init_distributed()
    rank, _ = world_info()
    cfg = config_from_args(args)
    out = Path(args.out)
    if args.resume and (out / "config.json").exists():
        saved = json.loads((out / "config.json").read_text())
        if saved.get("mode") != cfg.mode:
            raise SystemExit(f"--resume: {out} was trained with --mode {saved.get('mode')}, not {cfg.mode}")
    torch.manual_seed(cfg.seed)  # identical adapter initialisation on every rank
    model, tok = load_model_and_tokenizer(args.model)
    model, router = build_policy(model, tok, cfg)
    if args.adapters:
        import routed_lora as rl

        rl.load_adapters(model, args.adapters)
    retriever = make_retriever(args.retriever)
    train_rows = load_qa(args.data, limit=args.limit)
    eval_rows = load_qa(args.eval_data, limit=args.eval_n) if args.eval_data else []
    template = {"tiny": TINY_PROMPT, "search-r1": SEARCH_R1_PROMPT}.get(args.prompt, args.prompt)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    trainer = Trainer(cfg, model, tok, router, retriever, train_rows, out=out, eval_rows=eval_rows,
                      eval_samples=args.eval_samples, prompt_template=template, progress=not args.no_progress)
    result = trainer.train(resume=args.resume or None, evaluate_before=not args.no_eval_before)
    if rank == 0:
        if cfg.mode != "base":
            import routed_lora as rl

            rl.save_adapters(model, out / "adapters")
            print(f"adapters (PEFT format): {out / 'adapters'}")
        for k, ev in result["evals"].items():
            print(f"held-out {k}: {format_eval(ev)}")
        try:
            from .plot import plot_metrics

            png = plot_metrics(out / "metrics.jsonl", out / "metrics.png", title=f"GRPO ({cfg.mode})")
            print(f"metrics: {out / 'metrics.jsonl'}  plot: {png}")
        except ImportError:
            print(f"metrics: {out / 'metrics.jsonl'} (install matplotlib for the plot)")
    if distributed:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return 0


def add_train_arguments(p) -> None:
    d = GRPOConfig()
    p.add_argument("--mode", choices=("dart", "joint", "base"), default=d.mode,
                   help="dart: two routed adapters; joint: one rank-2r adapter on every token; base: evaluate only")
    p.add_argument("--model", required=True, help="local Hugging Face model folder (with its tokenizer)")
    p.add_argument("--data", required=True, help="training questions: JSONL or parquet with question, golden_answers")
    p.add_argument("--eval-data", default=None, help="held-out questions for EM before / after (optional)")
    p.add_argument("--eval-n", type=int, default=200, help="held-out questions evaluated")
    p.add_argument("--eval-samples", type=int, default=None, help="samples per question for sampled EM (default G)")
    p.add_argument("--retriever", required=True, help="bm25:CORPUS.jsonl or http://host:port (Search-R1 server)")
    p.add_argument("--out", required=True, help="output folder (metrics.jsonl, checkpoint.pt, adapters/, plot)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--adapters", default=None, help="load adapters (our folder or PEFT's) before training / eval")
    p.add_argument("--prompt", default="tiny", help="'tiny' (built-in world), 'search-r1', or a template with {question}")
    p.add_argument("--limit", type=int, default=None, help="use only the first N training questions")
    p.add_argument("--r", type=int, default=d.r, help="LoRA rank per adapter (joint mode: 2r)")
    p.add_argument("--lora-alpha", type=float, default=d.lora_alpha)
    p.add_argument("--target-modules", nargs="+", default=list(DEFAULT_TARGETS))
    p.add_argument("--group-size", "-G", type=int, default=d.group_size, help="rollouts per question (G)")
    p.add_argument("--prompts-per-step", type=int, default=d.prompts_per_step)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--max-turns", type=int, default=d.max_turns, help="tool calls per rollout")
    p.add_argument("--topk", type=int, default=d.topk, help="passages per search")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="per generation turn")
    p.add_argument("--max-total-tokens", type=int, default=d.max_total_tokens,
                   help="response cap (and Dr.GRPO's constant normaliser)")
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--lr", type=float, default=d.lr, help="learning rate (reasoning / joint adapter)")
    p.add_argument("--lr-tool", type=float, default=None, help="learning rate of the tool adapter (default --lr)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--beta", type=float, default=d.beta, help="k3 KL coefficient (0: no reference pass)")
    p.add_argument("--eps-low", type=float, default=d.eps_low, help="clip range below 1")
    p.add_argument("--eps-high", type=float, default=None, help="clip range above 1 (default --eps-low)")
    p.add_argument("--aggregation", choices=("token-mean", "seq-mean-token-mean", "dr-grpo"), default=d.aggregation)
    p.add_argument("--no-scale-rewards", action="store_true", help="advantages without the std (Dr.GRPO)")
    p.add_argument("--format-reward", type=float, default=d.format_reward,
                   help="reward for a well-formed but wrong answer (0: plain EM)")
    p.add_argument("--loss-on", choices=("all", "reasoning", "tool"), default="all",
                   help="loss on every sampled token, or only on one role's (tool: inside <search>...</search>; "
                        "reasoning: the rest): LEAS's M_Reas / M_Tool")
    p.add_argument("--epochs", type=int, default=d.epochs, help="passes over each rollout batch")
    p.add_argument("--mini-batches", type=int, default=d.mini_batches, help="optimiser steps per pass")
    p.add_argument("--micro-batch-size", type=int, default=d.micro_batch_size)
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint every N steps (and at the end)")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="held-out EM every N steps (0: before/after)")
    p.add_argument("--no-eval-before", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--no-progress", action="store_true")


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="GRPO training with routed LoRA adapters (dart / joint / base)")
    add_train_arguments(p)
    p.set_defaults(func=_run)
