"""``TagRouter``: the route of every position from the tags seen so far (DESIGN.md §2).

A position p reads token t_p; its route depends on t_0..t_p only (causal), so training and generation compute
the same routes. With ``spans={"tool": ("<search>", "</search>")}``:

- from the position holding (the last piece of) ``<search>`` up to, not including, the position where
  ``</search>`` is complete: the tool adapter (it writes the query and the closing tag);
- everything else (prompt, ``<think>``, ``<answer>``, ``<information>`` text, padding): ``default``.

Several spans may be given; one span is open at a time: an opening tag opens its span (replacing an open one),
the closing tag of the open span closes it, other closing tags are ignored.

Two modes, chosen from the tokenizer:

- ``"tokens"``: every tag is a single token. The batch form is vectorized (cumulative maxima over positions,
  no Python loop over tokens); the streaming state is one integer per sequence.
- ``"text"``: some tag is several ordinary tokens. The router decodes each token on its own
  (``tokenizer.decode([id])``), concatenates the pieces and finds tags in that text incrementally; a tag is seen
  at the position of its last piece. Whole-sequence routing runs the same incremental code, so training and
  generation agree.

Batch form: ``router(input_ids, attention_mask=None) -> routes`` (positions with ``attention_mask == 0`` are
skipped by the state machine and get the default route; left and right padding both work). Streaming form:
``stream = router.stream(batch_size)``, then ``stream.step(new_ids)`` with (batch,) or (batch, n) new tokens
returns their routes and keeps per-sequence state.

Packed rows (several sequences in one row, as flash-attention varlen and veRL's remove-padding use): pass
``position_ids`` (restarting at each sequence) or ``cu_seqlens`` (the sequence offsets in the flattened row)
and the router restarts at every sequence boundary, so a ``<search>`` left open at the end of one sequence
does not carry into the next. A boundary is where ``position_ids[t] - position_ids[t-1] != 1``, the rule
transformers uses to build the attention mask of packed rows (``find_packed_sequence_indices``).
:func:`route_packed` does this for any router callable: each sequence is routed on its own.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

__all__ = ["TagRouter", "RouterStream", "sequence_starts", "route_packed"]

_NO_SPAN = -1


class TagRouter:
    """Map token ids to adapter routes by tag spans.

    Args:
        tokenizer: a transformers tokenizer (``encode``/``decode``).
        spans: ``{adapter: (open_tag, close_tag)}``; adapter by name or index.
        default: the route outside every span: an adapter name or index, or ``None`` / ``-1`` for the backbone.
        adapters: the model's adapter names, to turn names into indices. ``apply_routed_lora(..., router=...)``
            fills it in from the model when left as ``None``.
        mode: ``"auto"`` (tokens when every tag is a single token, else text), ``"tokens"`` or ``"text"``.
    """

    def __init__(
        self,
        tokenizer,
        spans: Mapping[str | int, tuple[str, str]] | None = None,
        default: str | int | None = "reasoning",
        *,
        adapters: Sequence[str] | None = None,
        mode: str = "auto",
    ) -> None:
        if spans is None:
            spans = {"tool": ("<search>", "</search>")}
        if not isinstance(spans, Mapping) or not spans:
            raise ValueError(f"spans: expected a non-empty mapping {{adapter: (open, close)}}, got {spans!r}")
        tags: list[str] = []
        self.span_targets: list[str | int] = []
        self.span_tags: list[tuple[str, str]] = []
        for target, pair in spans.items():
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(t, str) and t for t in pair)):
                raise ValueError(f"spans[{target!r}]: expected (open_tag, close_tag) non-empty strings, got {pair!r}")
            _check_target(target, f"spans key {target!r}")
            self.span_targets.append(target)
            self.span_tags.append((pair[0], pair[1]))
            tags.extend(pair)
        dup = sorted({t for t in tags if tags.count(t) > 1})
        if dup:
            raise ValueError(f"spans: every tag must be distinct, got {dup} more than once")
        if default is not None:
            _check_target(default, "default")
        self.default = default
        if mode not in ("auto", "tokens", "text"):
            raise ValueError(f"mode: expected 'auto', 'tokens' or 'text', got {mode!r}")
        self.tokenizer = tokenizer
        single = {t: _single_token_id(tokenizer, t) for t in tags}
        if mode == "auto":
            mode = "tokens" if all(v is not None for v in single.values()) else "text"
        elif mode == "tokens" and any(v is None for v in single.values()):
            bad = [t for t, v in single.items() if v is None]
            raise ValueError(f"mode='tokens': tags {bad} are not single tokens of this tokenizer; use mode='text'")
        self.mode = mode
        self.open_ids = [single[o] for o, _ in self.span_tags]
        self.close_ids = [single[c] for _, c in self.span_tags]
        self._max_tag_len = max(len(t) for t in tags)
        self._piece_cache: dict[int, str] = {}
        self._device_cache: dict = {}
        self.adapter_names: tuple[str, ...] | None = None
        self._span_routes: list[int] | None = None
        self._default_route: int | None = None
        if adapters is not None:
            self.bind(adapters)
        elif all(isinstance(t, int) for t in [*self.span_targets, self.default if self.default is not None else -1]):
            self._resolve(None)

    # -- set-up -------------------------------------------------------------------------------------------
    def bind(self, adapters: Sequence[str]) -> "TagRouter":
        """Resolve adapter names against ``adapters`` (the model's adapter names, in index order)."""
        names = tuple(adapters)
        if self.adapter_names is not None and self.adapter_names != names:
            raise ValueError(
                f"TagRouter: already bound to adapters {self.adapter_names}, cannot bind to {names}; "
                "build a router per model"
            )
        self._resolve(names)
        self.adapter_names = names
        return self

    def _resolve(self, names):
        def index(target, what):
            if target is None or (isinstance(target, int) and target == -1):
                return -1
            if isinstance(target, int):
                if names is not None and not 0 <= target < len(names):
                    raise ValueError(f"TagRouter {what}: adapter index {target} out of range for {names}")
                return target
            if names is None:
                raise RuntimeError(
                    f"TagRouter {what}: adapter {target!r} given by name but the router does not know the model's "
                    "adapter names; pass adapters=(...) or use apply_routed_lora(..., router=router)"
                )
            if target not in names:
                raise ValueError(f"TagRouter {what}: unknown adapter {target!r}; the model's adapters are {names}")
            return names.index(target)

        self._span_routes = [index(t, f"span {t!r}") for t in self.span_targets]
        self._default_route = index(self.default, "default")

    def _routes_table(self, device) -> torch.Tensor:
        """(S + 1,) route of each span state; entry S (index -1) is the default."""
        return self._tensors(device)[0]

    def _tensors(self, device) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(route table, opening tag ids, closing tag ids) on ``device``, cached (no copy per decoding step)."""
        if self._span_routes is None:
            self._resolve(self.adapter_names)
        key = (str(torch.device(device)), tuple(self._span_routes), self._default_route)
        cached = self._device_cache.get(key)
        if cached is None:
            table = torch.tensor([*self._span_routes, self._default_route], dtype=torch.long, device=device)
            if self.mode == "tokens":
                o = torch.tensor(self.open_ids, dtype=torch.long, device=device)
                c = torch.tensor(self.close_ids, dtype=torch.long, device=device)
            else:
                o = c = None
            cached = self._device_cache[key] = (table, o, c)
        return cached

    def piece(self, token_id: int) -> str:
        """The text of one token on its own (text mode)."""
        s = self._piece_cache.get(token_id)
        if s is None:
            s = self.tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            self._piece_cache[token_id] = s
        return s

    # -- routing ------------------------------------------------------------------------------------------
    def stream(self, batch_size: int, device: torch.device | str | None = None) -> "RouterStream":
        """A fresh streaming state for ``batch_size`` sequences (all outside every span)."""
        return RouterStream(self, batch_size, device)

    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        packed: bool = False,
    ) -> torch.Tensor:
        """Routes (same shape as ``input_ids``, int64) for whole sequences, (seq,) or (batch, seq).

        Packed rows: give ``position_ids`` or ``cu_seqlens`` (module doc); ``packed=True`` makes giving
        neither an error (instead of routing the row as one sequence)."""
        if position_ids is not None or cu_seqlens is not None or packed:
            return route_packed(self._route_rows, input_ids, attention_mask, position_ids=position_ids,
                                cu_seqlens=cu_seqlens)
        return self._route_rows(input_ids, attention_mask)

    def _route_rows(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        ids = _check_ids(input_ids)
        squeeze = ids.dim() == 1
        ids2 = ids.unsqueeze(0) if squeeze else ids
        stream = self.stream(ids2.shape[0], device=ids2.device)
        mask = None if attention_mask is None else (attention_mask.unsqueeze(0) if squeeze else attention_mask)
        routes = stream.step(ids2, mask)
        return routes[0] if squeeze else routes

    def to_dict(self) -> dict:
        """A JSON-able description (saved in ``routed_lora.json``); :meth:`from_dict` rebuilds the router."""
        return {
            "type": "TagRouter",
            "spans": [[t, list(tags)] for t, tags in zip(self.span_targets, self.span_tags)],
            "default": self.default,
            "mode": self.mode,
        }

    @classmethod
    def from_dict(cls, tokenizer, d: Mapping, *, adapters: Sequence[str] | None = None) -> "TagRouter":
        if d.get("type") != "TagRouter":
            raise ValueError(f"from_dict: expected a TagRouter description, got type {d.get('type')!r}")
        spans = {t: tuple(tags) for t, tags in d["spans"]}
        return cls(tokenizer, spans, d.get("default"), adapters=adapters, mode=d.get("mode", "auto"))

    def __repr__(self) -> str:
        spans = {t: tags for t, tags in zip(self.span_targets, self.span_tags)}
        return f"TagRouter(spans={spans}, default={self.default!r}, mode={self.mode!r})"


class RouterStream:
    """Per-sequence router state; feed new tokens with :meth:`step`.

    ``state``: in tokens mode a (batch,) int64 tensor, the open span (-1: none); in text mode a list of
    ``[open_span, text_tail]`` per sequence.
    """

    def __init__(self, router: TagRouter, batch_size: int, device=None) -> None:
        if not isinstance(batch_size, int) or batch_size < 0:
            raise ValueError(f"batch_size: expected an integer >= 0, got {batch_size!r}")
        self.router = router
        self.batch_size = batch_size
        if router.mode == "tokens":
            self.state = torch.full((batch_size,), _NO_SPAN, dtype=torch.long, device=device)
        else:
            self.state = [[_NO_SPAN, ""] for _ in range(batch_size)]

    def clone(self) -> "RouterStream":
        new = RouterStream.__new__(RouterStream)
        new.router, new.batch_size = self.router, self.batch_size
        new.state = self.state.clone() if isinstance(self.state, torch.Tensor) else [list(s) for s in self.state]
        return new

    def select(self, index) -> "RouterStream":
        """A stream holding the states of sequences ``index`` (beam search reordering, batch selection)."""
        idx = torch.as_tensor(index, dtype=torch.long).reshape(-1)
        new = RouterStream.__new__(RouterStream)
        new.router, new.batch_size = self.router, int(idx.numel())
        if isinstance(self.state, torch.Tensor):
            new.state = self.state[idx.to(self.state.device)].clone()
        else:
            new.state = [list(self.state[i]) for i in idx.tolist()]
        return new

    def repeat_interleave(self, repeats: int) -> "RouterStream":
        """Each sequence's state ``repeats`` times in a row (expanding a batch for beams or samples)."""
        return self.select(torch.arange(self.batch_size).repeat_interleave(int(repeats)))

    def step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Feed ``input_ids`` ((batch,) one token each, or (batch, n)); return their routes (same shape).

        Positions where ``attention_mask`` is 0 (padding) do not change the state and get the default route.
        """
        ids = _check_ids(input_ids)
        one = ids.dim() == 1
        if one:
            ids = ids.unsqueeze(1)
        if ids.shape[0] != self.batch_size:
            raise ValueError(
                f"input_ids: expected {self.batch_size} sequences (the stream's batch size), got {ids.shape[0]}"
            )
        mask = None
        if attention_mask is not None:
            mask = attention_mask.unsqueeze(1) if attention_mask.dim() == 1 else attention_mask
            if tuple(mask.shape) != tuple(ids.shape):
                raise ValueError(
                    f"attention_mask: expected shape {tuple(input_ids.shape)} (input_ids'), "
                    f"got {tuple(attention_mask.shape)}"
                )
            mask = mask.to(ids.device).bool()
        if self.router.mode == "tokens":
            routes = self._step_tokens(ids, mask)
        else:
            routes = self._step_text(ids, mask)
        return routes[:, 0] if one else routes

    def _step_tokens(self, ids, mask):
        r = self.router
        B, T = ids.shape
        device = ids.device
        if self.state.device != device:
            self.state = self.state.to(device)
        table, open_ids, close_ids = r._tensors(device)
        if T == 0:
            return torch.empty((B, 0), dtype=torch.long, device=device)
        is_open = ids.unsqueeze(-1) == open_ids  # (B, T, S)
        is_close = ids.unsqueeze(-1) == close_ids
        if mask is not None:
            is_open &= mask.unsqueeze(-1)
            is_close &= mask.unsqueeze(-1)
        pos = torch.arange(T, device=device).view(1, T)
        opened = is_open.any(-1)
        open_span = torch.where(opened, is_open.long().argmax(-1), torch.full_like(ids, _NO_SPAN, dtype=torch.long))
        # Position of the last opening tag at or before p (-1: none; then the span open before this call holds).
        last_open = torch.where(opened, pos, torch.full_like(pos, -1)).cummax(dim=1).values  # (B, T)
        span = torch.gather(open_span, 1, last_open.clamp(min=0))
        span = torch.where(last_open >= 0, span, self.state.view(B, 1).expand(B, T))
        # Last closing tag of each span at or before p; the open span is closed if its closing tag came later.
        last_close = torch.where(is_close, pos.unsqueeze(-1), torch.full_like(pos.unsqueeze(-1), -1))
        last_close = last_close.cummax(dim=1).values  # (B, T, S)
        closed_at = torch.gather(last_close, 2, span.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        state = torch.where((span >= 0) & (closed_at <= last_open), span, torch.full_like(span, _NO_SPAN))
        self.state = state[:, -1].clone()
        routes = table[state]  # state -1 picks the last entry, the default
        if mask is not None:
            routes = torch.where(mask, routes, table[-1])
        return routes

    def _step_text(self, ids, mask):
        r = self.router
        B, T = ids.shape
        table = r._routes_table("cpu").tolist()  # cached
        default = table[-1]
        ids_l = ids.tolist()
        mask_l = None if mask is None else mask.tolist()
        keep = r._max_tag_len - 1
        opens = [o for o, _ in r.span_tags]
        closes = [c for _, c in r.span_tags]
        out = [[default] * T for _ in range(B)]
        for b in range(B):
            span, tail = self.state[b]
            row = out[b]
            for t in range(T):
                if mask_l is not None and not mask_l[b][t]:
                    continue
                buf = tail + r.piece(ids_l[b][t])
                start = len(tail)
                events = []  # (end position, kind, span)
                for k in range(len(opens)):
                    for tag, kind in ((opens[k], 1), (closes[k], 0)):
                        i = buf.find(tag, max(0, start - len(tag) + 1))
                        while i != -1:
                            if i + len(tag) > start:
                                events.append((i + len(tag), kind, k))
                            i = buf.find(tag, i + 1)
                for _, kind, k in sorted(events):
                    if kind == 1:
                        span = k
                    elif span == k:
                        span = _NO_SPAN
                tail = buf[-keep:] if keep > 0 else ""
                row[t] = table[span]
            self.state[b] = [span, tail]
        return torch.tensor(out, dtype=torch.long, device=ids.device).view(B, T)


def sequence_starts(
    shape: tuple[int, ...],
    *,
    position_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    device=None,
) -> torch.Tensor:
    """Bool (batch, seq) tensor, True at the first position of every sequence of packed rows of ``shape``.

    ``position_ids`` (batch, seq) or (seq,): a sequence starts where ``position_ids[t] - position_ids[t-1] != 1``
    (transformers' rule) and at t = 0. ``cu_seqlens`` (n + 1,) increasing offsets from 0 to batch * seq into the
    flattened rows (flash-attention's ``cu_seqlens``; veRL's nested-tensor ``offsets()``); rows also start a
    sequence. Raises a clear error if neither is given or they do not fit ``shape``."""
    if len(shape) == 1:
        shape = (1, shape[0])
    B, T = int(shape[0]), int(shape[1])
    if position_ids is None and cu_seqlens is None:
        raise ValueError(
            "packed rows need sequence boundaries: pass position_ids (restarting at 0 for each sequence) or "
            "cu_seqlens (offsets of each sequence in the flattened rows, starting at 0)"
        )
    if position_ids is not None:
        pos = position_ids if position_ids.dim() == 2 else position_ids.reshape(1, -1)
        if tuple(pos.shape) != (B, T):
            raise ValueError(f"position_ids: expected shape {(B, T)} (input_ids'), got {tuple(position_ids.shape)}")
        if pos.dtype.is_floating_point or pos.dtype == torch.bool:
            raise TypeError(f"position_ids: expected an integer tensor, got {pos.dtype}")
        starts = torch.ones(B, T, dtype=torch.bool, device=pos.device)
        if T > 1:
            starts[:, 1:] = (pos[:, 1:] - pos[:, :-1]) != 1
        return starts if device is None else starts.to(device)
    cu = torch.as_tensor(cu_seqlens).reshape(-1).long().cpu()
    if cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != B * T or bool((cu[1:] <= cu[:-1]).any()):
        raise ValueError(
            f"cu_seqlens: expected strictly increasing offsets from 0 to {B * T} (batch * seq), got {cu.tolist()}"
        )
    starts = torch.zeros(B * T, dtype=torch.bool)
    starts[cu[:-1]] = True
    starts = starts.view(B, T)
    starts[:, 0] = True
    return starts.to(device if device is not None else "cpu")


def route_packed(
    router,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    position_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    starts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Routes of packed rows: each sequence (see :func:`sequence_starts`) routed by ``router(ids, mask)`` on its
    own, as if it were a row of a padded batch. Same shape as ``input_ids``; int64."""
    ids = _check_ids(input_ids)
    squeeze = ids.dim() == 1
    ids2 = ids.unsqueeze(0) if squeeze else ids
    B, T = ids2.shape
    if starts is None:
        starts = sequence_starts((B, T), position_ids=position_ids, cu_seqlens=cu_seqlens, device=ids2.device)
    mask = None
    if attention_mask is not None:
        mask = attention_mask.unsqueeze(0) if attention_mask.dim() == 1 else attention_mask
        if tuple(mask.shape) != (B, T):
            raise ValueError(f"attention_mask: expected shape {(B, T)} (input_ids'), got {tuple(attention_mask.shape)}")
    if T == 0 or not bool(starts[:, 1:].any()):
        out = router(ids2, mask)
    else:
        flat = starts.reshape(-1)
        seg = flat.long().cumsum(0) - 1  # sequence index of every position (rows start sequences)
        first = flat.nonzero().flatten()
        off = torch.arange(B * T, device=ids2.device) - first[seg]
        lens = torch.diff(torch.cat([first, first.new_tensor([B * T])]))
        S, Lmax = int(first.numel()), int(lens.max())
        pid = torch.zeros(S, Lmax, dtype=ids2.dtype, device=ids2.device)
        pm = torch.zeros(S, Lmax, dtype=torch.long, device=ids2.device)
        pid[seg, off] = ids2.reshape(-1)
        pm[seg, off] = 1 if mask is None else mask.reshape(-1).long().to(ids2.device)
        routes = torch.as_tensor(router(pid, pm)).to(ids2.device).long()
        out = routes[seg, off].view(B, T)
    out = torch.as_tensor(out).long()
    return out[0] if squeeze else out


def _check_target(target, what):
    if isinstance(target, bool) or not isinstance(target, (str, int)):
        raise TypeError(f"TagRouter {what}: expected an adapter name or index, got {target!r}")
    if isinstance(target, int) and target < -1:
        raise ValueError(f"TagRouter {what}: expected an adapter index >= 0 (or -1), got {target}")


def _check_ids(input_ids) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids: expected an integer torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids: expected an integer dtype, got {input_ids.dtype}")
    if input_ids.dim() not in (1, 2):
        raise ValueError(f"input_ids: expected shape (seq,) or (batch, seq), got {tuple(input_ids.shape)}")
    return input_ids


def _single_token_id(tokenizer, tag: str) -> int | None:
    """The id of ``tag`` if the tokenizer encodes it as exactly one token, else None."""
    ids = tokenizer.encode(tag, add_special_tokens=False)
    if len(ids) != 1:
        return None
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and ids[0] == unk:
        return None
    return int(ids[0])
