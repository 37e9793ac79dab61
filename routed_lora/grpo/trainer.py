"""The GRPO loop for routed LoRA (DESIGN.md §3): rollout, reward, advantages, clipped updates, checkpoints.

One training step:

1. take ``prompts_per_step`` questions (this rank's share under DDP) and sample ``group_size`` rollouts of each
   with the agent loop of :mod:`routed_lora.env.rollout` (tool results spliced in as token ids, info-masked);
   all rollouts of a question share one group id;
2. reward each rollout (exact match on the last ``<answer>``, optional format reward) and compute group-normalised
   advantages (:func:`routed_lora.grpo.loss.group_advantages`);
3. record the old log-probs (and, when beta > 0, the reference log-probs with adapters off) with the same routes,
   position ids, micro-batches and temperature the updates will use, so the first ratio is exactly 1; the first
   mini-batch is updated before any optimiser step, so its old log-probs come from its own first update forward
   (detached, the same values) and the separate pass runs only for the later mini-batches (none with one
   mini-batch and one epoch). ``old_logprobs`` ("auto", the default) takes the later mini-batches' old log-probs
   from the rollout instead: the sampler recorded log_softmax(logits / T) of the same policy, before any update,
   at the same positions and routes (equal to the teacher-forced values to float rounding, <= 1e-5 in float32),
   so no old-policy pass runs at all; "recompute" always runs it (rollouts from another engine or precision);
4. ``epochs`` passes over the batch, each split in ``mini_batches`` optimiser steps (question q of the step goes
   to mini-batch q mod mini_batches, so N processes make the same update as one: :func:`mini_batch_rows`;
   ``--strategy ddp`` or ``fsdp2`` under torchrun); each optimiser step
   accumulates micro-batch losses normalised over the whole step (and over all ranks), clips the global gradient
   norm, and applies per-adapter learning rates;
5. write one metrics row (JSONL) and, every ``save_every`` steps, an atomic checkpoint.

``loss_on`` ("reasoning" / "tool", default "all") keeps the loss on one role's sampled tokens only
(:func:`role_mask`): the role-masked RL of LEAS's M_Reas and M_Tool (DESIGN.md §5).

The pieces, one module each (this one re-exports their names, so ``routed_lora.grpo.trainer.X`` keeps working for
reading; to patch a name, patch the module that reads it):

- :mod:`.config`: :class:`GRPOConfig` and its checks;
- :mod:`.rollout`: the rollout interface (:class:`RolloutEngine`, :class:`RolloutBatch`); :mod:`.hf_rollout`: the
  HF engine (the default) and :func:`role_mask`;
- :mod:`.adapters`: adapter state, gradient norms and the per-adapter optimiser (:class:`AdapterOptimizer`);
- :mod:`.distributed`: rank, world size, sums over ranks, gradient sync;
- :mod:`.update`: :func:`grpo_update` (steps 2-4);
- :mod:`.checkpoint`: checkpoints, RNG states and the metrics file;
- :mod:`.policy`: loading a model folder and patching it for a mode (:func:`build_policy`).

This module keeps the loop (:class:`Trainer`) and the data order (:func:`rows_for_step`). Must not grow the
pieces back: a new rollout engine implements :class:`RolloutEngine`, it adds no branch here.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Callable, Sequence

import torch


from . import adapters, checkpoint, config, distributed, hf_rollout, policy, update  # noqa: F401  (the pieces, as attributes)
from .adapters import (  # noqa: F401  (re-exported)
    AdapterOptimizer,
    _broadcast_adapters,
    adapter_grad_norms,
    adapter_names,
    adapter_state,
    load_adapter_state,
    lora_parameters,
    routed_layers,
)
from .checkpoint import MetricsWriter, load_checkpoint, rng_state, save_checkpoint, set_rng_state  # noqa: F401
from .config import DEFAULT_TARGETS, LOSS_ON, MODES, OLD_LOGPROBS, STRATEGIES, ConfigError, GRPOConfig  # noqa: F401
from .distributed import all_reduce_sum, world_info  # noqa: F401
from .hf_rollout import HFRollout, role_mask  # noqa: F401
from .policy import build_policy, load_model_and_tokenizer  # noqa: F401
from .rollout import RolloutBatch, RolloutEngine  # noqa: F401
from .update import (  # noqa: F401  (re-exported; token_logprobs and _FORCE_OLD_PASS are patched by tests)
    _FORCE_OLD_PASS,
    grpo_update,
    mini_batch_rows,
    old_logprobs_from_rollout,
    token_logprobs,
)

__all__ = ["GRPOConfig", "ConfigError", "RolloutBatch", "RolloutEngine", "HFRollout", "routed_layers",
           "adapter_names", "AdapterOptimizer", "grpo_update", "save_checkpoint", "load_checkpoint", "MetricsWriter",
           "Trainer"]


# ----------------------------------------------------------------------------------------------------------------
# the data order and the loop


def rows_for_step(n_rows: int, step: int, per_step: int, seed: int, rank: int = 0, world: int = 1) -> list[int]:
    """Indices of the questions of ``step`` for ``rank``: consecutive slices of a reshuffled order per epoch
    (a pure function of the step, so a resumed run sees the same questions)."""
    start = step * per_step
    out = []
    i = start
    while len(out) < per_step:
        epoch, pos = divmod(i, n_rows)
        g = torch.Generator().manual_seed(seed * 100003 + epoch)
        perm = torch.randperm(n_rows, generator=g)
        take = min(per_step - len(out), n_rows - pos)
        out += perm[pos:pos + take].tolist()
        i += take
    share = per_step // world
    return out[rank * share:(rank + 1) * share]


class Trainer:
    """The GRPO loop over a question list with a retriever (module doc). ``model`` must already be patched
    (:func:`build_policy`); ``router`` is the model's router (used for the teacher-forced routes). ``rollout``:
    the rollout engine (default: :class:`HFRollout` on ``model`` itself)."""

    def __init__(self, cfg: GRPOConfig, model, tokenizer, router, retriever, train_rows: Sequence[dict], *,
                 out: str | Path, eval_rows: Sequence[dict] | None = None, eval_samples: int | None = None,
                 prompt_template: str | None = None, progress: bool = True,
                 reward_fn: Callable[[str, list], float] | None = None, strategy: str = "ddp",
                 rollout: RolloutEngine | None = None):
        from routed_lora.env.data import TINY_PROMPT

        self.reward_fn = reward_fn  # (completion text, golden answers) -> reward; default EM (+ format reward)
        self.cfg = cfg.check()
        self.model = model
        self.tok = tokenizer
        self.router = router
        self.retriever = retriever
        self.rows = list(train_rows)
        self.eval_rows = list(eval_rows) if eval_rows else []
        self.eval_samples = cfg.group_size if eval_samples is None else eval_samples
        self.template = prompt_template or TINY_PROMPT
        self.out = Path(out)
        self.progress = progress
        self.progress_desc: str | None = None  # the progress bar's label (default "grpo MODE")
        self.rank, self.world = world_info()
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")
        self.strategy = strategy
        if cfg.prompts_per_step % self.world:
            raise ValueError(f"prompts_per_step={cfg.prompts_per_step} is not a multiple of the {self.world} ranks")
        share = cfg.prompts_per_step // self.world
        if self.world > 1 and share % cfg.mini_batches:
            raise ValueError(
                f"mini_batches={cfg.mini_batches} must divide the questions per process (prompts_per_step / "
                f"processes = {cfg.prompts_per_step} / {self.world} = {share}) so that the update equals the "
                "one-process update on the same global batch (see grpo.trainer.mini_batch_rows)"
            )
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.rollout: RolloutEngine = rollout if rollout is not None else HFRollout(
            self.cfg, model, tokenizer, router, retriever, prompt_template=self.template, pad_id=self.pad_id,
            reward_fn=reward_fn)
        self.ddp_model = model
        if self.world > 1 and cfg.mode != "base":
            if strategy == "fsdp2":
                from routed_lora.fsdp import shard_model

                _broadcast_adapters(model)  # as DDP does: every rank starts from rank 0's adapters
                shard_model(model)  # the model itself becomes the FSDP2 module
            else:
                from torch.nn.parallel import DistributedDataParallel as DDP

                self.ddp_model = DDP(model)  # broadcasts rank 0's adapters
        self.optimizer = AdapterOptimizer(model, cfg.adapter_lrs(), weight_decay=cfg.weight_decay) \
            if cfg.mode != "base" else None
        self.step = 0
        self.checkpoint_extra: dict | None = None  # stored with every checkpoint (the CLI's run settings)

    # -- one batch of rollouts -----------------------------------------------------------------------------------
    def collect(self, rows: Sequence[dict], group_offset: int = 0) -> tuple[RolloutBatch, torch.Tensor, dict]:
        """One batch of rollouts of ``rows`` from the rollout engine (:meth:`RolloutEngine.collect`)."""
        return self.rollout.collect(rows, group_offset)

    # -- evaluation ----------------------------------------------------------------------------------------------
    def evaluate(self, rows=None, label: str = "eval") -> dict:
        from routed_lora.fsdp import full_params

        from .evaluate import evaluate_em

        rows = self.eval_rows if rows is None else rows
        if not rows:
            return {}
        with full_params(self.model):  # FSDP2: no collectives while ranks generate different numbers of steps
            return evaluate_em(self.model, self.tok, rows, self.retriever, samples=self.eval_samples,
                               temperature=self.cfg.temperature, max_turns=self.cfg.max_turns,
                               max_new_tokens=self.cfg.max_new_tokens, topk=self.cfg.topk,
                               prompt_template=self.template, seed=self.cfg.seed + 7919)

    # -- the loop ------------------------------------------------------------------------------------------------
    def train(self, *, resume: str | Path | bool | None = None, evaluate_before: bool | dict = True,
              evaluate_after: bool = True, callback: Callable[[dict], None] | None = None) -> dict:
        from tqdm.auto import tqdm

        cfg = self.cfg
        start = 0
        if self.rank == 0:  # temporaries of a killed writer (checkpoint.pt.tmp<pid>, .adapters.tmp<pid>-...)
            from routed_lora.state import remove_stale_temporaries

            remove_stale_temporaries(self.out, names=("checkpoint.pt", "config.json", "metrics.jsonl", "adapters"))
        if resume:
            path = self.out / "checkpoint.pt" if resume is True else Path(resume)
            if path.is_dir():
                path = path / "checkpoint.pt"
            if not path.exists():
                raise FileNotFoundError(f"--resume: no checkpoint at {path}")
            state = load_checkpoint(path, model=self.model, optimizer=self.optimizer)
            start = int(state["step"])
        else:
            random.seed(cfg.seed + self.rank)
            import numpy as np

            np.random.seed(cfg.seed + self.rank)
            torch.manual_seed(cfg.seed + 1000 * self.rank)
        writer = MetricsWriter(self.out / "metrics.jsonl", resume_step=start if resume else None,
                               enabled=self.rank == 0)
        evals = {}
        if isinstance(evaluate_before, dict):  # computed by the caller
            evals["before"] = evaluate_before
            writer.write({"eval": "before", "step": start, **evaluate_before})
        elif evaluate_before and not resume and self.eval_rows:
            ev = self.evaluate()
            evals["before"] = ev
            writer.write({"eval": "before", "step": 0, **ev})
        steps = cfg.steps if cfg.mode != "base" else 0
        bar = tqdm(range(start, steps), initial=start, total=steps, desc=self.progress_desc or f"grpo {cfg.mode}",
                   disable=not self.progress or self.rank != 0, dynamic_ncols=True)
        t_start = time.perf_counter()
        last = {}
        for step in bar:
            t0 = time.perf_counter()
            idx = rows_for_step(len(self.rows), step, cfg.prompts_per_step, cfg.seed, self.rank, self.world)
            rows = [self.rows[i] for i in idx]
            batch, routes, info = self.collect(rows, group_offset=self.rank * len(rows))
            t1 = time.perf_counter()
            self.model.train()
            metrics = grpo_update(self.model, self.ddp_model, self.optimizer, batch, routes, cfg)
            self.model.eval()
            t2 = time.perf_counter()
            row = {"step": step + 1, **metrics, "rollout_s": t1 - t0, "update_s": t2 - t1,
                   "finish_answer": info["finish_answer"], "prefill_tokens": info["prefill_tokens"],
                   "decode_tokens": info["decode_tokens"]}
            self.step = step + 1
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < steps and self.eval_rows:
                ev = self.evaluate()
                writer.write({"eval": f"step{self.step}", "step": self.step, **ev})
            writer.write(row)
            last = row
            if callback is not None:
                callback(row)
            bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", kl=f"{metrics.get('kl', float('nan')):.4f}",
                            clip=f"{metrics['clip_frac']:.3f}", refresh=False)
            if (cfg.save_every and self.step % cfg.save_every == 0) or self.step == steps:
                save_checkpoint(self.out, model=self.model, optimizer=self.optimizer, step=self.step, cfg=cfg,
                                extra=self.checkpoint_extra)
        bar.close()
        train_seconds = time.perf_counter() - t_start
        if evaluate_after and self.eval_rows:
            ev = self.evaluate()
            evals["after"] = ev
            writer.write({"eval": "after", "step": self.step, **ev})
        return {"steps": self.step, "train_seconds": train_seconds, "last": last, "evals": evals}

