"""``routed-lora study``: the DART study (:mod:`routed_lora.study.run`)."""

from __future__ import annotations


def _run(args) -> int:
    from .run import QUICK, StudyConfig, run_study

    kw = dict(QUICK) if args.quick else {}
    if args.model:  # a pretrained model: its warm start and learning rate (env/lora_sft.py), then the flags
        from routed_lora.env.lora_sft import PRETRAINED_STUDY, check_pretrained

        check_pretrained(args.model)
        kw.update(PRETRAINED_STUDY, model=str(args.model))
    for name in ("seeds", "steps", "eval_n", "r", "lr", "prompts_per_step", "group_size", "sft_steps"):
        v = getattr(args, name)
        if v is not None:
            kw[name] = v
    if args.world_kind is not None:
        kw["world_kind"] = args.world_kind
    if args.arms:
        kw["arms"] = tuple(a.strip() for a in args.arms.split(",") if a.strip())
    cfg = StudyConfig(**kw).check()
    run_study(args.out, cfg, world=args.world, threads=args.threads, progress=not args.no_progress)
    return 0


def register(sub) -> None:
    from .run import ARMS, QUICK, StudyConfig

    d = StudyConfig()
    p = sub.add_parser("study", help="DART vs joint vs controls, >= 3 seeds, paired tests, a markdown report")
    p.add_argument("--out", default="runs/study", help="output folder (default runs/study); rerun to resume")
    p.add_argument("--quick", action="store_true",
                   help=f"the quick study ({', '.join(f'{k}={v}' for k, v in QUICK.items())})")
    p.add_argument("--model", default=None,
                   help="a pretrained model, smollm2-135m or a folder with a chat template (default: the world's "
                        "tiny model): chat:tiny prompt, merged LoRA warm start, sft-steps 30 and lr 2e-5 unless given")
    p.add_argument("--world", default=None, help="an existing world folder (default: build one under --out)")
    p.add_argument("--world-kind", dest="world_kind", choices=("default", "conflict"), default=None,
                   help="world built under --out: default (the demo's) or conflict (queries in codes, answers in "
                        "names; docs/study.md)")
    p.add_argument("--seeds", type=int, default=None, help=f"seeds per trained arm (default {d.seeds})")
    p.add_argument("--steps", type=int, default=None, help=f"steps per trained arm (default {d.steps})")
    p.add_argument("--eval-n", dest="eval_n", type=int, default=None,
                   help=f"held-out questions, balanced 1-hop / 2-hop (default {d.eval_n})")
    p.add_argument("--r", type=int, default=None, help=f"rank per DART adapter; joint uses 2r (default {d.r})")
    p.add_argument("--lr", type=float, default=None, help=f"learning rate of every arm (default {d.lr:g})")
    p.add_argument("--prompts-per-step", dest="prompts_per_step", type=int, default=None)
    p.add_argument("--group-size", dest="group_size", type=int, default=None)
    p.add_argument("--sft-steps", dest="sft_steps", type=int, default=None, help="warm start SFT steps")
    p.add_argument("--arms", default=None, help=f"comma-separated subset of {','.join(ARMS)}")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run)
