"""Gradient conflict between reasoning and tool tokens, and cross-talk between routed adapters.

Setting. A batch of rollouts gives a per-token loss l_bt (B, T) with its graph (the GRPO policy loss, see
:func:`grpo_per_token_loss`) and boolean role masks over the same (B, T) loss positions, by default
``reasoning`` and ``tool``: a loss token belongs to the role of the route of the position that predicts it
(:func:`role_masks_from_routes`). For a token set M the restricted loss is

    L(M) = sum_{(b,t) in M} l_bt / N,        N = number of tokens in the union of the role masks,

with one fixed N, so L(M1) + L(M2) = L(M1 u M2) for disjoint sets and gradients add up exactly. The gradient
g(M) = dL(M)/dtheta is taken with respect to chosen parameter tensors ("views", :func:`select_params`): every
adapter slice lora_A[e], lora_B[e] of every ``RoutedLoRALinear`` (a shared LoRA in joint mode, the two adapters
in DART mode), or every weight of a small model (``full``). Each g(M) is its own backward pass
(``torch.autograd.grad`` over one retained forward graph).

Reported (all cosines are cos(u, v) = <u, v> / (|u| |v|), angles arccos in degrees; a pair where one gradient
is exactly zero has no angle and is counted under ``skipped_zero``):

- ``batch``: g(R) vs g(T) for R, T the reasoning and tool tokens of the whole batch, per parameter tensor, per
  tensor kind across layers (``by_kind``, e.g. all ``q_proj.lora_B[tool]``) and overall (all views
  concatenated);
- ``within_rollout``: for each rollout b, g(R_b) vs g(T_b) (different roles, same rollout): the list of
  cosines and angles and their summary, and the mean cosine per parameter tensor;
- ``across_rollouts``: for each role and each pair of rollouts b < b', g(R_b) vs g(R_b') (same role, different
  rollouts), likewise. Under the GRPO loss a rollout's gradient is scaled by its advantage A_b, so the sign of
  an across-rollout cosine follows sign(A_b A_b'); ``objective="logp"`` (per-token -log p, no advantage) gives
  the advantage-free directions. Rollouts with A_b = 0 (groups with equal rewards) give zero GRPO gradients at
  ratio 1 and are skipped;
- ``cross_talk`` (when the views carry adapter names that match role names, i.e. DART mode): for adapter e with
  parameters theta_e (all its slices), own tokens M_e = the tokens of role e, other tokens M_~e = the tokens of
  the other roles::

      g_e(M) = dL(M)/dtheta_e,    g_e(all) = g_e(M_e) + g_e(M_~e)
      cross_talk_e       = |g_e(M_~e)| / |g_e(all)|
      cross_talk_share_e = |g_e(M_~e)| / (|g_e(M_e)| + |g_e(M_~e)|)        in [0, 1]

  The routed layer writes adapter e's gradient only at positions routed to e, so a loss on another role's
  tokens reaches theta_e only through attention (later positions reading keys and values that positions routed
  to e produced) and through the residual stream of those positions: cross_talk_e = 0 would mean complete
  isolation; cross_talk can exceed 1 when the two parts cancel (see ``cosine_own_other``). In joint mode (one
  adapter on every token) cross-talk is not defined and is left out.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

__all__ = [
    "ParamView",
    "select_params",
    "role_masks_from_routes",
    "flat_gradient",
    "cosine_report",
    "gradient_conflict",
    "grpo_per_token_loss",
    "grad_angle_from_batch",
    "dedup_rows",
    "split_conflict",
    "write_report",
    "plot_histogram",
]


@dataclass(frozen=True)
class ParamView:
    """One parameter tensor for the report: ``param`` or its slice ``param[index]`` (an adapter of a
    ``RoutedLoRALinear``), named ``name``; ``adapter`` the adapter's name (None for a whole weight)."""

    name: str
    param: torch.Tensor
    index: int | None = None
    adapter: str | None = None

    def numel(self) -> int:
        return self.param[self.index].numel() if self.index is not None else self.param.numel()


