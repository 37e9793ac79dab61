"""The GRPO objective: group-normalised advantages, the clipped per-token ratio, the k3 KL and its aggregation.

Notation: a batch holds rollouts i = 1..n, each with a scalar reward r_i and a group id g(i) shared by the G
rollouts of one prompt. Rollout i has completion tokens t = 1..T_i (``mask`` marks them; padding and retrieved
``<information>`` tokens are 0). ``logp`` is log pi_theta(o_it | o_i,<t) at the sampling temperature,
``old_logp`` the same under the policy that sampled (stored before the first update), ``ref_logp`` the same
under the reference policy (the backbone with adapters off).

Advantages (one per rollout, shared by all its tokens)::

    A_i = (r_i - mean_{j in g(i)} r_j) / (std_{j in g(i)} r_j + eps)          (scale_rewards=True)
    A_i =  r_i - mean_{j in g(i)} r_j                                          (scale_rewards=False, Dr.GRPO)

``std`` is the unbiased standard deviation (as in TRL and verl); a group of one rollout has advantage 0.

Per-token loss, with rho_it = exp(logp_it - old_logp_it)::

    l_it = -min(rho_it A_i, clip(rho_it, 1 - eps_low, 1 + eps_high) A_i) + beta * k3_it
    k3_it = exp(x_it) - x_it - 1,   x_it = ref_logp_it - logp_it              (>= 0, unbiased for KL(pi||ref))

Aggregation over the whole optimiser step S (all micro-batches, all ranks), m_it the mask:

    token-mean            L = sum_{i in S} sum_t m_it l_it / sum_{i in S} sum_t m_it          (DAPO, default)
    seq-mean-token-mean   L = (1/|S|) sum_{i in S} (sum_t m_it l_it / sum_t m_it)             (original GRPO)
    dr-grpo               L = sum_{i in S} sum_t m_it l_it / (|S| * L_max)                    (Dr.GRPO)

A micro-batch contributes its share of the sum divided by the step's normaliser, so summing the
micro-batch losses (gradient accumulation) gives exactly L whatever the micro-batch split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "AGGREGATIONS",
    "group_advantages",
    "k3_kl",
    "clipped_surrogate",
    "aggregate",
    "step_normalizer",
    "grpo_loss",
    "LossOutput",
]

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "dr-grpo")


def group_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, *, eps: float = 1e-6, scale_rewards: bool = True
) -> torch.Tensor:
    """A_i = (r_i - mean_g) / (std_g + eps) over the rollouts that share ``group_ids[i]`` (see module doc).

    ``rewards`` (n,) float, ``group_ids`` (n,) integer (any values; groups may have different sizes).
    Returns (n,) float32. A group whose rewards are all equal gets advantage 0 (no signal).
    """
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            f"rewards and group_ids: expected two 1-d tensors of the same length, got "
            f"{tuple(rewards.shape)} and {tuple(group_ids.shape)}"
        )
    r = rewards.to(torch.float64)
    _, inv = torch.unique(group_ids, return_inverse=True)
    ng = int(inv.max()) + 1 if inv.numel() else 0
    count = torch.zeros(ng, dtype=torch.float64).index_add_(0, inv, torch.ones_like(r))
    mean = torch.zeros(ng, dtype=torch.float64).index_add_(0, inv, r) / count
    dev = r - mean[inv]
    ss = torch.zeros(ng, dtype=torch.float64).index_add_(0, inv, dev * dev)
    std = torch.sqrt(ss / (count - 1).clamp_min(1.0))
    flat = (std[inv] == 0) | (count[inv] < 2)  # all rewards equal: exactly zero, also with eps = 0
    adv = dev / (std[inv] + eps) if scale_rewards else dev
    adv = torch.where(flat, torch.zeros_like(adv), adv)
    return adv.to(torch.float32)


def zero_std_fraction(rewards: torch.Tensor, group_ids: torch.Tensor) -> float:
    """Fraction of groups whose rewards are all equal (they carry no learning signal)."""
    _, inv = torch.unique(group_ids, return_inverse=True)
    ng = int(inv.max()) + 1 if inv.numel() else 0
    if ng == 0:
        return 0.0
    r = rewards.to(torch.float64)
    lo = torch.full((ng,), float("inf"), dtype=torch.float64).scatter_reduce(0, inv, r, "amin")
    hi = torch.full((ng,), float("-inf"), dtype=torch.float64).scatter_reduce(0, inv, r, "amax")
    return float((hi == lo).double().mean())


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 = exp(x) - x - 1 with x = ref_logp - logp: a non-negative, unbiased per-token estimate of
    KL(pi_theta || pi_ref) for tokens sampled from pi_theta (Schulman's k3)."""
    x = ref_logp - logp
    return torch.expm1(x) - x


