"""``routed-lora study``: DART vs one joint adapter vs controls on the built-in world, with paired statistics.

The question (DESIGN.md, the DART claim): do two per-token adapters (reasoning, tool) trained with GRPO beat one
adapter of the same size trained the same way? The **primary metric is fixed before anything runs** (written to
``study.json`` first): held-out greedy exact match on 2-hop questions, DART vs joint, paired over questions.

Arms, all started from one shared warm start (the env's SFT, as in the demo), all at equal steps:

- ``dart``: GRPO, adapters ``reasoning`` and ``tool`` of rank r, routed per token by the tag router;
- ``joint``: GRPO, one adapter of rank 2r on every token, alpha doubled (same scaling alpha/r), so the same
  number of trainable parameters (2 x r x (in + out) per layer);
- ``sft``: continued SFT (control): one adapter of rank 2r, cross-entropy on the expert trajectories of the very
  questions the GRPO arms see at each step (same question order), same steps and learning rate;
- ``warm``: the warm start alone (no training; greedy decoding is deterministic, so one evaluation serves
  every seed).

Each trained arm runs once per seed (seed s sets the adapters' initialisation, the question order and the
sampling). Every arm is evaluated greedily on the same held-out questions (balanced 1-hop / 2-hop); the
per-question results go to ``arms/<arm>/seed<s>/per_question.jsonl``. Paired tests
(:mod:`routed_lora.study.stats`), 1-hop and 2-hop apart: exact McNemar per seed and pooled over (seed,
question) pairs, and a paired bootstrap interval of the difference of per-question means over seeds (questions
resampled, seeds of a question kept together). ``report.md`` and ``em.png`` summarise.

Resuming: a finished arm (``result.json`` present) is not redone; an unfinished one restarts from its start.
Everything is checked before training starts: settings of an existing study folder, the evaluation set, and
every finished arm's saved adapters (mode, rank, alpha).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .design import ARMS, COMPARISONS, PRIMARY, TRAINED  # noqa: F401  (re-exported: the study's design)


@dataclass
class StudyConfig:
    """The study's settings. Defaults are the full study; :data:`QUICK` the ``--quick`` one."""

    seeds: int = 3
    steps: int = 120  # optimiser steps of every trained arm
    prompts_per_step: int = 32
    group_size: int = 8
    r: int = 8  # per DART adapter; joint and sft use 2r
    lora_alpha: float = 16.0
    lr: float = 5e-4
    beta: float = 0.001
    mini_batches: int = 2
    max_new_tokens: int = 48
    max_total_tokens: int = 400
    max_turns: int = 4
    topk: int = 3
    eval_n: int = 494  # held-out questions (balanced 1-hop / 2-hop; the default world has 494)
    sft_steps: int = 250  # warm start, the demo's (2-hop greedy EM about 0.47: room to learn; docs/study.md)
    two_hop_frac: float = 0.03
    people: int = 400
    world_seed: int = 0
    world_kind: str = "default"  # "conflict": routed_lora.env.conflict_world (issue 21)
    arms: tuple = ARMS
    # a pretrained model (folder or smollm2-135m): chat:tiny prompt, merged LoRA warm start (env/lora_sft.py)
    model: str | None = None

    def check(self) -> "StudyConfig":
        for name in ("seeds", "steps", "prompts_per_step", "r", "sft_steps", "people"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {v!r}")
        if self.eval_n < 2:
            raise ValueError(f"eval_n: expected >= 2 held-out questions (1-hop and 2-hop), got {self.eval_n}")
        if self.group_size < 2:
            raise ValueError(f"group_size: GRPO needs at least 2 rollouts per question, got {self.group_size}")
        if self.world_kind not in ("default", "conflict"):
            raise ValueError(f"world_kind: expected 'default' or 'conflict', got {self.world_kind!r}")
        bad = [a for a in self.arms if a not in ARMS]
        if bad or not self.arms:
            raise ValueError(f"arms: expected a non-empty subset of {ARMS}, got {list(self.arms)}")
        return self

    def to_dict(self) -> dict:
        d = asdict(self)
        d["arms"] = list(self.arms)
        return d


QUICK = dict(seeds=3, steps=12, prompts_per_step=16, group_size=8, eval_n=200)


@dataclass
class ArmSpec:
    arm: str
    seed: int
    mode: str  # "dart" | "joint" (the LoRA layout) | "none"
    r: int
    lora_alpha: float

    @property
    def key(self) -> str:
        return f"{self.arm}/seed{self.seed}"


def arm_specs(cfg: StudyConfig) -> list[ArmSpec]:
    out = []
    for arm in cfg.arms:
        if arm == "warm":
            out.append(ArmSpec("warm", 0, "none", 0, 0.0))
            continue
        for s in range(cfg.seeds):
            if arm == "dart":
                out.append(ArmSpec(arm, s, "dart", cfg.r, cfg.lora_alpha))
            else:  # joint GRPO and the SFT control: one adapter of rank 2r, same scaling
                out.append(ArmSpec(arm, s, "joint", 2 * cfg.r, 2 * cfg.lora_alpha))
    return out


# ------------------------------------------------------------------------------------------------ checks


def _check_existing(out: Path, cfg: StudyConfig) -> None:
    """An existing study folder must hold the same settings; finished arms must hold adapters of the expected
    mode, rank and alpha. Raises ValueError before anything trains."""
    meta = out / "study.json"
    if meta.exists():
        saved = json.loads(meta.read_text())
        # the pre-registered primary metric may never change under a study's results
        if saved.get("primary") != PRIMARY:
            raise ValueError(f"--out {out}: study.json pre-registered the primary metric {saved.get('primary')!r}; "
                             f"this version of the study asks {PRIMARY!r}. A primary metric is fixed before the "
                             "run: use another --out")
        old = saved["config"]
        new = cfg.to_dict()
        # settings added after a study was written: their value then is the default of that time
        old = {**_ADDED_SETTINGS, **old}
        diff = {k: (old.get(k), new[k]) for k in new if old.get(k) != new[k]}
        if diff:
            what = ", ".join(f"{k}: saved {a!r}, asked {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"--out {out}: holds a study with other settings ({what}); use another --out or "
                             "the same settings")
    for spec in arm_specs(cfg):
        d = out / "arms" / spec.arm / f"seed{spec.seed}"
        if (d / "result.json").exists():
            check_adapters(d / "adapters", spec)


_ADDED_SETTINGS = {"world_kind": "default", "model": None}


def check_adapters(path: Path, spec: ArmSpec) -> None:
    """The adapters saved in ``path`` have the layout of ``spec``: adapter names, rank and alpha."""
    want_names = {"dart": ["reasoning", "tool"], "joint": ["joint"], "none": []}[spec.mode]
    if spec.mode == "none":
        return
    manifest = path / "routed_lora.json"
    if not manifest.exists():
        raise ValueError(f"{spec.key}: finished, but no adapters at {path} (expected {want_names}); delete "
                         f"{path.parent} to redo the arm")
    m = json.loads(manifest.read_text())
    got = (list(m.get("adapters", [])), m.get("r"), float(m.get("lora_alpha", float("nan"))))
    want = (want_names, spec.r, float(spec.lora_alpha))
    if got != want:
        raise ValueError(f"{spec.key}: adapters at {path} are (adapters, r, lora_alpha) = {got}, expected {want} "
                         f"(mode {spec.mode!r}); delete {path.parent} to redo the arm")


def _check_world_kind(world_dir: Path, cfg: StudyConfig) -> None:
    """The world folder is of the kind the settings name (``world.json``'s ``kind``; absent: the default)."""
    meta = world_dir / "world.json"
    kind = json.loads(meta.read_text()).get("kind", "default") if meta.exists() else "default"
    if kind != cfg.world_kind:
        raise ValueError(f"--world {world_dir}: a {kind!r} world, but the study's world kind is {cfg.world_kind!r} "
                         f"(--world-kind {kind} to study it)")


def eval_rows_for(world_dir: Path, n: int) -> list[dict]:
    from routed_lora.demo import balanced_rows
    from routed_lora.env.data import load_qa

    test = world_dir / "test.jsonl"
    try:
        rows = load_qa(test) if test.exists() else []
    except ValueError:  # an empty file
        rows = []
    rows = balanced_rows(rows, n, seed=0) if rows else []
    hops = {int(r.get("hops", 0)) for r in rows}
    if not rows or not {1, 2} <= hops:
        raise ValueError(f"evaluation set: {test} gives {len(rows)} held-out questions with hop counts "
                         f"{sorted(hops)}; the study needs 1-hop and 2-hop questions")
    for i, r in enumerate(rows):
        r.setdefault("id", i)
    return rows


# ------------------------------------------------------------------------------------------------ arms


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


def _write_jsonl(path: Path, rows) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


def _grpo_config(cfg: StudyConfig, spec: ArmSpec):
    from routed_lora.grpo.trainer import GRPOConfig

    return GRPOConfig(mode=spec.arm if spec.arm in ("dart", "joint") else "joint", r=cfg.r,
                      lora_alpha=cfg.lora_alpha, steps=cfg.steps, prompts_per_step=cfg.prompts_per_step,
                      group_size=cfg.group_size, lr=cfg.lr, beta=cfg.beta, max_turns=cfg.max_turns, topk=cfg.topk,
                      max_new_tokens=cfg.max_new_tokens, max_total_tokens=cfg.max_total_tokens, temperature=1.0,
                      mini_batches=cfg.mini_batches, micro_batch_size=64, save_every=0, seed=1000 + spec.seed)


def _evaluate(model, tok, rows, retriever, cfg: StudyConfig, records: list, template=None) -> dict:
    from routed_lora.grpo.evaluate import evaluate_em

    return evaluate_em(model, tok, rows, retriever, samples=0, greedy=True, max_turns=cfg.max_turns,
                       max_new_tokens=cfg.max_new_tokens, topk=cfg.topk, records=records, prompt_template=template)


def run_arm(spec: ArmSpec, cfg: StudyConfig, *, warm_dir: Path, world_dir: Path, eval_rows, out: Path,
            progress: bool = True) -> dict:
    """Train (or not) one arm and evaluate it; writes ``per_question.jsonl``, ``adapters/`` and, last,
    ``result.json``. Returns the result."""
    import routed_lora as rl
    from routed_lora.env.data import load_qa
    from routed_lora.env.retriever import BM25Retriever
    from routed_lora.grpo.trainer import Trainer, build_policy, load_model_and_tokenizer

    from .controls import run_controls

    if out.exists():
        shutil.rmtree(out)  # an unfinished arm: start it again
    out.mkdir(parents=True)
    retriever = BM25Retriever(world_dir / "corpus.jsonl")
    train_rows = load_qa(world_dir / "train.jsonl")
    gcfg = _grpo_config(cfg, spec)
    torch.manual_seed(gcfg.seed)
    model, tok = load_model_and_tokenizer(warm_dir)
    from routed_lora.env.lora_sft import prompt_template_of

    template = prompt_template_of(warm_dir)  # the chat template of a pretrained warm start; None: the plain one
    t0 = time.perf_counter()
    train = {}
    if spec.arm in ("dart", "joint"):
        model, router = build_policy(model, tok, gcfg)
        trainer = Trainer(gcfg, model, tok, router, retriever, train_rows, out=out / "grpo", progress=progress,
                          prompt_template=template)
        trainer.progress_desc = f"study {spec.key}"
        res = trainer.train(evaluate_before=False, evaluate_after=False)
        rows = [json.loads(x) for x in (out / "grpo" / "metrics.jsonl").read_text().splitlines() if x.strip()]
        train = {"steps": res["steps"], "train_seconds": res["train_seconds"],
                 "reward_first": _mean([r["reward_mean"] for r in rows[:3]]),
                 "reward_last": _mean([r["reward_mean"] for r in rows[-3:]])}
        (out / "grpo" / "checkpoint.pt").unlink(missing_ok=True)  # the adapters are saved below
    elif spec.arm == "sft":
        model, router = build_policy(model, tok, gcfg)  # joint layout, rank 2r
        train = continued_sft(model, tok, retriever, train_rows, gcfg, progress=progress, desc=f"study {spec.key}",
                              prompt_template=template)
    t_train = time.perf_counter() - t0
    records: list = []
    ev = _evaluate(model, tok, eval_rows, retriever, cfg, records, template)
    _write_jsonl(out / "per_question.jsonl", records)
    if spec.mode != "none":
        rl.save_adapters(model, out / "adapters")
    # the controls (retrieval held constant; the 2-Agent baseline of the dart arm): .controls
    controls = run_controls(spec, cfg, model, tok, eval_rows, retriever, warm_dir=warm_dir, arm_dir=out,
                            own_records=records, prompt_template=template)
    result = {"arm": spec.arm, "seed": spec.seed, "mode": spec.mode, "r": spec.r, "lora_alpha": spec.lora_alpha,
              "trainable_parameters": 0 if spec.mode == "none" else
              sum(p.numel() for p in model.parameters() if p.requires_grad),
              "train": train, "train_seconds": t_train, "eval": ev, **controls, "finished": time.time()}
    _write_json(out / "result.json", result)
    return result


def continued_sft(model, tok, retriever, train_rows, gcfg, *, progress=True, desc="sft", prompt_template=None) -> dict:
    """The control arm: ``gcfg.steps`` AdamW steps at ``gcfg.lr`` on the LoRA adapter, cross-entropy on the
    expert trajectories of the questions GRPO would see at each step (``rows_for_step``, same seed)."""
    from tqdm.auto import tqdm

    from routed_lora.env.sft import _batch, sft_loss
    from routed_lora.env.trajectories import build_trajectories
    from routed_lora.grpo.trainer import AdapterOptimizer, rows_for_step

    opt = AdapterOptimizer(model, gcfg.adapter_lrs())
    cache: dict[int, dict] = {}
    losses = []
    t0 = time.perf_counter()
    model.train()
    for step in tqdm(range(gcfg.steps), desc=desc, disable=not progress, dynamic_ncols=True):
        idx = rows_for_step(len(train_rows), step, gcfg.prompts_per_step, gcfg.seed)
        todo = [i for i in idx if i not in cache]
        if todo:
            kw = {"prompt_template": prompt_template} if prompt_template else {}
            for i, t in zip(todo, build_trajectories(tok, [train_rows[i] for i in todo], retriever, **kw)):
                cache[i] = t
        ids, attn, mask = _batch([cache[i] for i in idx], tok.pad_token_id)
        loss = sft_loss(model, ids, attn, mask)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(opt.params, gcfg.max_grad_norm)
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return {"steps": gcfg.steps, "train_seconds": time.perf_counter() - t0, "loss_first": _mean(losses[:3]),
            "loss_last": _mean(losses[-3:])}


def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


# ------------------------------------------------------------------------------------------------ the study


def run_study(out: str | Path, cfg: StudyConfig, *, world: str | Path | None = None, threads: int = 2,
              progress: bool = True, log=print) -> dict:
    """Run (or resume) the study under ``out``; returns the analysis (also in ``results.json``)."""
    from routed_lora.demo import warm_start
    from routed_lora.env.cli import build_default_world

    from .controls import ensure_controls
    from .report import analyse, write_report

    cfg.check()
    out = Path(out)
    _check_existing(out, cfg)
    torch.set_num_threads(threads)
    t_all = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    world_dir = Path(world) if world else out / "world"
    if world is None and not (world_dir / "model" / "config.json").exists():
        build_default_world(world_dir, seed=cfg.world_seed, people=cfg.people, kind=cfg.world_kind)
    if world is not None and not (world_dir / "corpus.jsonl").exists():
        raise FileNotFoundError(f"--world {world_dir}: no corpus.jsonl (a folder from `routed-lora world build`)")
    _check_world_kind(world_dir, cfg)
    eval_rows = eval_rows_for(world_dir, cfg.eval_n)
    if not (out / "study.json").exists():  # the primary metric, fixed before any arm runs
        _write_json(out / "study.json", {"primary": PRIMARY, "config": cfg.to_dict(), "created": time.time(),
                                         "world": str(world_dir), "eval_questions": len(eval_rows)})
    log(f"[study] {out}: arms {list(cfg.arms)}, {cfg.seeds} seeds, {cfg.steps} steps, {len(eval_rows)} held-out "
        f"questions; primary: {PRIMARY['metric']}, {' vs '.join(PRIMARY['comparison'])}")

    warm_dir = out / "warm_start"
    prev = warm_dir / "sft_summary.json"
    s = json.loads(prev.read_text()) if prev.exists() else None
    if not (s and (s.get("steps"), s.get("two_hop_frac")) == (cfg.sft_steps, cfg.two_hop_frac)
            and (warm_dir / "config.json").exists()):
        t = time.perf_counter()
        if cfg.model:  # pretrained: one LoRA adapter trained through the chat template, merged into the weights
            from routed_lora.env.lora_sft import merged_warm_start

            merged_warm_start(cfg.model, world_dir, warm_dir, steps=cfg.sft_steps, r=cfg.r,
                              lora_alpha=cfg.lora_alpha, two_hop_frac=cfg.two_hop_frac,
                              eval_n=min(cfg.eval_n, 200), max_turns=cfg.max_turns,
                              max_new_tokens=cfg.max_new_tokens, seed=0, progress=progress)
        else:
            warm_start(world_dir, warm_dir, steps=cfg.sft_steps, eval_n=min(cfg.eval_n, 200),
                       two_hop_frac=cfg.two_hop_frac, seed=0, threads=threads, progress=progress)
        log(f"[study] warm start: {cfg.sft_steps} SFT steps in {time.perf_counter() - t:.0f} s")

    results = {}
    for spec in arm_specs(cfg):
        d = out / "arms" / spec.arm / f"seed{spec.seed}"
        if (d / "result.json").exists():
            log(f"[study] {spec.key}: done before, kept")
            # an arm that finished before the controls existed gets them from its saved adapters
            ensure_controls(spec, cfg, arm_dir=d, warm_dir=warm_dir, world_dir=world_dir, rows=eval_rows, log=log)
            results[spec.key] = json.loads((d / "result.json").read_text())
            continue
        t = time.perf_counter()
        results[spec.key] = run_arm(spec, cfg, warm_dir=warm_dir, world_dir=world_dir, eval_rows=eval_rows,
                                    out=d, progress=progress)
        ev = results[spec.key]["eval"]
        log(f"[study] {spec.key}: greedy EM 1-hop {ev['em_greedy/1hop']:.3f}, 2-hop {ev['em_greedy/2hop']:.3f} "
            f"({time.perf_counter() - t:.0f} s)")
    analysis = analyse(out, cfg)
    analysis["wall_seconds_this_run"] = time.perf_counter() - t_all
    _write_json(out / "results.json", analysis)
    write_report(out, cfg, analysis)
    log(f"[study] report: {out / 'report.md'}")
    return analysis
