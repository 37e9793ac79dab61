"""JSONL records -> a markdown report (tables) and a matplotlib plot (time relative to the floor, per shape).

:func:`load` reads the records (optionally one run), :func:`markdown` renders them and :func:`plot` draws one
panel per shape: x = tokens, y = median time / frozen-linear median time, one line per provider (full mode).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

__all__ = ["load", "markdown", "plot", "write_report", "layer_table", "memory_table", "e2e_table", "decode_table",
           "isolation_table"]

PROVIDER_ORDER = ("linear", "routed_torch", "routed_triton", "naive", "peft", "routed_lora")


def load(path: str | os.PathLike, run_id: str | None = None) -> list[dict]:
    """Records of ``path`` (JSONL); only those of ``run_id`` if given, else those of the last run in the file."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if not rows:
        return []
    if run_id is None:
        run_id = rows[-1].get("run_id")
    return [r for r in rows if r.get("run_id") == run_id] if run_id is not None else rows


def _prank(name):
    return (PROVIDER_ORDER.index(name) if name in PROVIDER_ORDER else 99, name)


def _order(names):
    return sorted(names, key=_prank)


def _mb(b):
    return f"{b / 2**20:.2f}"


def _case_key(r):
    return (r.get("sweep", ""), r.get("shape", ""), r["K"], r["N"], r["M"], r["r"], r["tool_frac"], r["dtype"])


