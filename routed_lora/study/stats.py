"""Paired statistics for per-question results (no scipy): exact McNemar and a paired bootstrap interval.

Two systems A and B answer the same n questions; a_i, b_i in {0, 1} say whether each got question i right.

- **Exact McNemar.** Only discordant questions carry information: n10 = #{a_i = 1, b_i = 0} and
  n01 = #{a_i = 0, b_i = 1}. Under H0 (A and B equally good) each discordant question is a fair coin, so with
  m = n10 + n01 and k = min(n10, n01) the two-sided p-value is ``min(1, 2 * P(X <= k))``, X ~ Binomial(m, 1/2),
  computed exactly from binomial coefficients (p = 1 when m = 0).
- **Paired bootstrap.** For paired values (0/1 outcomes, or per-question means over seeds or samples), the
  difference d_i = b_i - a_i; resample questions with replacement ``n_boot`` times and take the percentile
  interval of mean(d*). Resampling whole questions keeps the pairing (and the seeds of one question together).
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Sequence

__all__ = ["mcnemar_exact", "paired_bootstrap", "discordant", "format_p"]


def discordant(a: Sequence[float], b: Sequence[float]) -> tuple[int, int]:
    """(n10, n01): questions A got right and B wrong, and the reverse. Values must be 0 or 1."""
    if len(a) != len(b):
        raise ValueError(f"paired results: expected equal lengths, got {len(a)} and {len(b)}")
    n10 = n01 = 0
    for x, y in zip(a, b):
        if x not in (0, 1) or y not in (0, 1):
            raise ValueError(f"McNemar needs 0/1 outcomes, got {x!r} and {y!r}")
        n10 += int(x == 1 and y == 0)
        n01 += int(x == 0 and y == 1)
    return n10, n01


def mcnemar_exact(a: Sequence[float], b: Sequence[float]) -> dict:
    """Exact two-sided McNemar test of paired 0/1 outcomes (module doc). Returns ``{"n10", "n01", "p"}``."""
    n10, n01 = discordant(a, b)
    m, k = n10 + n01, min(n10, n01)
    if m == 0:
        return {"n10": 0, "n01": 0, "p": 1.0}
    tail = Fraction(sum(math.comb(m, j) for j in range(k + 1)), 2 ** m)
    return {"n10": n10, "n01": n01, "p": float(min(Fraction(1), 2 * tail))}


def paired_bootstrap(a: Sequence[float], b: Sequence[float], *, n_boot: int = 10000, level: float = 0.95,
                     seed: int = 0) -> dict:
    """Percentile interval of mean(b - a) over questions resampled with replacement (module doc).

    Returns ``{"diff", "lo", "hi", "n", "n_boot", "level"}``; ``diff`` is the observed mean difference."""
    import numpy as np

    if len(a) != len(b):
        raise ValueError(f"paired results: expected equal lengths, got {len(a)} and {len(b)}")
    if not a:
        raise ValueError("paired results: no questions")
    if not 0 < level < 1:
        raise ValueError(f"level: expected in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot: expected >= 1, got {n_boot}")
    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    chunk = max(1, 2_000_000 // len(d))
    for s in range(0, n_boot, chunk):
        e = min(n_boot, s + chunk)
        means[s:e] = d[rng.integers(0, len(d), size=(e - s, len(d)))].mean(1)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return {"diff": float(d.mean()), "lo": float(lo), "hi": float(hi), "n": len(d), "n_boot": n_boot,
            "level": level}


def format_p(p: float) -> str:
    return f"{p:.3g}" if p >= 1e-4 else f"{p:.1e}"
