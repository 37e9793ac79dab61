"""The GRPO update: :func:`grpo_update`, steps 2-4 of a training step (:mod:`routed_lora.grpo.trainer`), on one
rollout batch: advantages, the split into mini- and micro-batches (:func:`mini_batch_rows`), the old and reference
log-probs, the clipped updates and the step's metrics.

Must not sample, write files or keep state between calls: everything it needs comes in its arguments.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from routed_lora.fsdp import full_tensor

from .adapters import AdapterOptimizer, adapter_grad_norms, adapter_names
from .config import GRPOConfig
from .distributed import _dist, _grad_sync, all_reduce_sum, world_info
from .logprobs import reference_logprobs, token_logprobs
from .loss import group_advantages, grpo_loss, step_normalizer, zero_std_fraction
from .rollout import RolloutBatch


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
    """Steps 2-4 of a training step (:mod:`routed_lora.grpo.trainer`'s module doc) on one rollout batch; returns
    the step's metrics (summed over ranks)."""
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
