"""LEAS: a linear attribution of per-question results to abilities and their interaction (DART, arXiv 2602.00994).

Six variants of one model are evaluated on the same questions, each giving a per-question correctness rate
(the fraction of n sampled answers that are right). Each variant switches on a subset of the terms over the
columns ``("base", "tool", "reasoning", "base*tool", "base*reasoning", "tool*reasoning")``::

    variant            design vector x_v        with routed adapters (see routed_lora.diagnostics.evaluate)
    base               [1, 0, 0, 0, 0, 0]       every position on the backbone (route -1)
    reasoning          [1, 0, 1, 0, 1, 0]       every position on the reasoning adapter
    tool               [1, 1, 0, 1, 0, 0]       every position on the tool adapter
    unified            [1, 1, 1, 1, 1, 1]       DART routing: tool spans on the tool adapter, the rest on reasoning
    hybrid_tool        [1, 1, 0, 0, 0, 0]       tool spans on the tool adapter, the rest on the backbone
    hybrid_reasoning   [1, 0, 1, 0, 0, 0]       tool spans on the backbone, the rest on the reasoning adapter

For question q, with the six rates p_qv stacked in the order of ``VARIANTS``, LEAS solves::

    logit(p_qv) = x_v . lambda_q        for the six variants v,   i.e.   X lambda_q = logit(p_q)

X (6 x 6, rows in ``VARIANTS`` order) is lower-triangular up to a row permutation with a unit diagonal
(det = +-1), so the system has the unique exact solution lambda_q = X^{-1} logit(p_q); the code checks the rank
and falls back to least squares (``result.method == "lstsq"``) only for a user-supplied singular design.
Reading the rows: lambda_base = logit(p_base), lambda_tool = logit(p_hybrid_tool) - logit(p_base),
lambda_base*tool = logit(p_tool) - logit(p_hybrid_tool), ..., and
lambda_tool*reasoning = logit(p_unified) - logit(p_tool) - logit(p_reasoning) + logit(p_base): the log-odds
gained by having both adapters beyond the sum of their separate gains. ``negative_interaction_share`` is the
share of kept questions with lambda_tool*reasoning < 0 (the abilities interfere on that question).

Clipping rule (rates of exactly 0 or 1 have infinite logits). Every rate is clipped to [eps, 1 - eps] before the
logit, with

    eps = the ``eps`` argument if given, else min(1 / (2 n), 1/4) for rates measured from n samples per
          question (``n_samples``: half a sample, the usual continuity correction; the cap keeps n = 1, a greedy
          0/1 score, from collapsing every rate to 1/2), else 0.01.

So with n = 8 samples a rate of 0 becomes 1/16 and a rate of 1 becomes 15/16; with n = 1, 1/4 and 3/4.

Dropping rule: a question that no variant ever solves (all six rates == 0) carries no attribution (all its
logits sit at the clip floor), so it is dropped and counted in ``result.dropped``. Rates must lie in [0, 1] and
be finite; anything else raises.

Input files (:func:`read_rates`): CSV or JSONL, in either

- wide form: one row per question with a column per variant (and optionally ``id`` / ``question_id`` /
  ``question``, ``dataset``), or
- long form: one row per (variant, question) with ``variant``, a question key (``id``, ``question_id`` or
  ``question``, plus ``dataset`` when present) and ``rate`` (or ``correct`` and ``n``, or only ``greedy``, a
  0/1 score counted as one sample): this is what
  ``routed-lora eval --out`` writes per question, so several eval JSONL files can be passed together.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "VARIANTS",
    "COLUMNS",
    "DESIGN",
    "LEASResult",
    "leas",
    "logit",
    "clip_eps",
    "read_rates",
    "write_leas",
]

VARIANTS = ("base", "reasoning", "tool", "unified", "hybrid_tool", "hybrid_reasoning")
COLUMNS = ("base", "tool", "reasoning", "base*tool", "base*reasoning", "tool*reasoning")
DESIGN = np.array(
    [
        [1, 0, 0, 0, 0, 0],  # base
        [1, 0, 1, 0, 1, 0],  # reasoning
        [1, 1, 0, 1, 0, 0],  # tool
        [1, 1, 1, 1, 1, 1],  # unified
        [1, 1, 0, 0, 0, 0],  # hybrid_tool
        [1, 0, 1, 0, 0, 0],  # hybrid_reasoning
    ],
    dtype=np.float64,
)

DEFAULT_EPS = 0.01


def logit(p: np.ndarray) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    return np.log(p) - np.log1p(-p)


def clip_eps(*, eps: float | None = None, n_samples: int | None = None) -> float:
    """The clipping margin of the module doc: ``eps`` if given, else min(1/(2 n_samples), 1/4), else 0.01."""
    if eps is not None:
        eps = float(eps)
        if not 0.0 < eps < 0.5:
            raise ValueError(f"eps: expected 0 < eps < 0.5, got {eps}")
        return eps
    if n_samples is not None:
        n = int(n_samples)
        if n < 1:
            raise ValueError(f"n_samples: expected an integer >= 1, got {n_samples!r}")
        return min(1.0 / (2.0 * n), 0.25)
    return DEFAULT_EPS


@dataclass
class LEASResult:
    """Per-question LEAS coefficients.

    ``coefficients`` (kept, 6) over ``columns``; ``kept`` indices into the input question order; ``dropped`` the
    number of questions no variant solved; ``negative_interaction_share`` the share of kept questions whose
    tool*reasoning coefficient is < 0 (nan when nothing is kept); ``method`` "solve" (exact, X invertible) or
    "lstsq"; ``eps`` the clipping margin used; ``question_ids`` the ids of the kept questions when known.
    """

    columns: tuple[str, ...]
    coefficients: np.ndarray
    kept: np.ndarray
    dropped: int
    negative_interaction_share: float
    eps: float
    method: str
    n_questions: int
    question_ids: list | None = None
    residual_max: float = 0.0
    notes: list[str] = field(default_factory=list)

    def column(self, name: str) -> np.ndarray:
        return self.coefficients[:, self.columns.index(name)]

    def summary(self) -> dict:
        """Means, medians and positive/negative shares per column, plus the counts (JSON-ready)."""
        out: dict = {
            "n_questions": self.n_questions,
            "kept": int(len(self.kept)),
            "dropped_never_solved": int(self.dropped),
            "eps": self.eps,
            "method": self.method,
            "negative_interaction_share": _f(self.negative_interaction_share),
            "columns": {},
            "notes": list(self.notes),
        }
        for j, name in enumerate(self.columns):
            c = self.coefficients[:, j]
            out["columns"][name] = {
                "mean": _f(c.mean()) if len(c) else None,
                "median": _f(np.median(c)) if len(c) else None,
                "std": _f(c.std()) if len(c) else None,
                "share_positive": _f((c > 0).mean()) if len(c) else None,
                "share_negative": _f((c < 0).mean()) if len(c) else None,
            }
        return out


def _f(x) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


def leas(
    rates: Mapping[str, Sequence[float] | np.ndarray],
    *,
    eps: float | None = None,
    n_samples: int | None = None,
    design: np.ndarray | None = None,
    question_ids: Sequence | None = None,
) -> LEASResult:
    """LEAS coefficients per question from the six variants' correctness rates (module doc).

    ``rates`` maps each name in ``VARIANTS`` to a 1-d array of per-question rates in [0, 1], same question order.
    ``eps`` / ``n_samples`` set the clipping rule; ``design`` overrides X (rows in ``VARIANTS`` order).
    """
    missing = [v for v in VARIANTS if v not in rates]
    if missing:
        raise KeyError(f"rates: missing variant(s) {missing}; expected all of {VARIANTS}")
    extra = sorted(set(rates) - set(VARIANTS))
    if extra:
        raise KeyError(f"rates: unknown variant(s) {extra}; expected {VARIANTS}")
    lengths = {v: np.asarray(rates[v]).size for v in VARIANTS}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"rates: every variant needs one rate per question, got lengths {lengths}")
    P = np.stack([np.asarray(rates[v], dtype=np.float64).reshape(-1) for v in VARIANTS], axis=1)  # (Q, 6)
    if not np.all(np.isfinite(P)):
        q, j = np.argwhere(~np.isfinite(P))[0]
        raise ValueError(f"rates: non-finite rate {P[q, j]} for variant {VARIANTS[j]!r} at question {q}")
    if np.any((P < 0) | (P > 1)):
        q, j = np.argwhere((P < 0) | (P > 1))[0]
        raise ValueError(f"rates: expected values in [0, 1], got {P[q, j]} for {VARIANTS[j]!r} at question {q}")
    X = DESIGN if design is None else np.asarray(design, dtype=np.float64)
    if X.shape != (len(VARIANTS), len(COLUMNS)):
        raise ValueError(f"design: expected shape {(len(VARIANTS), len(COLUMNS))}, got {X.shape}")
    e = clip_eps(eps=eps, n_samples=n_samples)
    Q = P.shape[0]
    never = np.all(P == 0, axis=1)
    kept = np.flatnonzero(~never)
    Y = logit(np.clip(P[kept], e, 1.0 - e))  # (kept, 6)
    notes = []
    rank = np.linalg.matrix_rank(X)
    if rank == X.shape[1]:
        coef = np.linalg.solve(X, Y.T).T
        method = "solve"
    else:
        coef = np.linalg.lstsq(X, Y.T, rcond=None)[0].T
        method = "lstsq"
        notes.append(f"design matrix has rank {rank} < {X.shape[1]}: least squares (minimum-norm) solution")
    resid = float(np.abs(coef @ X.T - Y).max()) if len(kept) else 0.0
    tr = coef[:, COLUMNS.index("tool*reasoning")]
    share = float((tr < 0).mean()) if len(kept) else float("nan")
    ids = None
    if question_ids is not None:
        if len(question_ids) != Q:
            raise ValueError(f"question_ids: expected {Q} ids, got {len(question_ids)}")
        ids = [question_ids[i] for i in kept]
    return LEASResult(
        columns=COLUMNS,
        coefficients=coef,
        kept=kept,
        dropped=int(never.sum()),
        negative_interaction_share=share,
        eps=e,
        method=method,
        n_questions=Q,
        question_ids=ids,
        residual_max=resid,
        notes=notes,
    )


# ----------------------------------------------------------------------------------------------- file input

_KEY_FIELDS = ("id", "question_id", "qid", "question")


def _records(path: Path) -> list[dict]:
    text = path.read_text()
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{i}: not valid JSON ({exc.msg})") from None
        return rows
    return list(csv.DictReader(text.splitlines()))


def _rate_of(row: dict, where: str) -> float:
    if row.get("rate") not in (None, ""):
        return float(row["rate"])
    if row.get("correct") not in (None, "", []) and row.get("n") not in (None, "", 0, "0"):
        c = row["correct"]
        c = sum(map(float, c)) if isinstance(c, list) else float(c)
        return c / float(row["n"])
    if row.get("greedy") not in (None, ""):  # an eval run without samples: the greedy score (one sample)
        return float(row["greedy"])
    raise ValueError(f"{where}: a long-form row needs 'rate', or 'correct' and 'n'; got keys {sorted(row)}")


def read_rates(paths: str | Path | Iterable[str | Path]) -> tuple[dict[str, np.ndarray], list, int | None]:
    """Read per-question rates from CSV / JSONL file(s) in wide or long form (module doc).

    Returns ``(rates, question_ids, n_samples)``: ``rates`` maps each variant to an array in the order of
    ``question_ids``; ``n_samples`` is the common number of samples when the rows say it (``n``), else None.
    Questions are matched across variants by (dataset, key); a question missing for some variant raises.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    rows: list[tuple[str, dict]] = []
    for p in paths:
        p = Path(p)
        rows += [(f"{p}", r) for r in _records(p)]
    if not rows:
        raise ValueError(f"rates: no rows in {[str(p) for p in paths]}")
    long_form = all("variant" in r for _, r in rows)
    ns = set()
    table: dict[str, dict] = {v: {} for v in VARIANTS}
    order: list = []
    seen = set()
    for i, (where, r) in enumerate(rows):
        key_field = next((k for k in _KEY_FIELDS if r.get(k) not in (None, "")), None)
        qkey = r[key_field] if key_field else i
        if long_form:
            qkey = (r.get("dataset", ""), qkey) if r.get("dataset") not in (None, "") else qkey
            v = r["variant"]
            if v not in table:
                continue  # other variants (e.g. two-agent) are not part of LEAS
            if qkey in table[v]:
                raise ValueError(f"{where}: question {qkey!r} appears twice for variant {v!r}")
            table[v][qkey] = _rate_of(r, where)
            if r.get("rate") in (None, "") and not r.get("correct"):
                ns.add(1)  # greedy only
            elif r.get("n") not in (None, ""):
                ns.add(int(r["n"]))
        else:
            qkey = (r.get("dataset", ""), qkey) if r.get("dataset") not in (None, "") and key_field else qkey
            absent = [v for v in VARIANTS if r.get(v) in (None, "")]
            if absent:
                raise ValueError(f"{where}: wide-form row {i} lacks variant column(s) {absent}")
            for v in VARIANTS:
                table[v][qkey] = float(r[v])
            if r.get("n") not in (None, ""):
                ns.add(int(r["n"]))
        if qkey not in seen:
            seen.add(qkey)
            order.append(qkey)
    for v in VARIANTS:
        lacking = [q for q in order if q not in table[v]]
        if lacking:
            raise ValueError(
                f"rates: variant {v!r} has no rate for {len(lacking)} question(s), e.g. {lacking[0]!r}; "
                f"run `routed-lora eval --variant {v}` on the same questions"
            )
    rates = {v: np.array([table[v][q] for q in order], dtype=np.float64) for v in VARIANTS}
    ids = ["/".join(map(str, q)) if isinstance(q, tuple) else q for q in order]
    return rates, ids, (ns.pop() if len(ns) == 1 else None)


def write_leas(result: LEASResult, out_dir: str | Path) -> dict[str, Path]:
    """Write ``leas.csv`` (one row per kept question: id and the six coefficients) and ``leas_summary.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out / "leas.csv", out / "leas_summary.json"
    ids = result.question_ids if result.question_ids is not None else list(result.kept)
    with csv_path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["index", "id", *result.columns])
        for k, (i, q) in enumerate(zip(result.kept, ids)):
            w.writerow([int(i), q, *(f"{c:.6g}" for c in result.coefficients[k])])
    json_path.write_text(json.dumps(result.summary(), indent=2) + "\n")
    return {"csv": csv_path, "summary": json_path}
