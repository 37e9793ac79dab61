"""What the GRPO loop asks of a rollout engine, and what a rollout batch holds.

Each step the loop (:class:`routed_lora.grpo.trainer.Trainer`) makes one call, ``engine.collect(rows,
group_offset)``, and trains on what comes back. The HF engine (:class:`routed_lora.grpo.hf_rollout.HFRollout`:
the agent loop of :mod:`routed_lora.env.rollout` run on the trained model itself) is the default; another engine
(e.g. vLLM) implements the same :class:`RolloutEngine` and is passed as ``Trainer(..., rollout=engine)``, with no
branch in the loop. An engine that samples from its own copy of the policy brings that copy up to date with the
trained adapters itself, at the start of ``collect``.

Must not import an engine (HF, vLLM) or anything that trains: the types only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence, runtime_checkable

import torch

__all__ = ["RolloutBatch", "RolloutEngine"]


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


@runtime_checkable
class RolloutEngine(Protocol):
    """A rollout engine, as the loop sees it."""

    def collect(self, rows: Sequence[dict], group_offset: int = 0) -> tuple[RolloutBatch, torch.Tensor, dict]:
        """Sample ``group_size`` rollouts of each question of ``rows`` (dicts with ``question`` and
        ``golden_answers``) with the current policy, reward them, and return ``(batch, routes, info)``:

        - ``batch``: a :class:`RolloutBatch`, question ``i``'s rollouts with group id ``group_offset + i``
          (``rollout_logprobs`` set if the engine recorded the sampled tokens' log-probs);
        - ``routes``: (B, L) long, the adapter of every position for the teacher-forced passes (the policy's
          router; adapter 0 everywhere in joint mode), as :func:`routed_lora.grpo.logprobs.routes_for` gives;
        - ``info``: ``rollout_seconds``, ``finish_answer`` (the fraction of rollouts that ended with an answer),
          ``prefill_tokens`` and ``decode_tokens``.
        """
        ...
