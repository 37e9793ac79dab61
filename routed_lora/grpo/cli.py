"""``routed-lora train``: GRPO with routed LoRA adapters on a local HF model, a QA file and a retriever.

    routed-lora train --mode dart --model runs/demo/sft --data runs/demo/world/train.jsonl \\
        --eval-data runs/demo/world/test.jsonl --retriever bm25:runs/demo/world/corpus.jsonl --out runs/grpo

Under ``torchrun --nproc-per-node N`` the loop runs with DistributedDataParallel (``--strategy ddp``, the
default) or torch's ``fully_shard`` (``--strategy fsdp2``), gloo on CPU, nccl on GPUs. Each process takes
prompts_per_step / N questions; mini_batches must divide that number (see ``trainer.mini_batch_rows``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from routed_lora.argtypes import check_template, finite_float, int_at_least
from routed_lora.errors import UsageError, for_flag, one_line

from .config import DEFAULT_TARGETS, GRPOConfig


def make_retriever(spec: str, *, timeout: float = 30.0):
    """``bm25:PATH`` (in-process BM25 over a JSONL corpus) or ``http://host:port[/retrieve]`` (Search-R1's
    retrieval server protocol)."""
    from routed_lora.env.retriever import BM25Retriever, HTTPRetriever

    if spec.startswith("bm25:"):
        return BM25Retriever(spec[len("bm25:"):])
    if spec.startswith(("http://", "https://")):
        return HTTPRetriever(spec, timeout=timeout)
    raise ValueError(f"expected bm25:PATH or http://host:port, got {spec!r}")


def _init_distributed() -> bool:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    return True


# GRPOConfig fields whose flag is not ``--`` + the field name with ``-`` for ``_``
_FLAG_OF = {"group_size": "--group-size/-G"}


def flag_of(field_name: str) -> str:
    return _FLAG_OF.get(field_name, "--" + field_name.replace("_", "-"))


def config_from_args(args) -> GRPOConfig:
    from .config import ConfigError

    try:
        return GRPOConfig(
            mode=args.mode, r=args.r, lora_alpha=args.lora_alpha, target_modules=tuple(args.target_modules),
            group_size=args.group_size, prompts_per_step=args.prompts_per_step, steps=args.steps,
            max_turns=args.max_turns, topk=args.topk, max_new_tokens=args.max_new_tokens,
            max_total_tokens=args.max_total_tokens, temperature=args.temperature, lr=args.lr, lr_tool=args.lr_tool,
            weight_decay=args.weight_decay, beta=args.beta, eps_low=args.eps_low,
            eps_high=args.eps_high if args.eps_high is not None else args.eps_low, aggregation=args.aggregation,
            scale_rewards=not args.no_scale_rewards, format_reward=args.format_reward, epochs=args.epochs,
            mini_batches=args.mini_batches, micro_batch_size=args.micro_batch_size,
            max_grad_norm=args.max_grad_norm, seed=args.seed, save_every=args.save_every,
            eval_every=args.eval_every, loss_on=getattr(args, "loss_on", "all"),
            old_logprobs=getattr(args, "old_logprobs", "auto"),
        ).check()
    except ConfigError as exc:
        raise UsageError(f"{flag_of(exc.field)}: {exc.message}") from exc


def run_settings(args, template: str) -> dict:
    """The settings outside :class:`GRPOConfig` that change what a run computes (stored with each checkpoint)."""
    return {"model": str(Path(args.model).resolve()), "data": str(Path(args.data).resolve()),
            "limit": args.limit, "prompt": template, "retriever": _retriever_id(args.retriever)}


def _retriever_id(spec: str) -> str:
    return f"bm25:{Path(spec[5:]).resolve()}" if spec.startswith("bm25:") else spec


# settings that fix the adapters' tensors: a checkpoint cannot continue under others, even with --allow-changes
_SHAPE_SETTINGS = ("mode", "r", "target_modules")


def check_resume(out: Path, cfg: GRPOConfig, run: dict, *, allow_changes: bool) -> dict:
    """Refuse ``--resume`` when the run folder cannot be continued as it is: no checkpoint, one that is not a
    training checkpoint or was written by another number of processes, a ``metrics.jsonl`` that cannot be read
    back (:mod:`.resume`), ``--steps`` not above the checkpoint's step, or a setting that changes the run differs
    from the checkpoint's (all of them listed), unless ``allow_changes``. Reads only. Returns the checkpoint
    (memory-mapped) for :func:`check_resume_fits`."""
    import torch

    from routed_lora.state import setting_differences

    from .resume import check_checkpoint, check_metrics

    ckpt = out / "checkpoint.pt"
    if not ckpt.is_file():
        raise UsageError(f"--resume: no checkpoint at {ckpt} (start without --resume)")
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)
    except Exception as exc:  # a checkpoint is written atomically, so this is another file or another format
        raise UsageError(f"--resume: cannot read {ckpt} ({type(exc).__name__}: {exc})") from exc
    with for_flag("--resume"):
        check_checkpoint(state, ckpt, world=int(os.environ.get("WORLD_SIZE", "1")))
        check_metrics(out / "metrics.jsonl")
    step = int(state.get("step") or 0)
    if cfg.mode != "base" and cfg.steps <= step:  # nothing to train; config.json would record the wrong length
        raise UsageError(f"--steps {cfg.steps}: {ckpt} is at step {step} already; pass --steps above {step} to "
                         "continue it (routed-lora eval scores its adapters)")
    saved = dict(state.get("config") or {})
    saved.update((state.get("extra") or {}).get("run") or {})
    now = {**cfg.to_dict(), **run}
    diffs = setting_differences(saved, now)
    if not diffs:
        return state
    listed = ", ".join(f"{flag_of(k) if k in cfg.to_dict() else '--' + k} {_show(a)} -> {_show(b)}"
                       for k, a, b in diffs)
    fixed = [flag_of(k) for k, _, _ in diffs if k in _SHAPE_SETTINGS]
    if fixed:  # the checkpoint's tensors would not fit
        raise UsageError(f"--resume: {ckpt} (step {state.get('step')}) was trained with other settings: {listed}; "
                         f"{', '.join(fixed)} cannot change on resume (the adapters' shapes depend on it)")
    if allow_changes:
        print(f"--resume: continuing {ckpt} (step {state.get('step')}) with changed settings: {listed}",
              file=sys.stderr)
        return state
    raise UsageError(f"--resume: {ckpt} (step {state.get('step')}) was trained with other settings: {listed}; "
                     "pass --allow-changes to continue with the new ones")


def check_resume_fits(out: Path, state: dict, model_dir: str, cfg: GRPOConfig) -> None:
    """The checkpoint's adapters are those of the model this run will train (same routed layers and shapes),
    checked on a skeleton of it on the meta device (no weights read) before anything is loaded or written. The
    settings that fix them were compared by :func:`check_resume`; this catches a model folder whose content
    changed, or a checkpoint edited or copied from elsewhere."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import routed_lora as rl

    from .resume import check_adapters_fit

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    joint = cfg.mode == "joint"  # as trainer.build_policy lays the adapters out
    rl.apply_routed_lora(skeleton, target_modules=cfg.target_modules, r=2 * cfg.r if joint else cfg.r,
                         lora_alpha=cfg.lora_alpha, adapters=cfg.adapters())
    with for_flag("--resume"):
        check_adapters_fit(state["adapters"], skeleton, out / "checkpoint.pt")


