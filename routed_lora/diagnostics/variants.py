"""The LEAS variants as route choices on one routed model (the table in :mod:`routed_lora.diagnostics.evaluate`):
:data:`VARIANT_ROUTES`, :func:`variant_route_pair` and :class:`VariantRouter`, which wraps the DART tag router and
remaps its routes so the model routes each variant by itself in ``generate``.

Must not load models, run rollouts or score anything (that is :mod:`.evaluate`); imports nothing of the package.
"""

from __future__ import annotations

from typing import Sequence

import torch

# (tool positions, context positions); "R" / "T" = the reasoning / tool adapter, None = backbone (-1)
VARIANT_ROUTES = {
    "base": (None, None),
    "reasoning": ("R", "R"),
    "tool": ("T", "T"),
    "unified": ("T", "R"),
    "hybrid_tool": ("T", None),
    "hybrid_reasoning": (None, "R"),
}


def variant_route_pair(variant: str, adapters: Sequence[str] = ("reasoning", "tool")) -> tuple[int, int]:
    """(route of tool positions, route of context positions) for ``variant`` over the model's ``adapters``.

    A two-adapter model needs adapters named ``reasoning`` and ``tool``; a one-adapter (joint) model supports
    ``base`` and ``unified`` (its one adapter everywhere)."""
    if variant not in VARIANT_ROUTES:
        raise ValueError(f"variant: expected one of {tuple(VARIANT_ROUTES)}, got {variant!r}")
    adapters = tuple(adapters)
    if len(adapters) == 1:
        if variant == "base":
            return -1, -1
        if variant == "unified":
            return 0, 0
        raise ValueError(f"variant {variant!r} needs separate reasoning and tool adapters; this model has only "
                         f"{adapters} (a joint checkpoint supports 'base' and 'unified')")
    if "reasoning" not in adapters or "tool" not in adapters:
        raise ValueError(f"variant {variant!r}: expected adapters named 'reasoning' and 'tool', got {adapters}")
    idx = {"R": adapters.index("reasoning"), "T": adapters.index("tool"), None: -1}
    t, c = VARIANT_ROUTES[variant]
    return idx[t], idx[c]


class VariantRouter:
    """Wrap a tag router whose spans mark the tool positions; remap its routes for :attr:`variant`.

    ``inner`` routes tool positions to ``tool_route`` (an adapter index) and everything else to some other
    route; this router returns ``variant_route_pair(variant)`` instead. Change ``variant`` between calls."""

    def __init__(self, inner, variant: str = "unified", *, tool_adapter: str | int = "tool"):
        self.inner = inner
        self.variant = variant
        self.tool_adapter = tool_adapter
        self.adapter_names = getattr(inner, "adapter_names", None)

    def bind(self, adapters: Sequence[str]) -> "VariantRouter":
        if hasattr(self.inner, "bind"):
            self.inner.bind(adapters)
        self.adapter_names = tuple(adapters)
        variant_route_pair(self.variant, self.adapter_names)  # fail early on an unsupported variant
        return self

    def _tool_index(self) -> int:
        if isinstance(self.tool_adapter, int):
            return self.tool_adapter
        names = self.adapter_names or ()
        return names.index(self.tool_adapter) if self.tool_adapter in names else 0

    def remap(self, routes: torch.Tensor) -> torch.Tensor:
        tool_r, ctx_r = variant_route_pair(self.variant, self.adapter_names or ("reasoning", "tool"))
        is_tool = routes == self._tool_index()
        if len(self.adapter_names or ()) == 1:  # joint: the inner router puts the one adapter everywhere
            is_tool = torch.zeros_like(is_tool)
        return torch.where(is_tool, torch.full_like(routes, tool_r), torch.full_like(routes, ctx_r))

    def stream(self, batch_size: int, device=None) -> "_VariantStream":
        return _VariantStream(self, self.inner.stream(batch_size, device=device))

    def __call__(self, input_ids, attention_mask=None):
        return self.remap(self.inner(input_ids, attention_mask))

    def __repr__(self) -> str:
        return f"VariantRouter({self.variant!r}, inner={self.inner!r})"


class _VariantStream:
    def __init__(self, router: VariantRouter, inner):
        self.router, self.inner = router, inner

    @property
    def batch_size(self) -> int:
        return self.inner.batch_size

    def clone(self) -> "_VariantStream":
        return _VariantStream(self.router, self.inner.clone())

    def step(self, input_ids, attention_mask=None):
        return self.router.remap(self.inner.step(input_ids, attention_mask))

    def select(self, index) -> "_VariantStream":  # rows leaving a shared KV cache
        return _VariantStream(self.router, self.inner.select(index))

    def repeat_interleave(self, repeats: int) -> "_VariantStream":
        return _VariantStream(self.router, self.inner.repeat_interleave(repeats))