def select_params(model: nn.Module, which: str = "lora", *, adapters: Sequence[str] | None = None) -> list[ParamView]:
    """The views of ``model`` to differentiate.

    ``which="lora"``: for every ``RoutedLoRALinear`` and every adapter e (or those in ``adapters``), the slices
    ``lora_A[e]`` and ``lora_B[e]``, named ``<module>.lora_A[<adapter>]``. ``which="full"``: every floating-point
    parameter of the model, LoRA ones included (for a plain small model: its full weights).
    """
    from routed_lora.layer import RoutedLoRALinear

    views: list[ParamView] = []
    if which == "lora":
        for mname, mod in model.named_modules():
            if not isinstance(mod, RoutedLoRALinear):
                continue
            for e, aname in enumerate(mod.adapter_names):
                if adapters is not None and aname not in adapters:
                    continue
                views.append(ParamView(f"{mname}.lora_A[{aname}]", mod.lora_A, e, aname))
                views.append(ParamView(f"{mname}.lora_B[{aname}]", mod.lora_B, e, aname))
        if not views:
            raise ValueError("select_params: no RoutedLoRALinear adapters found (use which='full' for a plain model)")
    elif which == "full":
        seen = set()
        for pname, p in model.named_parameters():
            if p.is_floating_point() and id(p) not in seen:
                seen.add(id(p))
                views.append(ParamView(pname, p))
    else:
        raise ValueError(f"which: expected 'lora' or 'full', got {which!r}")
    return views


@contextlib.contextmanager
def _grad_enabled_for(params: Iterable[torch.Tensor]):
    params = list(params)
    old = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, o in zip(params, old):
            p.requires_grad_(o)


def _unique_params(views: Sequence[ParamView]) -> list[torch.Tensor]:
    out, seen = [], set()
    for v in views:
        if id(v.param) not in seen:
            seen.add(id(v.param))
            out.append(v.param)
    return out


def flat_gradient(loss: torch.Tensor, views: Sequence[ParamView], *, retain_graph: bool = True) -> torch.Tensor:
    """d loss / d views, concatenated in view order as one float64 vector (one backward pass). Parameters the
    loss does not reach get exact zeros."""
    params = _unique_params(views)
    grads = torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True)
    by_id = {id(p): g for p, g in zip(params, grads)}
    parts = []
    for v in views:
        g = by_id[id(v.param)]
        if g is None:
            parts.append(torch.zeros(v.numel(), dtype=torch.float64))
            continue
        if v.index is not None:
            g = g[v.index]
        parts.append(g.detach().reshape(-1).to(device="cpu", dtype=torch.float64))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def _offsets(views: Sequence[ParamView]) -> list[tuple[int, int]]:
    out, o = [], 0
    for v in views:
        n = v.numel()
        out.append((o, o + n))
        o += n
    return out


def _cos(a: torch.Tensor, b: torch.Tensor) -> float | None:
    na, nb = float(a.norm()), float(b.norm())
    if na == 0.0 or nb == 0.0:
        return None
    return max(-1.0, min(1.0, float(a @ b) / (na * nb)))


def _angle(c: float | None) -> float | None:
    return None if c is None else math.degrees(math.acos(c))


def cosine_report(a: torch.Tensor, b: torch.Tensor, views: Sequence[ParamView]) -> dict:
    """Cosine and angle between two flat gradients, overall and per view (None where a gradient is zero)."""
    per = []
    for v, (s, e) in zip(views, _offsets(views)):
        c = _cos(a[s:e], b[s:e])
        per.append({"name": v.name, "cosine": c, "angle_deg": _angle(c),
                    "norm_a": float(a[s:e].norm()), "norm_b": float(b[s:e].norm())})
    c = _cos(a, b)
    return {"cosine": c, "angle_deg": _angle(c), "norm_a": float(a.norm()), "norm_b": float(b.norm()),
            "per_tensor": per}


def tensor_kind(name: str) -> str:
    """The kind of a tensor across layers: its last two name components (``q_proj.lora_B[tool]``,
    ``mlp.down_proj.weight`` -> ``down_proj.weight``)."""
    return ".".join(name.split(".")[-2:])


