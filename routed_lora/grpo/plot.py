"""Plot a GRPO run's ``metrics.jsonl`` to a PNG: reward and EM over steps, KL, per-adapter gradient norms.

``routed-lora``-written metrics have one JSON object per line; training rows carry ``step`` and keys such as
``reward_mean``, ``em``, ``kl``, ``clip_frac``, ``grad_norm/<adapter>``; evaluation rows carry ``eval`` (a
label) and ``em_greedy/<split>`` / ``em_sampled/<split>``.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["read_metrics", "plot_metrics"]


def read_metrics(path: str | Path) -> list[dict]:
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    return rows


def _smooth(values, k=5):
    out, acc = [], []
    for v in values:
        acc.append(v)
        if len(acc) > k:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def plot_metrics(metrics: str | Path | list[dict], out_png: str | Path, title: str | None = None) -> Path:
    """Write a 2x2 figure: training reward / EM (sampled, smoothed) with the held-out evaluations, KL and
    clip fraction, per-adapter gradient norms, response length and tool calls."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics) if not isinstance(metrics, list) else metrics
    train = [r for r in rows if "step" in r and "eval" not in r]
    evals = [r for r in rows if "eval" in r]
    steps = [r["step"] for r in train]

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    ax = axes[0, 0]
    if train:
        ax.plot(steps, _smooth([r.get("reward_mean", float("nan")) for r in train]), label="train reward (sampled)")
        ax.plot(steps, _smooth([r.get("zero_std_frac", float("nan")) for r in train]), ":",
                label="groups with zero reward std")
    markers = {"greedy": "o", "sampled": "s"}
    for kind, mk in markers.items():
        keys = sorted({k for r in evals for k in r if k.startswith(f"em_{kind}/")})
        for key in keys:
            pts = [(r.get("step", 0), r[key]) for r in evals if key in r]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], mk + "--", label=f"held-out {key}")
    ax.set_xlabel("step")
    ax.set_ylabel("reward / EM")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)
    ax.set_title("reward and exact match")

    ax = axes[0, 1]
    if train:
        ax.plot(steps, [r.get("kl", float("nan")) for r in train], label="KL (k3) to adapters-off")
        ax2 = ax.twinx()
        ax2.plot(steps, [r.get("clip_frac", float("nan")) for r in train], color="tab:red", alpha=0.6,
                 label="clip fraction")
        ax2.set_ylabel("clip fraction", color="tab:red")
    ax.set_xlabel("step")
    ax.set_ylabel("KL")
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title("KL and clipping")

    ax = axes[1, 0]
    keys = sorted({k for r in train for k in r if k.startswith("grad_norm/")})
    for key in keys:
        ax.plot(steps, [r.get(key, float("nan")) for r in train], label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("gradient norm (before clipping)")
    if any(r.get(k, 0) > 0 for r in train for k in keys):
        ax.set_yscale("log")
    if keys:
        ax.legend(fontsize=7)
    ax.set_title("per-adapter gradient norm")

    ax = axes[1, 1]
    if train:
        ax.plot(steps, [r.get("response_len", float("nan")) for r in train], label="response length (tokens)")
        ax.set_ylabel("tokens")
        ax2 = ax.twinx()
        ax2.plot(steps, [r.get("tool_calls", float("nan")) for r in train], color="tab:green",
                 label="tool calls per rollout")
        ax2.set_ylabel("tool calls", color="tab:green")
    ax.set_xlabel("step")
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title("response length and tool use")

    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
