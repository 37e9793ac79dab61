"""The study's analysis and its markdown report with a plot (module doc of :mod:`routed_lora.study.run`)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from .design import COMPARISONS, PRIMARY
from .stats import format_p, mcnemar_exact, paired_bootstrap

HOPS = ("2hop", "1hop", "all")


# the views of the evaluation: per arm, the file of per-question records; "two_agent" is the dart arm's adapters
# run as the paper's 2-Agent system (routed_lora.study.controls)
STANDARD = "per_question.jsonl"
GOLD = "per_question_gold.jsonl"
TWO_AGENT = ("dart", "per_question_two_agent.jsonl")


def _load(out: Path, arm: str, seed: int, file: str = STANDARD) -> list[dict] | None:
    p = out / "arms" / arm / f"seed{seed}" / file
    if not (p.parent / "result.json").exists() or not p.exists():
        return None
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()]


def _select(recs: list[dict], hop: str) -> list[int]:
    return [int(r["greedy"]) for r in recs if hop == "all" or f"{r.get('hops')}hop" == hop]


def _view(out: Path, cfg, sources: dict[str, tuple[str, str]], comparisons, primary: bool) -> dict:
    """Per-arm EM and the paired tests of ``comparisons`` for one view; ``sources``: name -> (arm folder, file)."""
    per: dict[str, dict[int, list[dict]]] = {}
    for name, (arm, file) in sources.items():
        seeds = [0] if arm == "warm" else list(range(cfg.seeds))
        got = {s: _load(out, arm, s, file) for s in seeds}
        per[name] = {s: r for s, r in got.items() if r is not None}
    arms = {}
    for arm, by_seed in per.items():
        if not by_seed:
            continue
        row = {"seeds": sorted(by_seed)}
        for h in HOPS:
            vals = [statistics.fmean(_select(r, h)) for r in by_seed.values()]
            row[h] = {"mean": statistics.fmean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                      "per_seed": vals, "n": len(_select(next(iter(by_seed.values())), h))}
        arms[arm] = row
    tests = []
    for a, b in comparisons:
        if a not in arms or b not in arms:
            continue
        key = lambda arm, s: 0 if arm == "warm" else s  # noqa: E731  (one warm evaluation serves every seed)
        seeds = [s for s in range(cfg.seeds) if key(a, s) in per[a] and key(b, s) in per[b]]
        if not seeds:
            continue
        pair = lambda arm, s: per[arm][key(arm, s)]  # noqa: E731
        for h in HOPS:
            xa = [_select(pair(a, s), h) for s in seeds]
            xb = [_select(pair(b, s), h) for s in seeds]
            pooled = mcnemar_exact([v for x in xa for v in x], [v for x in xb for v in x])  # n10: a only
            per_seed = [mcnemar_exact(x, y) for x, y in zip(xa, xb)]
            n = len(xa[0])
            ma = [statistics.fmean(x[i] for x in xa) for i in range(n)]
            mb = [statistics.fmean(x[i] for x in xb) for i in range(n)]
            boot = paired_bootstrap(mb, ma, seed=17)  # a - b
            tests.append({"a": a, "b": b, "hop": h, "seeds": seeds, "n": n, "diff": boot["diff"],
                          "ci": [boot["lo"], boot["hi"]], "mcnemar_pooled": pooled,
                          "mcnemar_per_seed": [t["p"] for t in per_seed],
                          "primary": primary and [a, b] == PRIMARY["comparison"] and h == "2hop"})
    return {"arms": arms, "tests": tests}


def analyse(out: Path, cfg) -> dict:
    """Per-arm EM (mean and sd over seeds, per seed) and the paired tests of every comparison, per hop count:
    the arms as trained and the 2-Agent baseline (``arms``, ``tests``), and every arm with retrieval held
    constant (``held_constant``)."""
    out = Path(out)
    sources = {arm: (arm, STANDARD) for arm in cfg.arms}
    if "dart" in cfg.arms:
        sources["two_agent"] = TWO_AGENT
    view = _view(out, cfg, sources, tuple(COMPARISONS) + (("dart", "two_agent"),), primary=True)
    gold = _view(out, cfg, {arm: (arm, GOLD) for arm in cfg.arms}, COMPARISONS, primary=False)
    arms, tests = view["arms"], view["tests"]
    timings = {}
    for arm in cfg.arms:
        for s in ([0] if arm == "warm" else range(cfg.seeds)):
            p = out / "arms" / arm / f"seed{s}" / "result.json"
            if p.exists():
                r = json.loads(p.read_text())
                timings.setdefault(arm, []).append({"seed": s, "train_seconds": r["train_seconds"],
                                                    "eval_seconds": r["eval"]["eval_seconds"],
                                                    "trainable_parameters": r["trainable_parameters"],
                                                    "train": r.get("train", {})})
    return {"primary": PRIMARY, "arms": arms, "tests": tests, "held_constant": gold, "timings": timings,
            "config": cfg.to_dict()}


def plot(out: Path, analysis: dict) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels = [(analysis["arms"], "2hop", "as trained"), (analysis["arms"], "1hop", "as trained")]
    gold = analysis.get("held_constant", {}).get("arms") or {}
    if gold:
        panels.insert(1, (gold, "2hop", "retrieval held constant"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), sharey=True)
    for ax, (rows, h, what) in zip(axes, panels):
        arms = list(rows)
        for i, arm in enumerate(arms):
            row = rows[arm][h]
            ax.bar(i, row["mean"], color="#e39b5b" if arm == "dart" else "#8fb3d9", width=0.6)
            ax.errorbar(i, row["mean"], yerr=row["sd"], color="k", capsize=4)
            ax.scatter([i] * len(row["per_seed"]), row["per_seed"], color="k", s=12, zorder=3)
        ax.set_xticks(range(len(arms)), [a.replace("_", "-") for a in arms], fontsize=8)
        ax.set_title(f"{h[0]}-hop, {what} (n={rows[arms[0]][h]['n']})", fontsize=9)
        ax.set_ylim(0, 1.05)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("exact match (bars: mean over seeds, dots: seeds)")
    fig.tight_layout()
    path = Path(out) / "em.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _tests_table(tests) -> list[str]:
    L = ["| a | b | hops | diff | 95% bootstrap CI | McNemar pooled p (a-only / b-only) | McNemar p per seed |",
         "|---|---|---|---|---|---|---|"]
    for t in tests:
        m = t["mcnemar_pooled"]
        L.append(f"| {t['a']} | {t['b']} | {t['hop']} | {t['diff']:+.3f} | [{t['ci'][0]:+.3f}, {t['ci'][1]:+.3f}] | "
                 f"{format_p(m['p'])} ({m['n10']} / {m['n01']}) | "
                 + ", ".join(format_p(p) for p in t["mcnemar_per_seed"]) + " |")
    return L


def write_report(out: Path, cfg, analysis: dict) -> Path:
    out = Path(out)
    png = plot(out, analysis)
    P = analysis["primary"]
    L = ["# routed-lora study: DART vs joint vs controls", "",
         f"Primary metric (fixed before the run, `study.json`): **{P['metric']}, "
         f"{' vs '.join(P['comparison'])}**; {P['test']}.", "",
         f"Settings: {cfg.seeds} seeds, {cfg.steps} steps per trained arm, {cfg.prompts_per_step} questions x "
         f"G={cfg.group_size} per GRPO step, r={cfg.r} per DART adapter (joint and sft: one adapter of rank "
         f"{2 * cfg.r}, alpha {2 * cfg.lora_alpha:g}), lr {cfg.lr:g}, beta {cfg.beta:g}; warm start {cfg.sft_steps} "
         f"SFT steps (2-hop fraction {cfg.two_hop_frac:g}); world: {getattr(cfg, 'world_kind', 'default')}.", ""]
    prim = [t for t in analysis["tests"] if t["primary"]]
    if prim:
        t = prim[0]
        inside = t["ci"][0] <= 0 <= t["ci"][1]
        L += ["## Primary result", "",
              f"DART - joint, 2-hop greedy EM: **{t['diff']:+.3f}** (95% paired bootstrap interval "
              f"[{t['ci'][0]:+.3f}, {t['ci'][1]:+.3f}], {t['n']} questions x {len(t['seeds'])} seeds); exact "
              f"McNemar pooled p = {format_p(t['mcnemar_pooled']['p'])} ({t['mcnemar_pooled']['n10']} question-seed "
              f"pairs only DART solved, {t['mcnemar_pooled']['n01']} only joint); per seed p = "
              + ", ".join(format_p(p) for p in t["mcnemar_per_seed"]) + ". "
              + ("The interval includes 0: no difference shown at this size." if inside else
                 ("The interval excludes 0: DART ahead." if t["diff"] > 0 else "The interval excludes 0: joint ahead.")),
              ""]
    else:
        L += ["## Primary result", "", "Not computed: the dart and joint arms are not both finished.", ""]
    L += ["## Held-out greedy EM per arm", "", "| arm | 2-hop mean (sd) | 1-hop mean (sd) | all | per seed, 2-hop |",
          "|---|---|---|---|---|"]
    for arm, row in analysis["arms"].items():
        L.append(f"| {arm} | {row['2hop']['mean']:.3f} ({row['2hop']['sd']:.3f}) | {row['1hop']['mean']:.3f} "
                 f"({row['1hop']['sd']:.3f}) | {row['all']['mean']:.3f} | "
                 + ", ".join(f"{v:.3f}" for v in row["2hop"]["per_seed"]) + " |")
    if "two_agent" in analysis["arms"]:
        L += ["", "`two_agent`: the dart arm's adapters run as the paper's 2-Agent system (one model copy per "
              "adapter, each writing its role's tokens), same questions, greedy."]
    L += ["", "## Paired tests (a - b)", ""] + _tests_table(analysis["tests"])
    gold = analysis.get("held_constant") or {}
    if gold.get("arms"):
        L += ["", "## With retrieval held constant", "",
              "Every search answered by the gold documents of its hop, whatever the query "
              "(`routed_lora.env.held_constant`): what remains of a difference is reasoning, not retrieval.", "",
              "| arm | 2-hop mean (sd) | 1-hop mean (sd) | all | per seed, 2-hop |", "|---|---|---|---|---|"]
        for arm, row in gold["arms"].items():
            L.append(f"| {arm} | {row['2hop']['mean']:.3f} ({row['2hop']['sd']:.3f}) | {row['1hop']['mean']:.3f} "
                     f"({row['1hop']['sd']:.3f}) | {row['all']['mean']:.3f} | "
                     + ", ".join(f"{v:.3f}" for v in row["2hop"]["per_seed"]) + " |")
        L += [""] + _tests_table(gold["tests"])
    L += ["", "The pooled McNemar test treats (seed, question) pairs as independent, which they are not (the same "
          "question recurs across seeds); the bootstrap interval resamples questions with their seeds together "
          "and is the one to read.", ""]
    if png:
        L += [f"![held-out EM]({png.name})", ""]
    L += ["## Cost", "", "| arm | seed | train s | s / step | eval s | trainable parameters |", "|---|---|---|---|---|---|"]
    for arm, rows in analysis["timings"].items():
        for r in rows:
            per_step = r["train_seconds"] / cfg.steps if arm != "warm" else float("nan")
            L.append(f"| {arm} | {r['seed']} | {r['train_seconds']:.1f} | {per_step:.2f} | {r['eval_seconds']:.1f} | "
                     f"{r['trainable_parameters']} |")
    path = out / "report.md"
    path.write_text("\n".join(L) + "\n")
    return path