def _by_kind(a: torch.Tensor, b: torch.Tensor, views: Sequence[ParamView]) -> dict:
    """Cosine and angle over all tensors of one kind (all layers concatenated)."""
    groups: dict = {}
    for v, (s, e) in zip(views, _offsets(views)):
        groups.setdefault(tensor_kind(v.name), []).append((s, e))
    out = {}
    for kind, sl in groups.items():
        c = _cos(torch.cat([a[s:e] for s, e in sl]), torch.cat([b[s:e] for s, e in sl]))
        out[kind] = {"cosine": c, "angle_deg": _angle(c)}
    return out


def _summary(values: list[float]) -> dict:
    if not values:
        return {"n": 0, "mean": None, "median": None, "std": None, "p10": None, "p90": None}
    t = torch.tensor(values, dtype=torch.float64)
    return {"n": len(values), "mean": float(t.mean()), "median": float(t.median()),
            "std": float(t.std()) if len(values) > 1 else 0.0,
            "p10": float(torch.quantile(t, 0.1)), "p90": float(torch.quantile(t, 0.9))}


def _pair_block(pairs: list[tuple], grads_a: Mapping, grads_b: Mapping, views) -> dict:
    """Cosines of grads_a[i] vs grads_b[j] for the listed pairs (i, j), with per-tensor mean cosines."""
    offs = _offsets(views)
    cos, ang, used, skipped = [], [], [], 0
    per_sum = [0.0] * len(views)
    per_n = [0] * len(views)
    for i, j in pairs:
        a, b = grads_a[i], grads_b[j]
        c = _cos(a, b)
        if c is None:
            skipped += 1
            continue
        cos.append(c)
        ang.append(_angle(c))
        used.append([int(i), int(j)])
        for k, (s, e) in enumerate(offs):
            ck = _cos(a[s:e], b[s:e])
            if ck is not None:
                per_sum[k] += ck
                per_n[k] += 1
    return {
        "pairs": used,
        "cosines": cos,
        "angles_deg": ang,
        "cosine": _summary(cos),
        "angle_deg": _summary(ang),
        "skipped_zero": skipped,
        "per_tensor_mean_cosine": {v.name: (per_sum[k] / per_n[k] if per_n[k] else None)
                                   for k, v in enumerate(views)},
    }


def gradient_conflict(
    per_token_loss: torch.Tensor,
    roles: Mapping[str, torch.Tensor],
    views: Sequence[ParamView],
    *,
    role_a: str = "reasoning",
    role_b: str = "tool",
    within: bool = True,
    across: bool = True,
    max_rollouts: int | None = None,
    max_pairs: int = 2000,
) -> dict:
    """The report of the module doc from a per-token loss (B, T) with its graph and role masks (B, T).

    ``roles`` maps role names to boolean masks (disjoint; tokens outside every mask carry no loss here).
    ``max_rollouts`` caps the rollouts used for the per-rollout passes (the first ones); ``max_pairs`` caps the
    across-rollout pairs per role (the first ones in (b, b') order).
    """
    if role_a not in roles or role_b not in roles:
        raise KeyError(f"roles: expected masks for {role_a!r} and {role_b!r}, got {sorted(roles)}")
    masks = {k: m.to(device=per_token_loss.device, dtype=torch.bool) for k, m in roles.items()}
    for k, m in masks.items():
        if m.shape != per_token_loss.shape:
            raise ValueError(f"roles[{k!r}]: expected shape {tuple(per_token_loss.shape)}, got {tuple(m.shape)}")
    union = torch.zeros_like(per_token_loss, dtype=torch.bool)
    for m in masks.values():
        if (union & m).any():
            raise ValueError("roles: masks overlap; each loss token must have one role")
        union |= m
    N = max(float(union.sum()), 1.0)
    zero = torch.zeros((), dtype=per_token_loss.dtype, device=per_token_loss.device)

    def L(mask):
        return torch.where(mask, per_token_loss, zero).sum() / N

    passes = 0
    report: dict = {
        "roles": {k: int(m.sum()) for k, m in masks.items()},
        "num_rollouts": int(per_token_loss.shape[0]),
        "num_params": int(sum(v.numel() for v in views)),
        "tensors": [v.name for v in views],
        "normalizer_tokens": N,
    }
    with _grad_enabled_for(_unique_params(views)):
        g_role = {}
        for k, m in masks.items():
            g_role[k] = flat_gradient(L(m), views)
            passes += 1
        report["batch"] = cosine_report(g_role[role_a], g_role[role_b], views)
        report["batch"]["by_kind"] = _by_kind(g_role[role_a], g_role[role_b], views)

        B = per_token_loss.shape[0] if max_rollouts is None else min(per_token_loss.shape[0], int(max_rollouts))
        if within or across:
            g_roll = {role_a: {}, role_b: {}}
            for b in range(B):
                row = torch.zeros_like(union)
                row[b] = True
                for k in (role_a, role_b):
                    m = masks[k] & row
                    if m.any():
                        g_roll[k][b] = flat_gradient(L(m), views)
                        passes += 1
            if within:
                pairs = [(b, b) for b in range(B) if b in g_roll[role_a] and b in g_roll[role_b]]
                report["within_rollout"] = _pair_block(pairs, g_roll[role_a], g_roll[role_b], views)
                report["within_rollout"]["rollouts_without_both_roles"] = B - len(pairs)
            if across:
                report["across_rollouts"] = {}
                for k in (role_a, role_b):
                    ids = sorted(g_roll[k])
                    pairs = [(i, j) for x, i in enumerate(ids) for j in ids[x + 1:]][:max_pairs]
                    report["across_rollouts"][k] = _pair_block(pairs, g_roll[k], g_roll[k], views)

    adapters = sorted({v.adapter for v in views if v.adapter is not None})
    if adapters and all(a in masks for a in adapters) and len(adapters) > 1:
        offs = _offsets(views)
        ct = {}
        for a in adapters:
            sel = [s_e for v, s_e in zip(views, offs) if v.adapter == a]
            own = torch.cat([g_role[a][s:e] for s, e in sel])
            other = sum(torch.cat([g_role[k][s:e] for s, e in sel]) for k in masks if k != a)
            n_own, n_other, n_all = float(own.norm()), float(other.norm()), float((own + other).norm())
            ct[a] = {
                "norm_own": n_own,
                "norm_other": n_other,
                "norm_all": n_all,
                "cross_talk": (n_other / n_all) if n_all > 0 else None,
                "cross_talk_share": (n_other / (n_own + n_other)) if (n_own + n_other) > 0 else None,
                "cosine_own_other": _cos(own, other),
            }
        report["cross_talk"] = ct
    report["backward_passes"] = passes
    return report


