"""The GRPO run's settings: :class:`GRPOConfig`, its checks (:class:`ConfigError`) and the allowed choices.

Modes: ``dart`` (adapters ``reasoning`` and ``tool``, routed per token by the tag router), ``joint`` (one adapter of
rank 2r on every token: the Search-R1 LoRA baseline, same layer), ``base`` (no adapters trained: evaluation only).

Must not import the model, the environment or torch.distributed: a config is built and checked (CLI, resume
checks) before anything is loaded.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from routed_lora.targets import DEFAULT_TARGET_MODULES

MODES = ("dart", "joint", "base")
STRATEGIES = ("ddp", "fsdp2")  # multi-process training: DistributedDataParallel or torch's fully_shard
LOSS_ON = ("all", "reasoning", "tool")
# Where the old log-probs of the mini-batches after the first come from (the first one's are its own first
# update forward, detached, in every mode): "rollout" = the log-probs the sampler recorded (no extra pass);
# "recompute" = a teacher-forced no-grad pass before the first optimiser step; "auto" = "rollout" when the batch
# carries them and the model is float32 (where the cached decode matches teacher forcing to <= 1e-5), else
# "recompute" (bf16/fp16 decodes drift by ~1e-2 from teacher forcing).
OLD_LOGPROBS = ("auto", "rollout", "recompute")
DEFAULT_TARGETS = DEFAULT_TARGET_MODULES  # one source: routed_lora.targets (hf's default, fused ones added there)


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