def layer_table(rows: list[dict]) -> str:
    """Median ms [p20-p80] and the paired ratio to the floor, per case and mode, one column per provider."""
    layer = [r for r in rows if r.get("kind") == "layer"]
    if not layer:
        return ""
    providers = _order({r["provider"] for r in layer})
    groups = defaultdict(dict)
    for r in layer:
        groups[(_case_key(r), r["mode"])][r["provider"]] = r
    head = ["sweep", "shape (K x N)", "M", "r", "tool", "mode"] + [f"{p}" for p in providers]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    mode_rank = {"forward": 0, "backward": 1, "full": 2}
    for (key, mode) in sorted(groups, key=lambda k: (k[0][0], k[0][1], k[0][4], k[0][5], k[0][6], mode_rank.get(k[1], 9))):
        sweep, shape, K, N, M, rank, tool, _ = key
        cells = [sweep, f"{shape} ({K}x{N})", str(M), str(rank), f"{tool:g}", mode]
        for p in providers:
            r = groups[(key, mode)].get(p)
            if r is None:
                cells.append("")
                continue
            cell = f"{r['median_ms']:.3g} ms [{r['p20_ms']:.3g}-{r['p80_ms']:.3g}]"
            if p != "linear":
                cell += f" **{r['ratio_to_floor']:.2f}x**"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def memory_table(rows: list[dict]) -> str:
    """Bytes saved for backward (and the issue-2 budget), whether an (M, N) activation is saved, extra peak."""
    mem = [r for r in rows if r.get("kind") == "memory"]
    if not mem:
        return ""
    head = ["shape (K x N)", "M", "r", "tool", "provider", "saved MiB", "budget MiB", "within", "(M,N) saved",
            "extra peak MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    seen = set()
    for r in sorted(mem, key=lambda r: (_case_key(r)[1:], _prank(r["provider"]))):
        key = (_case_key(r)[1:], r["provider"])
        if key in seen:
            continue
        seen.add(key)
        lines.append(
            "| "
            + " | ".join(
                [
                    f"{r.get('shape', '')} ({r['K']}x{r['N']})",
                    str(r["M"]),
                    str(r["r"]),
                    f"{r['tool_frac']:g}",
                    r["provider"],
                    _mb(r["saved_bytes"]),
                    _mb(r["saved_budget_bytes"]),
                    "yes" if r["saved_within_budget"] else "**no**",
                    "**yes**" if r["saved_has_MN"] else "no",
                    _mb(r["extra_peak_bytes"]),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def e2e_table(rows: list[dict]) -> str:
    e2e = [r for r in rows if r.get("kind") == "e2e"]
    if not e2e:
        return ""
    head = ["provider", "model", "tokens/step", "step ms [p20-p80]", "tokens/s", "time vs peft", "extra peak MiB",
            "saved MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(e2e, key=lambda r: _prank(r["provider"])):
        model = (f"{r['model']} h{r['e2e_hidden']} i{r['e2e_intermediate']} L{r['e2e_layers']} "
                 f"r{r['r']} {r['dtype']}")
        lines.append(
            "| "
            + " | ".join(
                [
                    r["provider"],
                    model,
                    str(r["M"]),
                    f"{r['median_ms']:.4g} [{r['p20_ms']:.4g}-{r['p80_ms']:.4g}]",
                    f"{r['tokens_per_s']:.0f}",
                    f"{r['time_ratio_to_peft']:.2f}x",
                    _mb(r["extra_peak_bytes"]),
                    _mb(r["saved_bytes"]),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def decode_table(rows: list[dict]) -> str:
    """No-grad decode, side by side: median us per provider and the paired ratios routed/linear, routed/peft,
    peft/linear, one row per (shape, M)."""
    dec = [r for r in rows if r.get("kind") == "decode"]
    if not dec:
        return ""
    by = defaultdict(dict)
    for r in dec:
        by[(r.get("shape", ""), r["K"], r["N"], r["M"], r["r"], r["dtype"], r.get("threads"))][r["provider"]] = r
    routed = [p for p in ("routed_torch", "routed_triton") if any(p in v for v in by.values())]
    head = ["shape (K x N)", "M", "r", "dtype", "threads", "linear us", "peft us"]
    for p in routed:
        head += [f"{p} us", f"{p} / linear", f"{p} / peft"]
    head.append("peft / linear")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in sorted(by, key=lambda k: (k[0], k[3])):
        shape, K, N, M, rank, dtype, threads = key
        g = by[key]

        def us(p):
            return f"{g[p]['median_us']:.0f} [{g[p]['p20_us']:.0f}-{g[p]['p80_us']:.0f}]" if p in g else ""

        cells = [f"{shape} ({K}x{N})", str(M), str(rank), dtype, str(threads), us("linear"), us("peft")]
        for p in routed:
            r = g.get(p)
            cells += [us(p), f"**{r['ratio_to_floor']:.2f}x**" if r and r.get("ratio_to_floor") else "",
                      f"**{r['ratio_to_peft']:.2f}x**" if r and r.get("ratio_to_peft") else ""]
        pr = g.get("peft")
        cells.append(f"{pr['ratio_to_floor']:.2f}x" if pr and pr.get("ratio_to_floor") else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def isolation_table(rows: list[dict]) -> str:
    """Backward time per isolation mode and its paired ratio to the plain product ("none")."""
    iso = [r for r in rows if r.get("kind") == "isolation"]
    if not iso:
        return ""
    head = ["shape (K x N)", "M", "dtype", "mode", "backward ms [p20-p80]", "vs none [p20-p80]"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = {"none": 0, "recheck": 1, "sanitize": 2}
    for r in sorted(iso, key=lambda r: (r.get("shape", ""), r["M"], order.get(r["isolation"], 9))):
        lines.append("| " + " | ".join([
            f"{r.get('shape', '')} ({r['K']}x{r['N']})", str(r["M"]), r["dtype"], r["isolation"],
            f"{r['median_ms']:.3g} [{r['p20_ms']:.3g}-{r['p80_ms']:.3g}]",
            f"{r['ratio_to_none']:.3f}x [{r['ratio_to_none_p20']:.3f}-{r['ratio_to_none_p80']:.3f}]",
        ]) + " |")
    return "\n".join(lines)


def _machine_line(rows):
    r = rows[0]
    load = r.get("loadavg")
    load_txt = f", load average at start {load[0]:.1f}" if load else ""
    return (
        f"Machine: {r.get('device_name')} ({r.get('device')}){load_txt}; torch {r.get('torch')}, triton "
        f"{r.get('triton')}, transformers {r.get('transformers')}, peft {r.get('peft')}, routed-lora "
        f"{r.get('routed_lora')} at {str(r.get('git_sha'))[:10]}{' (dirty)' if r.get('git_dirty') else ''}; "
        f"run {r.get('run_id')}{' (--quick)' if r.get('quick') else ''}."
    )


def markdown(rows: list[dict]) -> str:
    if not rows:
        return "No records.\n"
    parts = [f"# routed-lora benchmark\n\n{_machine_line(rows)}\n"]
    parts.append(
        "Layer times: median [p20-p80] over interleaved repeats; **bold** = paired ratio to the frozen "
        "nn.Linear (`linear`, the floor: its forward and input gradient). Modes: forward, backward, full = "
        "forward + backward.\n"
    )
    notes = sorted({f"- {r['provider']}: {r['reason']}" for r in rows if r.get("kind") == "skipped"})
    notes += [f"- case {r.get('shape', '')} M={r.get('M')} r={r.get('r')}: {r['error']}" for r in rows
              if r.get("kind") == "error"]
    if notes:
        parts.append("Skipped or failed:\n\n" + "\n".join(notes) + "\n")
    for title, table in (("Layer", layer_table(rows)), ("Memory (layer, forward + backward)", memory_table(rows)),
                         ("Decode (no-grad forward, routes set once; paired ratios)", decode_table(rows)),
                         ("Isolation cost (routed backward, PyTorch path)", isolation_table(rows)),
                         ("End to end (one training step)", e2e_table(rows))):
        if table:
            parts.append(f"## {title}\n\n{table}\n")
    return "\n".join(parts)


def plot(rows: list[dict], path: str | os.PathLike, mode: str = "full") -> Path | None:
    """One panel per shape (tokens sweep): median time / floor against tokens, one line per provider."""
    layer = [r for r in rows if r.get("kind") == "layer" and r["mode"] == mode and r.get("sweep") == "tokens"]
    if not layer:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401

    shapes = sorted({(r["shape"], r["K"], r["N"]) for r in layer}, key=lambda s: (s[1] * s[2], s[0]))
    ncols = min(3, len(shapes))
    nrows = (len(shapes) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.4 * nrows), squeeze=False)
    for ax, (shape, K, N) in zip(axes.flat, shapes):
        sub = [r for r in layer if r["shape"] == shape and r["K"] == K and r["N"] == N]
        for p in _order({r["provider"] for r in sub}):
            pts = sorted((r["M"], r["ratio_to_floor"], r["ratio_to_floor_p20"], r["ratio_to_floor_p80"])
                         for r in sub if r["provider"] == p)
            xs = [q[0] for q in pts]
            ax.plot(xs, [q[1] for q in pts], marker="o", label=p)
            ax.fill_between(xs, [q[2] for q in pts], [q[3] for q in pts], alpha=0.15)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.axhline(1.0, color="k", lw=0.6)
        ax.set_title(f"{shape} ({K}x{N}), {mode}", fontsize=9)
        ax.set_xlabel("tokens M")
        ax.set_ylabel("time / frozen linear")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(shapes):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    r0 = rows[0]
    fig.suptitle(f"{r0.get('device_name')}, {r0.get('torch')}, {str(r0.get('git_sha'))[:10]}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(jsonl: str | os.PathLike, out_dir: str | os.PathLike | None = None, *, run_id=None):
    """Write ``report.md`` and ``relative_time.png`` next to ``jsonl`` (or in ``out_dir``); returns both paths
    (the plot's is None when there is nothing to plot)."""
    rows = load(jsonl, run_id)
    out = Path(out_dir) if out_dir is not None else Path(jsonl).parent
    out.mkdir(parents=True, exist_ok=True)
    png = plot(rows, out / "relative_time.png")
    text = markdown(rows)
    if png:
        text += f"\n![time relative to the frozen linear]({png.name})\n"
    md = out / "report.md"
    md.write_text(text)
    return md, png
