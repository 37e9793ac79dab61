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

Modes: ``dart`` (adapters ``reasoning`` and ``tool``, routed per token by the tag router), ``joint`` (one adapter of
rank 2r on every token: the Search-R1 LoRA baseline, same layer), ``base`` (no adapters trained: evaluation only).

Per-adapter learning rates: one layer keeps all adapters in one tensor (``lora_A`` (E, r, K)), so the optimiser
runs at the base learning rate and each adapter's slice of the update is then scaled by ``lr_e / lr``. For
Adam/AdamW (and SGD) the update, weight decay included, is linear in the learning rate, so this is exactly an
optimiser with one learning rate per adapter.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from routed_lora.fsdp import full_tensor

from .logprobs import disable_dropout, reference_logprobs, routes_for, token_logprobs
from .loss import group_advantages, grpo_loss, step_normalizer, zero_std_fraction

__all__ = ["GRPOConfig", "ConfigError", "RolloutBatch", "routed_layers", "adapter_names", "AdapterOptimizer",
           "grpo_update", "save_checkpoint", "load_checkpoint", "MetricsWriter", "Trainer"]

MODES = ("dart", "joint", "base")
STRATEGIES = ("ddp", "fsdp2")  # multi-process training: DistributedDataParallel or torch's fully_shard
LOSS_ON = ("all", "reasoning", "tool")
# Where the old log-probs of the mini-batches after the first come from (the first one's are its own first
# update forward, detached, in every mode): "rollout" = the log-probs the sampler recorded (no extra pass);
# "recompute" = a teacher-forced no-grad pass before the first optimiser step; "auto" = "rollout" when the batch
# carries them and the model is float32 (where the cached decode matches teacher forcing to <= 1e-5), else
# "recompute" (bf16/fp16 decodes drift by ~1e-2 from teacher forcing).
OLD_LOGPROBS = ("auto", "rollout", "recompute")
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class ConfigError(ValueError):
    """A :class:`GRPOConfig` value is out of range; ``field`` names the setting (the CLI flag is
    ``--`` + ``field`` with ``-`` for ``_``)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass
class GRPOConfig:
    """Hyper-parameters; the defaults are those seen in the field (DESIGN.md §3)."""

    mode: str = "dart"
    r: int = 8  # per adapter (DART); joint mode uses 2r on one adapter
    lora_alpha: float = 16.0  # scaling alpha / r; joint mode keeps the same scaling (alpha 2 * lora_alpha)
    target_modules: tuple = DEFAULT_TARGETS
    group_size: int = 8  # G: Search-R1 5, DART 16
    prompts_per_step: int = 32
    steps: int = 100
    max_turns: int = 4  # tool calls per rollout
    topk: int = 3  # passages per search
    max_new_tokens: int = 64  # per generation turn
    max_total_tokens: int = 512  # whole response incl. <information>
    temperature: float = 1.0
    lr: float = 1e-5
    lr_tool: float | None = None  # None: same as lr
    weight_decay: float = 0.0
    beta: float = 0.001  # k3 KL coefficient; 0 skips the reference pass
    eps_low: float = 0.2
    eps_high: float = 0.2
    aggregation: str = "token-mean"
    loss_on: str = "all"  # "reasoning" | "tool": the loss only on that role's sampled tokens (LEAS M_Reas / M_Tool)
    scale_rewards: bool = True  # False: Dr.GRPO advantages (no std)
    adv_eps: float = 1e-6
    format_reward: float = 0.0
    epochs: int = 1  # passes over each rollout batch
    mini_batches: int = 2  # optimiser steps per pass (the second onward use the stored old log-probs)
    old_logprobs: str = "auto"  # old log-probs of mini-batches 2+: "auto" | "rollout" | "recompute" (OLD_LOGPROBS)
    micro_batch_size: int = 64
    max_grad_norm: float = 1.0
    seed: int = 0
    save_every: int = 25
    eval_every: int = 0  # 0: evaluate only before and after
    log_every: int = 1

    def check(self) -> "GRPOConfig":
        """Refuse values that cannot give a meaningful run (:class:`ConfigError`, a ``ValueError`` naming the
        field): non-finite numbers (``nan`` passes every ``<=`` test, so each bound is written ``not (v > 0)``),
        counts out of range, unknown choices."""
        if self.mode not in MODES:
            raise ConfigError("mode", f"expected one of {MODES}, got {self.mode!r}")
        from .loss import AGGREGATIONS

        if self.aggregation not in AGGREGATIONS:
            raise ConfigError("aggregation", f"expected one of {AGGREGATIONS}, got {self.aggregation!r}")
        if not _is_int(self.group_size) or self.group_size < 2:
            raise ConfigError("group_size", f"GRPO needs at least 2 rollouts per prompt, got {self.group_size!r}")
        # integers: (name, smallest allowed)
        for name, low in (("r", 1), ("prompts_per_step", 1), ("steps", 1), ("max_turns", 0), ("topk", 1),
                          ("max_new_tokens", 1), ("max_total_tokens", 1), ("epochs", 1), ("mini_batches", 1),
                          ("micro_batch_size", 1), ("save_every", 0), ("eval_every", 0), ("log_every", 1)):
            v = getattr(self, name)
            if not _is_int(v) or v < low:
                raise ConfigError(name, f"expected an integer >= {low}, got {v!r}")
        # floats: (name, must be > 0 (True) or >= 0 (False))
        for name, strict in (("lr", True), ("temperature", True), ("lora_alpha", True), ("max_grad_norm", True),
                             ("adv_eps", True), ("weight_decay", False), ("beta", False), ("eps_low", False),
                             ("eps_high", False)):
            v = getattr(self, name)
            if not _is_finite(v) or not (v > 0 if strict else v >= 0):
                raise ConfigError(name, f"expected a finite number {'>' if strict else '>='} 0, got {v!r}")
        if self.lr_tool is not None and (not _is_finite(self.lr_tool) or not self.lr_tool >= 0):
            raise ConfigError("lr_tool", f"expected a finite number >= 0 (or None: same as lr), got {self.lr_tool!r}")
        if not _is_finite(self.format_reward):
            raise ConfigError("format_reward", f"expected a finite number, got {self.format_reward!r}")
        if not _is_int(self.seed):
            raise ConfigError("seed", f"expected an integer, got {self.seed!r}")
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise ConfigError("target_modules", f"expected non-empty module names, got {self.target_modules!r}")
        if self.loss_on not in LOSS_ON:
            raise ConfigError("loss_on", f"expected one of {LOSS_ON}, got {self.loss_on!r}")
        if self.old_logprobs not in OLD_LOGPROBS:
            raise ConfigError("old_logprobs", f"expected one of {OLD_LOGPROBS}, got {self.old_logprobs!r}")
        return self

    def adapters(self) -> tuple[str, ...]:
        return ("joint",) if self.mode == "joint" else ("reasoning", "tool")

    def adapter_lrs(self) -> dict[str, float]:
        if self.mode == "joint":
            return {"joint": self.lr}
        return {"reasoning": self.lr, "tool": self.lr if self.lr_tool is None else self.lr_tool}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "GRPOConfig":
        names = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        if "target_modules" in d:
            d["target_modules"] = tuple(d["target_modules"])
        return cls(**d)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class RolloutBatch:
    """A batch of finished rollouts, padded. Position p of ``input_ids`` predicts token p+1; ``loss_mask``
    (B, L-1) is aligned with those targets: 1 where the target was sampled by the policy (not the prompt, not a
    spliced ``<information>`` id, not padding)."""

    input_ids: torch.Tensor  # (B, L) long
    attention_mask: torch.Tensor  # (B, L) long
    loss_mask: torch.Tensor  # (B, L-1) bool
    rewards: torch.Tensor  # (B,) float
    group_ids: torch.Tensor  # (B,) long
    em: torch.Tensor  # (B,) float
    tool_calls: torch.Tensor  # (B,) float
    response_len: torch.Tensor  # (B,) float, tokens from the first response token to the end (incl. info)
    texts: list = field(default_factory=list)
    rollout_logprobs: torch.Tensor | None = None  # (B, L-1) generation-time log-probs of the targets, if recorded

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def select(self, idx: Sequence[int] | slice) -> "RolloutBatch":
        if isinstance(idx, slice):
            pick = lambda t: t[idx]  # noqa: E731
            texts = self.texts[idx] if self.texts else []
        else:
            ii = torch.as_tensor(list(idx), dtype=torch.long)
            pick = lambda t: t.index_select(0, ii)  # noqa: E731
            texts = [self.texts[i] for i in idx] if self.texts else []
        return RolloutBatch(
            pick(self.input_ids), pick(self.attention_mask), pick(self.loss_mask), pick(self.rewards),
            pick(self.group_ids), pick(self.em), pick(self.tool_calls), pick(self.response_len), texts,
            None if self.rollout_logprobs is None else pick(self.rollout_logprobs),
        )


# ----------------------------------------------------------------------------------------------------------------
# adapters: per-adapter views, learning rates, gradient norms


def routed_layers(model: nn.Module) -> list:
    from routed_lora.layer import RoutedLoRALinear

    return [m for m in model.modules() if isinstance(m, RoutedLoRALinear)]


def adapter_names(model: nn.Module) -> tuple[str, ...]:
    layers = routed_layers(model)
    if not layers:
        raise ValueError("model: no RoutedLoRALinear layers (apply routed_lora.apply_routed_lora first)")
    return layers[0].adapter_names


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every trainable LoRA tensor (lora_A and lora_B of each routed layer), in module order."""
    out = []
    for layer in routed_layers(model):
        out += [layer.lora_A, layer.lora_B]
    return out