def clipped_surrogate(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token -min(rho A, clip(rho, 1-eps_low, 1+eps_high) A), rho = exp(logp - old_logp).

    ``advantages`` is (B,) (broadcast over tokens) or (B, T). Returns (loss, ratio, clipped) where ``clipped``
    marks the tokens whose gradient the clip removed: rho > 1+eps_high with A > 0, or rho < 1-eps_low with A < 0.
    """
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    advantages = advantages.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    clipped_ratio = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = -torch.minimum(ratio * advantages, clipped_ratio * advantages)
    clipped = ((ratio > 1.0 + eps_high) & (advantages > 0)) | ((ratio < 1.0 - eps_low) & (advantages < 0))
    return loss, ratio, clipped


def step_normalizer(
    masks: list[torch.Tensor] | torch.Tensor, aggregation: str = "token-mean", *, max_len: int | None = None
) -> float:
    """The normaliser of one optimiser step from the masks of all its micro-batches (one rank; sum over ranks
    yourself for DDP): tokens for ``token-mean``, sequences for ``seq-mean-token-mean``, sequences * ``max_len``
    for ``dr-grpo``."""
    if isinstance(masks, torch.Tensor):
        masks = [masks]
    if aggregation == "token-mean":
        return float(sum(float(m.sum()) for m in masks))
    nseq = float(sum(m.shape[0] for m in masks))
    if aggregation == "seq-mean-token-mean":
        return nseq
    if aggregation == "dr-grpo":
        if max_len is None:
            raise ValueError("aggregation 'dr-grpo' needs max_len (the constant length normaliser)")
        return nseq * float(max_len)
    raise ValueError(f"aggregation: expected one of {AGGREGATIONS}, got {aggregation!r}")


def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    aggregation: str = "token-mean",
    *,
    normalizer: float | None = None,
    max_len: int | None = None,
) -> torch.Tensor:
    """Reduce a (B, T) per-token loss with ``mask`` (B, T) to a scalar, as in the module doc.

    ``normalizer`` is the step-wide normaliser (:func:`step_normalizer` over every micro-batch of the step);
    None uses this micro-batch alone. Masked positions contribute exactly 0 (also when they hold inf or nan).
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation: expected one of {AGGREGATIONS}, got {aggregation!r}")
    if per_token.shape != mask.shape:
        raise ValueError(f"per_token and mask: shapes differ, {tuple(per_token.shape)} vs {tuple(mask.shape)}")
    m = mask.to(torch.bool)
    masked = torch.where(m, per_token, torch.zeros((), dtype=per_token.dtype))
    if normalizer is None:
        normalizer = step_normalizer(m, aggregation, max_len=max_len)
    if aggregation == "seq-mean-token-mean":
        lengths = m.sum(-1).clamp_min(1).to(per_token.dtype)
        total = (masked.sum(-1) / lengths).sum()
    else:
        total = masked.sum()
    return total / max(float(normalizer), 1e-12)


@dataclass
class LossOutput:
    """The micro-batch loss and its metric sums (``*_sum`` over masked tokens, ``tokens`` their count), so
    metrics can be summed over micro-batches and ranks before dividing."""

    loss: torch.Tensor
    tokens: float
    kl_sum: float
    clip_sum: float
    ratio_sum: float
    ratio_max: float
    entropy_sum: float


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    aggregation: str = "token-mean",
    normalizer: float | None = None,
    max_len: int | None = None,
    entropy: torch.Tensor | None = None,
) -> LossOutput:
    """The GRPO loss of one micro-batch: clipped surrogate + beta * k3, aggregated (module doc).

    ``logp``, ``old_logp``, ``ref_logp``, ``mask``, ``entropy``: (B, T); ``advantages``: (B,) or (B, T).
    ``ref_logp`` is needed only when ``beta > 0``; the KL metric is reported whenever it is given.
    """
    if beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp (log-probs under the model with adapters off)")
    for name, t in (("old_logp", old_logp), ("mask", mask), ("ref_logp", ref_logp), ("entropy", entropy)):
        if t is not None and t.shape != logp.shape:
            raise ValueError(f"{name}: expected shape {tuple(logp.shape)} (logp's), got {tuple(t.shape)}")
    m = mask.to(torch.bool)
    # Masked positions (prompt, retrieved text, padding) may hold anything in old_logp / ref_logp (-inf, nan):
    # their loss is dropped by a where, but the backward of exp / k3 there would be 0 * inf = nan, and that nan
    # reaches every parameter. There they take logp's own value (no gradient flows through it).
    old_logp = torch.where(m, old_logp, logp.detach())
    if ref_logp is not None:
        ref_logp = torch.where(m, ref_logp, logp.detach())
    per_token, ratio, clipped = clipped_surrogate(logp, old_logp, advantages, eps_low=eps_low, eps_high=eps_high)
    kl = None
    if ref_logp is not None:
        kl = k3_kl(logp, ref_logp)
        if beta > 0:
            per_token = per_token + beta * kl
    loss = aggregate(per_token, m, aggregation, normalizer=normalizer, max_len=max_len)
    with torch.no_grad():
        zero = torch.zeros((), dtype=torch.float64)
        sel = lambda t: torch.where(m, t.double(), zero)  # noqa: E731
        out = LossOutput(
            loss=loss,
            tokens=float(m.sum()),
            kl_sum=float(sel(kl).sum()) if kl is not None else 0.0,
            clip_sum=float(sel(clipped).sum()),
            ratio_sum=float(sel(ratio).sum()),
            ratio_max=float(torch.where(m, ratio.double(), zero).max()) if m.any() else 1.0,
            entropy_sum=float(sel(entropy).sum()) if entropy is not None else 0.0,
        )
    return out
