"""The metrics plot: a PNG from training and evaluation rows (matplotlib optional)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("matplotlib")

from routed_lora.grpo.plot import plot_metrics, read_metrics  # noqa: E402


def test_plot_metrics_writes_png(tmp_path):
    rows = [{"eval": "before", "step": 0, "em_greedy/1hop": 0.9, "em_greedy/2hop": 0.4, "em_sampled/all": 0.5}]
    for s in range(1, 8):
        rows.append({"step": s, "reward_mean": 0.5 + 0.01 * s, "zero_std_frac": 0.3, "kl": 1e-4 * s,
                     "clip_frac": 0.01, "grad_norm/reasoning": 0.1, "grad_norm/tool": 0.05, "response_len": 40,
                     "tool_calls": 1.5})
    rows.append({"eval": "after", "step": 7, "em_greedy/1hop": 0.92, "em_greedy/2hop": 0.5, "em_sampled/all": 0.6})
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_metrics(path) == rows
    png = plot_metrics(path, tmp_path / "m.png", title="t")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