def adapter_grad_norms(model: nn.Module) -> dict[str, float]:
    """L2 norm of each adapter's gradient over all layers (slices e of lora_A and lora_B)."""
    from routed_lora.fsdp import is_dtensor, local_part

    names = adapter_names(model)
    sq = [0.0] * len(names)
    sharded = False
    for layer in routed_layers(model):
        for p in (layer.lora_A, layer.lora_B):
            if p.grad is None:
                continue
            sharded = sharded or is_dtensor(p.grad)
            g, offset = local_part(p.grad.detach())  # FSDP2: this rank's adapter rows, summed over ranks below
            g = g.double()
            for i in range(g.shape[0]):
                sq[offset[0] + i] += float((g[i] * g[i]).sum())
    if sharded:
        sq = all_reduce_sum(sq)
    return {n: math.sqrt(s) for n, s in zip(names, sq)}


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA tensors by module name (exact copies; for checkpoints and tests)."""
    from routed_lora.fsdp import full_tensor

    out = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "lora_A") and hasattr(mod, "adapter_names"):
            # FSDP2: the full tensors (an all-gather; every rank calls this)
            out[f"{name}.lora_A"] = full_tensor(mod.lora_A.detach()).clone()
            out[f"{name}.lora_B"] = full_tensor(mod.lora_B.detach()).clone()
    return out


@torch.no_grad()
def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    from routed_lora.fsdp import copy_full_into

    mods = dict(model.named_modules())
    for key, value in state.items():
        name, attr = key.rsplit(".", 1)
        copy_full_into(getattr(mods[name], attr), value)  # plain, or this rank's FSDP2 shard


class AdapterOptimizer:
    """AdamW over the LoRA tensors with one learning rate per adapter: ``routed_lora.trainable_parameters`` and
    ``routed_lora.set_adapter_lr`` (the optimiser runs at the largest rate and each adapter's slice of the
    update is scaled by ``lr_e / lr_max``; exact for AdamW, see the module doc)."""

    def __init__(self, model: nn.Module, lrs: dict[str, float], *, weight_decay: float = 0.0,
                 betas=(0.9, 0.999), eps: float = 1e-8):
        import routed_lora as rl

        self.names = adapter_names(model)
        missing = [n for n in self.names if n not in lrs]
        if missing:
            raise ValueError(f"lrs: no learning rate for adapters {missing} (have {sorted(lrs)})")
        groups = rl.trainable_parameters(model)
        self.params = [p for g in groups for p in g["params"]]
        self.base_lr = max(lrs[n] for n in self.names)
        if self.base_lr <= 0:
            raise ValueError(f"lrs: at least one adapter needs a learning rate > 0, got {lrs}")
        self.optimizer = torch.optim.AdamW(groups, lr=self.base_lr, betas=betas, eps=eps,
                                           weight_decay=weight_decay)
        rl.set_adapter_lr(self.optimizer, {n: lrs[n] for n in self.names})

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        self.optimizer.step()

    def state_dict(self) -> dict:
        """The optimiser state with full tensors: under FSDP2 each sharded state tensor (exp_avg, ...) is
        gathered (every rank calls this), so a checkpoint has one format whatever the strategy and number of
        processes."""
        from routed_lora.fsdp import full_tensor, is_dtensor

        sd = self.optimizer.state_dict()
        sd["state"] = {i: {k: full_tensor(v) if is_dtensor(v) else v for k, v in st.items()}
                       for i, st in sd["state"].items()}
        return {"optimizer": sd}

    def load_state_dict(self, state: dict) -> None:
        """Inverse of :meth:`state_dict`: full state tensors are cut to this rank's shard of their parameter."""
        from routed_lora.fsdp import is_dtensor, local_slice

        sd = dict(state["optimizer"])
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if any(is_dtensor(p) for p in params):
            from torch.distributed.tensor import DTensor

            local = {}
            for i, st in sd["state"].items():
                p = params[int(i)]
                local[i] = {}
                for k, v in st.items():
                    if is_dtensor(p) and isinstance(v, torch.Tensor) and tuple(v.shape) == tuple(p.shape):
                        v = DTensor.from_local(local_slice(v, p).to(p.device).clone(), p.device_mesh, p.placements,
                                               shape=p.shape, stride=p.stride(), run_check=False)
                    local[i][k] = v
            sd["state"] = local
        self.optimizer.load_state_dict(sd)