def role_masks_from_routes(
    routes: torch.Tensor,
    loss_mask: torch.Tensor,
    role_of_route: Mapping[int, str] | None = None,
) -> dict[str, torch.Tensor]:
    """Role masks over the log-prob positions (B, L-1) of a batch aligned with ``input_ids`` (B, L).

    Token t (t >= 1) is predicted at position t-1, so its role is the role of ``routes[:, t-1]``: by default
    route 0 = ``reasoning``, 1 = ``tool`` (the DART adapter order). ``loss_mask`` (B, L) marks the tokens that
    carry loss (``collate``'s ``loss_mask``; information and padding are 0). In joint mode, where every
    position has the same route, pass the DART routes here (computed by the router) so the roles are still the
    tag roles.
    """
    role_of_route = dict(role_of_route or {0: "reasoning", 1: "tool"})
    r = routes[:, :-1]
    lm = loss_mask[:, 1:].bool()
    return {name: (r == idx) & lm for idx, name in role_of_route.items()}


def grpo_per_token_loss(
    logp: torch.Tensor,
    advantages: torch.Tensor,
    *,
    old_logp: torch.Tensor | None = None,
    objective: str = "grpo",
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
) -> torch.Tensor:
    """Per-token loss (B, T) for the conflict analysis.

    ``objective="grpo"``: the clipped surrogate of :mod:`routed_lora.grpo.loss` with ``old_logp`` (default
    ``logp.detach()``, the first update, ratio 1, so the gradient is -A_b d log p) plus beta * k3 when
    ``ref_logp`` is given. ``objective="logp"``: -log p per token (the direction of each token's own
    likelihood, advantage-free).
    """
    if objective == "logp":
        return -logp
    if objective != "grpo":
        raise ValueError(f"objective: expected 'grpo' or 'logp', got {objective!r}")
    from routed_lora.grpo.loss import clipped_surrogate, k3_kl

    old = logp.detach() if old_logp is None else old_logp
    per_token, _, _ = clipped_surrogate(logp, old, advantages, eps_low=eps_low, eps_high=eps_high)
    if ref_logp is not None and beta > 0:
        per_token = per_token + beta * k3_kl(logp, ref_logp)
    return per_token