def _show(v) -> str:
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v))
    return repr(v) if isinstance(v, str) and len(v) < 60 else (f"{v[:40]!r}..." if isinstance(v, str) else str(v))


def _check_out(out: Path, *, resume: bool, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out: {out} exists and is not a folder")
    if not resume and not overwrite and (out / "checkpoint.pt").exists():
        raise UsageError(f"--out: {out} already holds a run (checkpoint.pt); pass --resume to continue it, "
                         "--overwrite to start again there, or another --out")


def check_model_folder(model_dir: str, target_modules, *, flag: str = "--model") -> None:
    """A model folder whose config builds a causal LM (on the meta device: no weights read, no memory) with at
    least one ``nn.Linear`` matched by ``target_modules``; checked before anything is loaded or written."""
    import torch
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM

    from routed_lora.targets import default_targets_for, is_default_targets, target_matches

    if not (Path(model_dir) / "config.json").is_file():
        raise UsageError(f"{flag}: {model_dir} is not a model folder (no config.json)")
    try:
        config = AutoConfig.from_pretrained(model_dir)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # an unknown model type, a broken config.json
        raise UsageError(f"{flag}: {model_dir}: not a causal LM folder transformers can build "
                         f"({type(exc).__name__}: {one_line(exc)})") from exc
    linear = [n for n, m in skeleton.named_modules() if isinstance(m, nn.Linear)]
    targets = default_targets_for(linear) if is_default_targets(target_modules) else list(target_modules)
    if not any(target_matches(targets, n) for n in linear):
        shown = sorted({n.rsplit(".", 1)[-1] for n in linear})
        raise UsageError(f"--target-modules: {' '.join(target_modules)} matches no nn.Linear of {model_dir}; "
                         f"its linear layers are named {shown[:12]}")


def _run(args) -> int:
    import torch

    from routed_lora.env.data import SEARCH_R1_PROMPT, TINY_PROMPT, load_qa
    from routed_lora.state import atomic_write_text

    from .evaluate import format_eval
    from .trainer import Trainer, build_policy, load_model_and_tokenizer, world_info

    # 1. everything given is checked before anything is written to --out
    cfg = config_from_args(args)
    template = {"tiny": TINY_PROMPT, "search-r1": SEARCH_R1_PROMPT}.get(args.prompt, args.prompt)
    with for_flag("--prompt"):
        if args.prompt == "chat" or args.prompt.startswith("chat:"):  # through the model's chat template
            from routed_lora.chat import resolve_prompt

            template = resolve_prompt(args.prompt, args.model)
        check_template(template)
    out = Path(args.out)
    _check_out(out, resume=args.resume, overwrite=args.overwrite)
    run = run_settings(args, template)
    resumed = check_resume(out, cfg, run, allow_changes=args.allow_changes) if args.resume else None
    check_model_folder(args.model, cfg.target_modules)
    if resumed is not None:
        check_resume_fits(out, resumed, args.model, cfg)
        del resumed
    if args.adapters and not Path(args.adapters).exists():
        raise UsageError(f"--adapters: {args.adapters}: no such file or folder")
    with for_flag("--data"):
        train_rows = load_qa(args.data, limit=args.limit)
    with for_flag("--eval-data"):
        eval_rows = load_qa(args.eval_data, limit=args.eval_n) if args.eval_data else []
    with for_flag("--retriever"):
        retriever = make_retriever(args.retriever)
        retriever.search([train_rows[0]["question"]], topk=cfg.topk)  # reachable, and speaks the protocol

    if args.threads:
        torch.set_num_threads(args.threads)
    distributed = _init_distributed()
    rank, _ = world_info()
    torch.manual_seed(cfg.seed)  # identical adapter initialisation on every rank
    with for_flag("--model"):
        model, tok = load_model_and_tokenizer(args.model)
    with for_flag("--target-modules"):
        model, router = build_policy(model, tok, cfg)
    if args.adapters:
        import routed_lora as rl

        with for_flag("--adapters"):
            rl.load_adapters(model, args.adapters)

    # 2. the run
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.json", json.dumps({**cfg.to_dict(), "run": run}, indent=1) + "\n")
    rollout = None
    if args.rollout == "vllm":  # docs/vllm.md: rollouts sampled by vLLM with per-token routed adapters
        from .vllm_rollout import VLLMRollout, build_llm

        import importlib.util

        if world_info()[1] > 1:
            raise UsageError("--rollout vllm: one process only (each rank would start its own engine); run without "
                             "torchrun, or use --rollout hf")
        if importlib.util.find_spec("vllm") is None:
            raise UsageError("--rollout vllm: vLLM is not installed in this environment (make setup-vllm builds "
                             ".venv-vllm; docs/vllm.md)")
        with for_flag("--rollout"):
            pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            rollout = VLLMRollout(cfg, model, tok, router, retriever, llm=build_llm(args.model, model),
                                  prompt_template=template, pad_id=pad)
    trainer = Trainer(cfg, model, tok, router, retriever, train_rows, out=out, eval_rows=eval_rows,
                      eval_samples=args.eval_samples, prompt_template=template, progress=not args.no_progress,
                      strategy=args.strategy, rollout=rollout)
    trainer.checkpoint_extra = {"run": run}
    result = trainer.train(resume=args.resume or None, evaluate_before=not args.no_eval_before)
    if cfg.mode != "base" and (rank == 0 or (distributed and args.strategy == "fsdp2")):
        import routed_lora as rl

        rl.save_adapters(model, out / "adapters")  # FSDP2: every rank gathers, rank 0 writes
        if rank == 0:
            print(f"adapters (PEFT format): {out / 'adapters'}")
    if rank == 0:
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
    pos, nonneg, pos_f, nonneg_f = int_at_least(1), int_at_least(0), finite_float(0, low_open=True), finite_float(0)
    p.add_argument("--mode", choices=("dart", "joint", "base"), default=d.mode,
                   help="dart: two routed adapters; joint: one rank-2r adapter on every token; base: evaluate only")
    p.add_argument("--model", required=True,
                   help="local Hugging Face model folder (with its tokenizer), or smollm2-135m (docs/pretrained.md)")
    p.add_argument("--data", required=True,
                   help="training questions: JSONL or parquet with question, golden_answers (or veRL-style rows: "
                        "prompt, reward_model.ground_truth.target)")
    p.add_argument("--eval-data", default=None, help="held-out questions for EM before / after (optional)")
    p.add_argument("--eval-n", type=pos, default=200, help="held-out questions evaluated")
    p.add_argument("--eval-samples", type=pos, default=None, help="samples per question for sampled EM (default G)")
    p.add_argument("--retriever", required=True, help="bm25:CORPUS.jsonl or http://host:port (Search-R1 server)")
    p.add_argument("--out", required=True, help="output folder (metrics.jsonl, checkpoint.pt, adapters/, plot)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--allow-changes", action="store_true",
                   help="with --resume: continue even if run-changing settings differ from the checkpoint's")
    p.add_argument("--overwrite", action="store_true", help="start a new run in an --out that holds one")
    p.add_argument("--adapters", default=None, help="load adapters (our folder or PEFT's) before training / eval")
    p.add_argument("--prompt", default="tiny",
                   help="'tiny' (built-in world), 'search-r1', a template with {question}, or 'chat', 'chat:tiny', "
                        "'chat:TEMPLATE': that prompt through the model's chat template (routed_lora.chat)")
    p.add_argument("--limit", type=pos, default=None, help="use only the first N training questions")
    p.add_argument("--r", type=pos, default=d.r, help="LoRA rank per adapter (joint mode: 2r)")
    p.add_argument("--lora-alpha", type=pos_f, default=d.lora_alpha)
    p.add_argument("--target-modules", nargs="+", default=list(DEFAULT_TARGETS))
    p.add_argument("--group-size", "-G", type=int_at_least(2), default=d.group_size, help="rollouts per question (G)")
    p.add_argument("--prompts-per-step", type=pos, default=d.prompts_per_step)
    p.add_argument("--steps", type=pos, default=d.steps)
    p.add_argument("--max-turns", type=nonneg, default=d.max_turns, help="tool calls per rollout")
    p.add_argument("--topk", type=pos, default=d.topk, help="passages per search")
    p.add_argument("--max-new-tokens", type=pos, default=d.max_new_tokens, help="per generation turn")
    p.add_argument("--max-total-tokens", type=pos, default=d.max_total_tokens,
                   help="response cap (and Dr.GRPO's constant normaliser)")
    p.add_argument("--temperature", type=pos_f, default=d.temperature)
    p.add_argument("--lr", type=pos_f, default=d.lr, help="learning rate (reasoning / joint adapter)")
    p.add_argument("--lr-tool", type=nonneg_f, default=None, help="learning rate of the tool adapter (default --lr)")
    p.add_argument("--weight-decay", type=nonneg_f, default=d.weight_decay)
    p.add_argument("--beta", type=nonneg_f, default=d.beta, help="k3 KL coefficient (0: no reference pass)")
    p.add_argument("--eps-low", type=nonneg_f, default=d.eps_low, help="clip range below 1")
    p.add_argument("--eps-high", type=nonneg_f, default=None, help="clip range above 1 (default --eps-low)")
    p.add_argument("--aggregation", choices=("token-mean", "seq-mean-token-mean", "dr-grpo"), default=d.aggregation)
    p.add_argument("--no-scale-rewards", action="store_true", help="advantages without the std (Dr.GRPO)")
    p.add_argument("--format-reward", type=finite_float(), default=d.format_reward,
                   help="reward for a well-formed but wrong answer (0: plain EM)")
    p.add_argument("--loss-on", choices=("all", "reasoning", "tool"), default="all",
                   help="loss on every sampled token, or only on one role's (tool: inside <search>...</search>; "
                        "reasoning: the rest): LEAS's M_Reas / M_Tool")
    p.add_argument("--epochs", type=pos, default=d.epochs, help="passes over each rollout batch")
    p.add_argument("--mini-batches", type=pos, default=d.mini_batches, help="optimiser steps per pass")
    p.add_argument("--old-logprobs", choices=("auto", "rollout", "recompute"), default=d.old_logprobs,
                   help="old log-probs of the mini-batches after the first: the sampler's (rollout: no extra "
                        "pass), a teacher-forced pass (recompute), or rollout for float32 models (auto)")
    p.add_argument("--micro-batch-size", type=pos, default=d.micro_batch_size)
    p.add_argument("--max-grad-norm", type=pos_f, default=d.max_grad_norm)
    p.add_argument("--seed", type=nonneg, default=d.seed)
    p.add_argument("--save-every", type=nonneg, default=d.save_every, help="checkpoint every N steps (and at the end)")
    p.add_argument("--eval-every", type=nonneg, default=d.eval_every,
                   help="held-out EM every N steps (0: before/after)")
    p.add_argument("--no-eval-before", action="store_true")
    p.add_argument("--strategy", choices=("ddp", "fsdp2"), default="ddp",
                   help="under torchrun: DistributedDataParallel, or torch's fully_shard (FSDP2: each decoder layer "
                        "and the root sharded; rollouts run with the parameters gathered)")
    p.add_argument("--rollout", choices=("hf", "vllm"), default="hf",
                   help="rollout sampler: HF generate on the trained model, or vLLM with the routed-lora plugin "
                        "(its own environment: make setup-vllm; docs/vllm.md)")
    p.add_argument("--threads", type=nonneg, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--no-progress", action="store_true")


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="GRPO training with routed LoRA adapters (dart / joint / base)")
    add_train_arguments(p)
    p.set_defaults(func=_run)
