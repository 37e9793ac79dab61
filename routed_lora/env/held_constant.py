"""Retrieval held constant: the paper's control that separates reasoning from retrieval.

An agent's exact match mixes two skills: writing queries that retrieve the right passages (tool) and using the
passages to reach the answer (reasoning). To attribute a difference between two trained models to one of them,
the DART paper also evaluates with retrieval held constant: every search gets the gold documents, whatever
query the model wrote. Then only the reasoning (and the decision to search at all) differs.

:class:`HeldConstantRetriever` does that for question rows that carry the scripted search ``plan`` (the
built-in worlds, :mod:`routed_lora.env.world`, :mod:`routed_lora.env.conflict_world`): the h-th search of the
rollout for a row (h counted from 0) gets the base retriever's top-k for the row's scripted query
``plan[h]["query"]``, the very documents the expert trajectories splice in (:mod:`routed_lora.env.trajectories`);
a search past the plan's last hop gets the last hop's documents again. The query the model wrote is ignored.

Use: ``evaluate_em(..., retriever=HeldConstantRetriever(base))``: the evaluation binds each batch's rows
(:meth:`HeldConstantRetriever.bind`) and the rollout loop calls ``search_rollouts`` with the rollout index and
the number of searches it made before (:func:`routed_lora.env.rollout.append_search_results`).
"""

from __future__ import annotations

from collections.abc import Sequence


class HeldConstantRetriever:
    """Gold documents per (question, hop) from ``base``, whatever the query (module doc)."""

    def __init__(self, base):
        self.base = base
        self._cache: dict[tuple[str, int], list[dict]] = {}
        self.calls = 0  # searches answered, for tests and logs

    def bind(self, rows: Sequence[dict]) -> "_BoundHeldConstant":
        """The retriever for one batch of rollouts: rollout i answers question ``rows[i]``."""
        for i, r in enumerate(rows):
            plan = r.get("plan")
            if not isinstance(plan, list) or not plan or not all(isinstance(p, dict) and "query" in p for p in plan):
                raise ValueError(f"held-constant retrieval: row {i} ({str(r.get('question'))[:60]!r}) has no "
                                 "scripted search plan (a 'plan' list of {'query': ...}); only the built-in worlds' "
                                 "rows carry one")
        return _BoundHeldConstant(self, list(rows))

    def gold(self, row: dict, hop: int, topk: int) -> list[dict]:
        """The gold documents of ``row``'s search number ``hop`` (0-based; past the plan: its last hop)."""
        plan = row["plan"]
        query = plan[min(hop, len(plan) - 1)]["query"]
        key = (query, int(topk))
        if key not in self._cache:
            self._cache[key] = self.base.search([query], topk=topk)[0]
        return [dict(d) for d in self._cache[key]]

    def search(self, queries, topk: int = 3):
        raise TypeError("HeldConstantRetriever answers per question: pass it to evaluate_em (which binds each "
                        "batch's rows) or call bind(rows).search_rollouts(...)")


class _BoundHeldConstant:
    def __init__(self, parent: HeldConstantRetriever, rows: list[dict]):
        self.parent = parent
        self.rows = rows

    def search_rollouts(self, rollout_indices: Sequence[int], queries: Sequence[str], calls_before: Sequence[int],
                        topk: int = 3) -> list[list[dict]]:
        if not (len(rollout_indices) == len(queries) == len(calls_before)):
            raise ValueError(f"search_rollouts: {len(rollout_indices)} rollout indices, {len(queries)} queries and "
                             f"{len(calls_before)} call counts; expected one of each per search")
        out = []
        for i, h in zip(rollout_indices, calls_before):
            if not 0 <= i < len(self.rows):
                raise IndexError(f"rollout index {i}: this batch has {len(self.rows)} rows")
            out.append(self.parent.gold(self.rows[i], int(h), topk))
        self.parent.calls += len(out)
        return out

    def search(self, queries, topk: int = 3):
        return self.parent.search(queries, topk)