def dedup_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[int]:
    """Indices of the first occurrence of each distinct trajectory (the real tokens of a row)."""
    seen, keep = set(), []
    for b in range(input_ids.shape[0]):
        key = tuple(input_ids[b][attention_mask[b].bool()].tolist())
        if key not in seen:
            seen.add(key)
            keep.append(b)
    return keep


def _quartiles(values: list[float]) -> dict:
    if not values:
        return {"n": 0, "median": None, "q1": None, "q3": None}
    t = torch.tensor(values, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
    return {"n": len(values), "median": q[1], "q1": q[0], "q3": q[2]}


def split_conflict(
    per_token_loss: torch.Tensor,
    roles: Mapping[str, torch.Tensor],
    views: Sequence[ParamView],
    group_ids: torch.Tensor,
    advantages: torch.Tensor,
    *,
    role_a: str = "reasoning",
    role_b: str = "tool",
    splits: int = 8,
    seed: int = 0,
) -> dict:
    """Same-role and cross-role cosines over disjoint halves of the groups (module doc, the paper's way)."""
    masks = {k: roles[k].to(device=per_token_loss.device, dtype=torch.bool) for k in (role_a, role_b)}
    N = max(float((masks[role_a] | masks[role_b]).sum()), 1.0)
    zero = torch.zeros((), dtype=per_token_loss.dtype, device=per_token_loss.device)
    gids = group_ids.tolist()
    live = sorted({g for g, a in zip(gids, advantages.tolist()) if a != 0.0})
    out: dict = {"groups_with_signal": len(live), "groups": len(set(gids)), "splits": 0}
    if len(live) < 2:
        out["note"] = "fewer than 2 groups with a non-zero advantage: no disjoint halves"
        return out
    rng = torch.Generator().manual_seed(seed)
    offs = _offsets(views)
    kinds = {"same_" + role_a: [], "same_" + role_b: [], "cross": []}
    flat = {k: [] for k in kinds}
    per = {k: [] for k in kinds}
    with _grad_enabled_for(_unique_params(views)):
        for _ in range(int(splits)):
            perm = [live[i] for i in torch.randperm(len(live), generator=rng).tolist()]
            half = len(perm) // 2
            sets = (set(perm[:half]), set(perm[half:2 * half]))
            g = {}
            for h, S in enumerate(sets):
                rows = torch.tensor([gi in S for gi in gids], device=per_token_loss.device)[:, None]
                for k in (role_a, role_b):
                    m = masks[k] & rows
                    g[(k, h)] = flat_gradient(torch.where(m, per_token_loss, zero).sum() / N, views)
            pairs = {"same_" + role_a: [(g[(role_a, 0)], g[(role_a, 1)])],
                     "same_" + role_b: [(g[(role_b, 0)], g[(role_b, 1)])],
                     "cross": [(g[(role_a, 0)], g[(role_b, 1)]), (g[(role_a, 1)], g[(role_b, 0)])]}
            for k, lst in pairs.items():
                for a, b in lst:
                    c = _cos(a, b)
                    if c is not None:
                        flat[k].append(c)
                    for s_, e_ in offs:
                        ck = _cos(a[s_:e_], b[s_:e_])
                        if ck is not None:
                            per[k].append(ck)
            out["splits"] += 1
    for k in kinds:
        f, p = _quartiles(flat[k]), _quartiles(per[k])
        out[k] = {"flat": {"cosine": f, "angle_deg": {q: (_angle(max(-1.0, min(1.0, v))) if v is not None else None)
                                                      for q, v in f.items() if q != "n"}},
                  "per_tensor": {"cosine": p, "angle_deg": {q: (_angle(max(-1.0, min(1.0, v))) if v is not None else None)
                                                            for q, v in p.items() if q != "n"}}}
    return out


def grad_angle_from_batch(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    *,
    which: str = "lora",
    routes: torch.Tensor | None = None,
    role_routes: torch.Tensor | None = None,
    objective: str = "grpo",
    temperature: float = 1.0,
    paper: bool = False,
    splits: int = 8,
    seed: int = 0,
    **kwargs,
) -> dict:
    """Teacher-forced pass over a collated batch (``input_ids``, ``attention_mask``, ``loss_mask`` (B, L),
    ``advantages`` (B,), optionally ``routes``) and :func:`gradient_conflict` on it.

    ``routes``: what the model runs with (None: ``batch["routes"]`` if the model has routed layers; pass a
    tensor of zeros in joint mode). ``role_routes``: the routes that define roles (default ``batch["routes"]``,
    the router's DART routes). ``which``: see :func:`select_params`.
    """
    from routed_lora.grpo.logprobs import token_logprobs
    from routed_lora.layer import RoutedLoRALinear

    has_routed = any(isinstance(m, RoutedLoRALinear) for m in model.modules())
    if routes is None and has_routed:
        routes = batch["routes"]
    dup = 0
    if paper:  # identical trajectories once (module doc)
        keep = dedup_rows(batch["input_ids"], batch["attention_mask"])
        dup = batch["input_ids"].shape[0] - len(keep)
        idx = torch.tensor(keep)
        batch = {k: (v[idx] if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == len(idx) + dup else v)
                 for k, v in batch.items()}
        routes = routes[idx] if isinstance(routes, torch.Tensor) else routes
        role_routes = role_routes[idx] if isinstance(role_routes, torch.Tensor) else role_routes
    views = select_params(model, which)
    with _grad_enabled_for(_unique_params(views)), torch.enable_grad():
        logp, _ = token_logprobs(model, batch["input_ids"], batch["attention_mask"],
                                 routes=routes if has_routed else None, temperature=temperature)
        per_token = grpo_per_token_loss(logp, batch["advantages"], objective=objective)
        roles = role_masks_from_routes(batch["routes"] if role_routes is None else role_routes, batch["loss_mask"])
        report = gradient_conflict(per_token, roles, views, **kwargs)
        if paper:
            gids = batch.get("group_ids")
            if gids is None:
                gids = torch.arange(batch["input_ids"].shape[0])
            adv = batch["advantages"] if objective == "grpo" else torch.ones(batch["input_ids"].shape[0])
            report["paper"] = split_conflict(per_token, roles, views, gids, adv, splits=splits, seed=seed)
            report["paper"]["duplicates_removed"] = dup
            report["paper"]["rollouts_kept"] = int(batch["input_ids"].shape[0])
    report["objective"] = objective
    report["which"] = which
    return report


def plot_histogram(report: dict, path: str | Path, title: str = "") -> Path:
    """Histogram PNG of the angles: within rollouts (reasoning vs tool) and across rollouts per role, with the
    batch-level angle as a vertical line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    bins = [i * 5 for i in range(37)]
    if "within_rollout" in report and report["within_rollout"]["angles_deg"]:
        ax.hist(report["within_rollout"]["angles_deg"], bins=bins, alpha=0.6,
                label=f"within rollout, reasoning vs tool (n={report['within_rollout']['angle_deg']['n']})")
    for role, blk in report.get("across_rollouts", {}).items():
        if blk["angles_deg"]:
            ax.hist(blk["angles_deg"], bins=bins, alpha=0.4, histtype="stepfilled",
                    label=f"across rollouts, {role} (n={blk['angle_deg']['n']})")
    a = report.get("batch", {}).get("angle_deg")
    if a is not None:
        ax.axvline(a, color="k", linestyle="--", label=f"batch reasoning vs tool: {a:.1f} deg")
    ax.axvline(90, color="grey", linewidth=0.5)
    ax.set_xlim(0, 180)
    ax.set_xlabel("angle between gradients (degrees)")
    ax.set_ylabel("pairs")
    ax.set_title(title or f"gradient angles ({report.get('which', '')}, {report.get('objective', '')})")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    else:
        ax.text(90, 0.5, "no pairs with non-zero gradients", ha="center")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(report: dict, out_dir: str | Path, *, stem: str = "grad_angle") -> dict[str, Path]:
    """``<stem>.json`` and ``<stem>.png`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jp = out / f"{stem}.json"
    jp.write_text(json.dumps(report, indent=1) + "\n")
    pp = plot_histogram(report, out / f"{stem}.png")
    return {"json": jp, "png": pp}