# ----------------------------------------------------------------------------------------------------------------
# distributed helpers (no-ops without torch.distributed)


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def world_info() -> tuple[int, int]:
    dist = _dist()
    return (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)


def all_reduce_sum(values: list[float]) -> list[float]:
    dist = _dist()
    if dist is None:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def _broadcast_adapters(model: nn.Module) -> None:
    """Copy rank 0's adapter tensors to every rank (before sharding)."""
    dist = _dist()
    if dist is None:
        return
    with torch.no_grad():
        for p in lora_parameters(model):
            dist.broadcast(p.data, src=0)


# ----------------------------------------------------------------------------------------------------------------
# the update


def _micro_batches(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def mini_batch_rows(group_ids: torch.Tensor, mini_batches: int) -> list[list[int]]:
    """Rows of each mini-batch (optimiser step), by the rule that makes an update independent of the number
    of processes: question ``q`` of the step (its group id, numbered over the whole step: the trainer gives
    rank r's questions the ids r * Q/N ... (r+1) * Q/N - 1) goes to mini-batch ``q mod mini_batches`` with all
    its G rollouts. One process with the whole batch and N processes with Q/N questions each build the same
    global mini-batches when ``(Q / N) % mini_batches == 0`` (the trainer checks it); the loss of a mini-batch
    is normalised over all its tokens on all ranks, so the update is the same up to float summation order.
    Empty mini-batches (fewer questions than mini_batches) are skipped."""
    g = group_ids.long().tolist()
    out = [[i for i, q in enumerate(g) if q % mini_batches == k] for k in range(mini_batches)]
    return [rows for rows in out if rows]


def _check_same_plan(plan, world: int) -> None:
    """Every rank must run the same number of mini- and micro-batches (each forward and backward is a
    collective under DDP and FSDP2): a clear error on every rank instead of a hang or a silent mismatch."""
    dist = _dist()
    if world <= 1 or dist is None:
        return
    mine = [len(m) for m in plan]
    every = [None] * world
    dist.all_gather_object(every, mine)
    if any(e != every[0] for e in every):
        raise ValueError(
            f"grpo_update: the ranks split their rollouts into different mini-/micro-batches (micro-batches per "
            f"mini-batch on each rank: {every}); give every rank the same number of questions and rollouts, "
            "with (questions per rank) % mini_batches == 0"
        )


class _Prepared:
    def __init__(self, batch, routes, sl):
        ids, att, lm = batch.input_ids[sl], batch.attention_mask[sl], batch.loss_mask[sl]
        rt = routes[sl]
        real = att.bool().any(0)
        idx = real.nonzero().flatten()
        lo, hi = int(idx[0]), int(idx[-1]) + 1
        self.ids, self.att, self.mask, self.routes = ids[:, lo:hi], att[:, lo:hi], lm[:, lo:hi - 1], rt[:, lo:hi]
        self.rows = sl
        self.rollout = None if batch.rollout_logprobs is None else batch.rollout_logprobs[sl][:, lo:hi - 1]
        self.old = None
        self.old_source = "forward"  # or "rollout" (old_logprobs)
        self.ref = None
        self.adv = None


_FORCE_OLD_PASS = False  # tests: run the old-policy pass for every mini-batch (the first one's is redundant)


def old_logprobs_from_rollout(cfg, model: nn.Module, batch: "RolloutBatch") -> bool:
    """Whether the mini-batches after the first take their old log-probs from the rollout (see OLD_LOGPROBS)."""
    if cfg.old_logprobs == "recompute" or _FORCE_OLD_PASS:
        return False
    have = batch.rollout_logprobs is not None
    if cfg.old_logprobs == "rollout":
        if not have:
            raise ValueError("old_logprobs='rollout': this rollout batch carries no rollout log-probs "
                             "(RolloutBatch.rollout_logprobs is None); sample with return_logprobs=True or use "
                             "old_logprobs='recompute'")
        return True
    return have and all(p.dtype == torch.float32 for p in model.parameters() if p.is_floating_point())


def _route_counts(routes: torch.Tensor, loss_mask: torch.Tensor, names) -> dict[str, float]:
    """Tokens per route among the sampled tokens (route of the position that produced each token)."""
    r = routes[:, :-1][loss_mask.bool()]
    out = {f"tokens/{n}": float((r == e).sum()) for e, n in enumerate(names)}
    out["tokens/backbone"] = float((r == -1).sum())
    return out


def grpo_update(
    model: nn.Module,
    ddp_model: nn.Module,
    optimizer: AdapterOptimizer,
    batch: RolloutBatch,
    routes: torch.Tensor,
    cfg: GRPOConfig,
) -> dict:
    """Steps 2-4 of the module doc on one rollout batch; returns the step's metrics (summed over ranks)."""
    rank, world = world_info()
    n = len(batch)
    adv = group_advantages(batch.rewards, batch.group_ids, eps=cfg.adv_eps, scale_rewards=cfg.scale_rewards)
    max_len = cfg.max_total_tokens

    # a fixed split into mini-batches (optimiser steps) and micro-batches, used by every pass. Within a
    # mini-batch the rows are sorted by length before the micro-batch split: each micro-batch is trimmed to its
    # longest row, so similar lengths waste less padding (the step's loss is a sum over rows: order-free)
    lengths = batch.attention_mask.sum(1).tolist()
    plan = []  # list of mini-batches, each a list of _Prepared micro-batches
    for rows in mini_batch_rows(batch.group_ids, cfg.mini_batches):
        micro = []
        order = sorted(rows, key=lambda i: (lengths[i], i))
        for s in _micro_batches(len(order), cfg.micro_batch_size):
            sel = order[s]
            sl = slice(sel[0], sel[-1] + 1) if sel == list(range(sel[0], sel[-1] + 1)) else torch.tensor(sel)
            p = _Prepared(batch, routes, sl)
            p.adv = adv[sl]
            micro.append(p)
        plan.append(micro)
    _check_same_plan(plan, world)

    # old (and reference) log-probs: same micro-batches, same routes, no grad. The first mini-batch is updated
    # before any optimiser step, so its old policy is the current one: its first update forward (detached) gives
    # its old log-probs, the same values bit for bit, and the separate pass runs only for the later mini-batches
    # (none with one mini-batch and one epoch), or not at all when their old log-probs come from the rollout
    # (old_logprobs, module doc). The ratio of the first mini-batch's first update stays exactly 1.
    skip_first = not _FORCE_OLD_PASS
    from_rollout = old_logprobs_from_rollout(cfg, model, batch)
    with torch.no_grad():
        for mi, micro in enumerate(plan):
            for p in micro:
                if skip_first and mi == 0:
                    pass  # set from the first update forward below
                elif from_rollout:
                    # the sampler's log-probs at the sampled tokens; 0 elsewhere (never read by the loss, and
                    # finite whatever a caller left there)
                    p.old = torch.where(p.mask.bool(), p.rollout, torch.zeros((), dtype=p.rollout.dtype))
                    p.old_source = "rollout"
                else:
                    p.old, _ = token_logprobs(model, p.ids, p.att, routes=p.routes, temperature=cfg.temperature)
                if cfg.beta > 0:
                    p.ref = reference_logprobs(model, p.ids, p.att, temperature=cfg.temperature)

    sums = dict(loss=0.0, tokens=0.0, kl=0.0, clip=0.0, ratio=0.0, entropy=0.0)
    ratio_max, first_ratio_max_dev = 1.0, None
    gnorms, pre_clip = [], []
    for _epoch in range(cfg.epochs):
        for micro in plan:
            norm_local = step_normalizer([p.mask for p in micro], cfg.aggregation, max_len=max_len)
            norm = all_reduce_sum([norm_local])[0]
            # DDP averages gradients over ranks: scale so that the average is the step-wide loss
            norm = norm / world
            optimizer.zero_grad()
            for i, p in enumerate(micro):
                sync = i == len(micro) - 1
                with _grad_sync(ddp_model, sync):
                    logp, ent = token_logprobs(ddp_model, p.ids, p.att, routes=p.routes,
                                               temperature=cfg.temperature, with_entropy=True)
                    if p.old is None:  # the first mini-batch, first epoch: the current policy is the old one
                        p.old = logp.detach()
                    out = grpo_loss(
                        logp, p.old, p.adv, p.mask, ref_logp=p.ref, beta=cfg.beta, eps_low=cfg.eps_low,
                        eps_high=cfg.eps_high, aggregation=cfg.aggregation, normalizer=norm, max_len=max_len,
                        entropy=ent,
                    )
                    out.loss.backward()
                if first_ratio_max_dev is None:
                    m = p.mask.bool()
                    first_ratio_max_dev = float((logp.detach() - p.old)[m].abs().max()) if m.any() else 0.0
                sums["loss"] += float(out.loss.detach()) / world  # summed over ranks below: the step's loss
                sums["tokens"] += out.tokens
                sums["kl"] += out.kl_sum
                sums["clip"] += out.clip_sum
                sums["ratio"] += out.ratio_sum
                sums["entropy"] += out.entropy_sum
                ratio_max = max(ratio_max, out.ratio_max)
            gn = adapter_grad_norms(model)
            gnorms.append(gn)
            total = torch.nn.utils.clip_grad_norm_(optimizer.params, cfg.max_grad_norm)
            pre_clip.append(float(full_tensor(total)))  # FSDP2: a DTensor norm over every rank's shards
            optimizer.step()
    optimizer.zero_grad()
    # generation-time vs teacher-forced log-probs of the sampled tokens: same routes, positions and temperature
    # give equal values up to float rounding (the KV-cache path sums in another order)
    diffs = [float((p.old - p.rollout)[p.mask.bool()].abs().max()) for micro in plan for p in micro
             if p.rollout is not None and p.old_source != "rollout" and p.mask.any()]
    gen_diff = max(diffs) if diffs else None

    # metrics, summed over ranks
    rc = _route_counts(routes, batch.loss_mask, adapter_names(model))
    local = [
        sums["tokens"], sums["kl"], sums["clip"], sums["ratio"], sums["entropy"],
        float(n), float(batch.rewards.sum()), float((batch.rewards ** 2).sum()), float(batch.em.sum()),
        float(batch.tool_calls.sum()), float(batch.response_len.sum()),
        zero_std_fraction(batch.rewards, batch.group_ids) * float(torch.unique(batch.group_ids).numel()),
        float(torch.unique(batch.group_ids).numel()), sums["loss"],
    ] + list(rc.values())
    tot = all_reduce_sum(local)
    (tokens, kl, clip, ratio, entropy, nroll, rsum, r2sum, emsum, tcs, rls, zgroups, ngroups, loss_sum) = tot[:14]
    rmean = rsum / nroll
    upd = cfg.epochs * len(plan)
    metrics = {
        "reward_mean": rmean,
        "reward_std": math.sqrt(max(r2sum / nroll - rmean * rmean, 0.0)),
        "em": emsum / nroll,
        "zero_std_frac": zgroups / max(ngroups, 1.0),
        "clip_frac": clip / max(tokens, 1.0),
        "ratio_mean": ratio / max(tokens, 1.0),
        "ratio_max": ratio_max,
        "first_update_max_abs_logratio": first_ratio_max_dev,
        "entropy": entropy / max(tokens, 1.0),
        "loss": loss_sum / upd,  # mean over the optimiser steps of this batch
        "response_len": rls / nroll,
        "tool_calls": tcs / nroll,
        "rollouts": nroll,
        "updates": upd,
        "grad_norm": sum(pre_clip) / len(pre_clip),
    }
    if cfg.beta > 0:  # the reference pass is skipped when beta = 0: no KL to report
        metrics["kl"] = kl / max(tokens, 1.0)
    if gen_diff is not None:
        metrics["rollout_vs_teacher_forced_max_abs_logprob_diff"] = gen_diff
    for key, v in zip(rc.keys(), tot[14:]):
        metrics[key] = v
    for name in gnorms[0]:
        metrics[f"grad_norm/{name}"] = sum(g[name] for g in gnorms) / len(gnorms)
    return metrics


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _grad_sync(ddp_model, sync: bool):
    """Gradient accumulation without communication on all but the last micro-batch: DDP's ``no_sync``, or
    FSDP2's ``set_requires_gradient_sync``."""
    if sync:
        if hasattr(ddp_model, "set_requires_gradient_sync"):
            ddp_model.set_requires_gradient_sync(True)
        return _null()
    if hasattr(ddp_model, "no_sync"):
        return ddp_model.no_sync()
    if hasattr(ddp_model, "set_requires_gradient_sync"):
        ddp_model.set_requires_gradient_sync(False)
    return _null()


# ----------------------------------------------------------------------------------------------------------------
# checkpoints and metrics


def _atomic_torch_save(obj, path: Path) -> None:
    from routed_lora.state import fsync_dir, tmp_name

    tmp = tmp_name(path)  # checkpoint.pt.tmp<pid>: removed at the next start if a kill leaves it
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def rng_state() -> dict:
    import numpy as np

    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_state(state: dict) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def save_checkpoint(out: Path, *, model, optimizer: AdapterOptimizer, step: int, cfg: GRPOConfig,
                    extra: dict | None = None) -> Path:
    """Write ``out/checkpoint.pt`` atomically (temp file, fsync, rename): adapters, optimizer, RNG states
    (this rank's), step and config. Under DDP only rank 0 writes (adapters are identical on every rank); every
    rank's RNG state is stored."""
    rank, world = world_info()
    rng = rng_state()
    dist = _dist()
    if dist is not None:
        gathered = [None] * world
        dist.all_gather_object(gathered, rng)
        rngs = gathered
    else:
        rngs = [rng]
    path = Path(out) / "checkpoint.pt"
    adapters, opt_state = adapter_state(model), optimizer.state_dict()  # collectives under FSDP2: every rank
    if rank == 0:
        state = {
            "step": step,
            "adapters": adapters,
            "optimizer": opt_state,
            "rng": rngs,
            "config": cfg.to_dict(),
            "extra": extra or {},
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_torch_save(state, path)
    if dist is not None:
        dist.barrier()
    return path


def load_checkpoint(path: Path, *, model, optimizer: AdapterOptimizer) -> dict:
    """Restore adapters, optimizer and this rank's RNG state; returns the checkpoint dict (``step`` ...)."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    state = torch.load(path, map_location="cpu", weights_only=False)
    load_adapter_state(model, state["adapters"])
    optimizer.load_state_dict(state["optimizer"])
    rank, world = world_info()
    rngs = state["rng"]
    if len(rngs) != world:
        raise ValueError(f"{path}: written by {len(rngs)} ranks, resuming with {world}")
    set_rng_state(rngs[rank])
    return state


class MetricsWriter:
    """Append JSON rows to ``metrics.jsonl`` (rank 0 only), each with flush and fsync (:func:`routed_lora.state.
    append_line`): a kill loses at most the row being written. On resume, rows after the resumed step are dropped
    and so is a truncated last line (with a warning), and the kept rows are rewritten atomically; a fresh run
    (``resume_step=None``) starts a new file."""

    def __init__(self, path: Path, *, resume_step: int | None = None, enabled: bool = True):
        from routed_lora.state import atomic_write_text, read_jsonl_rows

        self.path = Path(path)
        self.enabled = enabled
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            rows, dropped = read_jsonl_rows(self.path)
            keep = [r for r in rows if r.get("step", 0) <= resume_step]
            torn = not self.path.read_bytes().endswith(b"\n")  # a last row without its newline
            if dropped or torn or len(keep) != len(rows):
                atomic_write_text(self.path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in keep))
        elif resume_step is None and self.path.exists():
            self.path.unlink()

    def write(self, row: dict) -> None:
        from routed_lora.state import append_line

        if not self.enabled:
            return
        append_line(self.path, json.dumps(row, sort_keys=True))


# ----------------------------------------------------------------------------------------------------------------
# building the policy, the data order, the loop


def load_model_and_tokenizer(path: str | Path, *, dtype=None):
    """A causal LM and its tokenizer from a local folder (no network).

    transformers 5's ``AutoTokenizer`` builds the *model family's* tokenizer class (e.g. ``Qwen2Tokenizer``, a
    byte-level BPE pipeline) even for a folder whose ``tokenizer_config.json`` says ``TokenizersBackend`` or
    ``PreTrainedTokenizerFast`` (a word-level ``tokenizer.json``, as the built-in world writes): encoding and
    decoding then silently go wrong. Such folders are loaded with ``PreTrainedTokenizerFast`` instead."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    from routed_lora.pretrained import resolve_model  # a registered name (smollm2-135m) -> its cached folder

    path = Path(resolve_model(path))
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: not a model folder (no config.json)")
    cls = None
    cfg_file = path / "tokenizer_config.json"
    if cfg_file.exists():
        cls = json.loads(cfg_file.read_text()).get("tokenizer_class")
    if cls in ("TokenizersBackend", "PreTrainedTokenizerFast") and (path / "tokenizer.json").exists():
        tok = PreTrainedTokenizerFast.from_pretrained(str(path))
    else:
        tok = AutoTokenizer.from_pretrained(str(path))
    # use_kernels=False: our models need no hub kernels, and transformers >= 5.25 kernelizes by default
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or torch.float32, use_kernels=False)
    return model, tok


def build_policy(model, tokenizer, cfg: GRPOConfig):
    """Patch ``model`` in place for ``cfg.mode`` and attach the router (so ``generate`` routes by itself).

    dart: adapters (reasoning, tool), rank r, the tag router (tool inside ``<search>`` ... ``</search>``);
    joint: one adapter ``joint`` of rank 2r and alpha 2 * lora_alpha (same scaling) on every
    token; base: the dart layout with its zero-initialised B (identical to the backbone), never trained.
    Returns ``(model, router)``."""
    import routed_lora as rl

    disable_dropout(model)
    if cfg.mode == "joint":
        router = rl.TagRouter(tokenizer, spans={"joint": ("<search>", "</search>")}, default="joint")
        rl.apply_routed_lora(model, target_modules=cfg.target_modules, r=2 * cfg.r, lora_alpha=2 * cfg.lora_alpha,
                             adapters=("joint",), router=router)
    else:
        router = rl.TagRouter(tokenizer, spans={"tool": ("<search>", "</search>")}, default="reasoning")
        rl.apply_routed_lora(model, target_modules=cfg.target_modules, r=cfg.r, lora_alpha=cfg.lora_alpha,
                             adapters=("reasoning", "tool"), router=router)
    return model, router


def role_mask(tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor, role: str) -> torch.Tensor:
    """(B, L-1) bool, aligned with the targets: True where the target token belongs to ``role`` ("tool": written
    by a position inside ``<search>`` ... ``</search>``, i.e. the query and the closing tag, DESIGN.md §2;
    "reasoning": every other token). The roles come from the DART tag router whatever the adapter layout, so a
    joint adapter can be trained with the loss on one role only (``--loss-on``, LEAS's M_Reas / M_Tool)."""
    import routed_lora as rl

    router = rl.TagRouter(tokenizer, spans={"tool": ("<search>", "</search>")}, default="reasoning",
                          adapters=("reasoning", "tool"))
    roles = router(input_ids, attention_mask)[:, :-1]
    return roles == (1 if role == "tool" else 0)


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
    (:func:`build_policy`); ``router`` is the model's router (used for the teacher-forced routes)."""

    def __init__(self, cfg: GRPOConfig, model, tokenizer, router, retriever, train_rows: Sequence[dict], *,
                 out: str | Path, eval_rows: Sequence[dict] | None = None, eval_samples: int | None = None,
                 prompt_template: str | None = None, progress: bool = True,
                 reward_fn: Callable[[str, list], float] | None = None, strategy: str = "ddp"):
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
        from routed_lora.env.data import make_prompt
        from routed_lora.env.reward import compute_score, exact_match, extract_answer
        from routed_lora.env.rollout import collate, generate_rollouts

        G = self.cfg.group_size
        prompts = [make_prompt(r["question"], self.template) for r in rows for _ in range(G)]
        plen = max(len(self.tok(p)["input_ids"]) for p in prompts)
        t0 = time.perf_counter()
        self.model.eval()
        from routed_lora.fsdp import full_params

        meters: dict = {}
        with full_params(self.model):  # FSDP2: ranks generate different numbers of steps, so no collectives
            rolls = generate_rollouts(self.model, self.tok, prompts, self.retriever, max_turns=self.cfg.max_turns,
                                      max_new_tokens=self.cfg.max_new_tokens,
                                      max_length=plen + self.cfg.max_total_tokens, topk=self.cfg.topk,
                                      do_sample=True, temperature=self.cfg.temperature, return_logprobs=True,
                                      meters=meters)
        t_roll = time.perf_counter() - t0
        golds = [r["golden_answers"] for r in rows for _ in range(G)]
        score = self.reward_fn or (lambda text, g: compute_score(text, g, format_score=self.cfg.format_reward))
        rewards = torch.tensor([float(score(ro.text, g)) for ro, g in zip(rolls, golds)], dtype=torch.float32)
        em = torch.tensor([exact_match(extract_answer(ro.text), g) for ro, g in zip(rolls, golds)])
        c = collate(rolls, self.pad_id)
        ids, att = c["input_ids"], c["attention_mask"]
        loss_mask = c["loss_mask"][:, 1:].bool()
        if self.cfg.loss_on != "all":
            loss_mask = loss_mask & role_mask(self.tok, ids, att, self.cfg.loss_on)
        batch = RolloutBatch(
            input_ids=ids, attention_mask=att, loss_mask=loss_mask, rewards=rewards,
            group_ids=torch.arange(len(rows)).repeat_interleave(G) + group_offset, em=em.float(),
            tool_calls=torch.tensor([float(ro.num_tool_calls) for ro in rolls]),
            response_len=torch.tensor([float(len(ro.completion_ids)) for ro in rolls]),
            texts=[ro.text for ro in rolls],
            rollout_logprobs=c["old_logprobs"][:, 1:] if "old_logprobs" in c else None,
        )
        routes = routes_for(ids, att, joint_adapter=0) if self.cfg.mode == "joint" else \
            routes_for(ids, att, router=self.router)
        info = {"rollout_seconds": t_roll, "finish_answer": sum(ro.finish_reason == "answer" for ro in rolls) / len(rolls),
                "prefill_tokens": meters.get("prefill_tokens", 0), "decode_tokens": meters.get("decode_tokens", 0)}
        return batch, routes, info

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
