"""Our CPU LoRA op for vLLM's punica wrapper: one shrink against the slots the step uses, a per-token slot
selection, one expand GEMM per slice. Pure PyTorch; does not import vLLM (:mod:`.plugin` wires it in).

Notation: vLLM keeps each LoRA layer's adapters stacked by *slot*, one tensor per output slice s = 0..S-1 (S = 3
for a packed q/k/v projection, 2 for gate/up, else 1):

    A_s: (L, 1, R, K)    slot l's A of slice s, zero-padded to the engine's max rank R
    B_s: (L, 1, N_s, R)  slot l's B (vLLM multiplies the LoRA scaling into B when it loads an adapter)
    x: (T, K) tokens,  idx: (T,) slot index of each token in {-1, 0..L-1}, -1 = no LoRA

    y[t, o_s : o_s + N_s] += scale * B_s[idx_t] A_s[idx_t] x_t          for idx_t >= 0; nothing for idx_t = -1
    o_s = offset + N_0 + ... + N_(s-1)

vLLM's CPU ops (lora/ops/torch_ops: bgmv_shrink, bgmv_expand_slice) gather a copy of A_s[idx_t] and B_s[idx_t]
for every token and slice, T (R K + N_s R) numbers moved per slice, then a batched matrix-vector product; and
they read idx_t = -1 as a Python index, i.e. the last slot (upstream defect 1, docs/vllm.md). Here, as in the
layer's lean decode (routed_lora/layer.py ``_decode``, DESIGN.md §1), with U = the used slots (those that own
at least one token this step, u_1 < ... < u_U):

    shrink   h = x A_U^T,  A_U = [A_s[u] for s, for u in U] as one (S U R, K) matrix: ONE GEMM for all slices
             and used slots, viewed (T, S, U, R)
    select   h[t, s, j] *= [u_j == idx_t]    (one-hot mask; all zero for idx_t = -1, so those rows get no term)
    expand   y_s += scale * h[:, s] B_{s,U}   B_{s,U} = [B_s[u]^T for u in U] stacked (U R, N_s): one GEMM over
             all T rows per slice (the masked h is zero outside each token's own slot, so the other slots' rows
             of B_{s,U} add exact zeros and each token gets exactly its own slot's term)

The shrink costs U times the minimal LoRA FLOPs and the expand U times; U <= 2 for a routed model (3 with a
context adapter), a few percent of the backbone GEMM (T K sum N_s) for R <= 16. When one slot owns every token (a
plain-LoRA batch, or a routed decoding step whose tokens all sit on one adapter) the mask is skipped: the same
GEMMs on the same operands, so the same bits.

A_U and B_{s,U} are copies (S U R K and U R N_s numbers): they are built once per adapter load and set of used
slots, not per call, and kept on the layer's stack tensors (:class:`_Stacks`); every in-place write into a stack
(vLLM's ``set_lora`` / ``reset_lora`` at a load or weight sync) moves the tensor's version counter and drops them.

Dtypes follow vLLM's ops: the shrink is computed in the buffer's dtype (float32 by default: vLLM's buffers are
float32), the expand in the output's dtype. On fp32 models (what the plugin's tests run) no casts happen.

vLLM calls the punica wrapper at three levels and the plugin maps each to one function here:
``add_lora_linear`` -> :func:`lora_linear_`; ``add_shrink`` + ``add_expand`` (row-parallel layers: o_proj,
down_proj, whose shrunk buffer may be all-reduced between the two) -> :func:`lora_shrink_` + :func:`lora_expand_`;
``add_lora_logits`` -> :func:`lora_linear_` with the sampler's indices; ``add_lora_embedding`` ->
:func:`lora_expand_`.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["SlotPlan", "lora_linear_", "lora_shrink_", "lora_expand_"]


class SlotPlan:
    """What the ops need to know about one step's slot indices ``idx`` (T,), made once per step and shared by
    every LoRA layer of the model (vLLM sets the indices once per step in ``update_metadata``).

    ``used``: the slots >= 0 that own at least one token, ascending; ``has_none``: some token has slot -1;
    ``masked``: the expand needs the one-hot mask (more than one slot used, or a -1 token beside a used slot)."""

    __slots__ = ("n", "num_slots", "idx", "used", "has_none", "masked", "_onehot")


    def __init__(self, idx: torch.Tensor, num_slots: int) -> None:
        if idx.dim() != 1 or idx.dtype.is_floating_point or idx.dtype == torch.bool:
            raise ValueError(f"idx: expected a 1-D integer tensor of slot indices, got {idx.dtype} of shape "
                             f"{tuple(idx.shape)}")
        vals = set(idx.tolist())  # on the CPU: free of device syncs; T <= max_num_batched_tokens
        bad = sorted(v for v in vals if not -1 <= v < num_slots)
        if bad:
            raise ValueError(f"idx: expected slot indices in [-1, {num_slots}) (num_slots = {num_slots}), "
                             f"got {bad[:8]}")
        self.n, self.num_slots, self.idx = idx.shape[0], int(num_slots), idx
        self.used = tuple(sorted(v for v in vals if v >= 0))
        self.has_none = -1 in vals
        self.masked = len(self.used) > 1 or (self.has_none and bool(self.used))
        self._onehot: dict = {}

    def onehot(self, dtype: torch.dtype) -> torch.Tensor:
        """(T, U) in ``dtype``, one column per used slot (U = len(used)): 1 at (t, u) where idx_t = used[u], else
        0; a row of zeros for idx_t = -1. Made once per dtype."""
        m = self._onehot.get(dtype)
        if m is None:
            used = torch.tensor(self.used, dtype=self.idx.dtype)
            m = self._onehot[dtype] = (self.idx.view(-1, 1) == used.view(1, -1)).to(dtype)
        return m

    def mask(self, n_slices: int, rank: int, dtype: torch.dtype) -> torch.Tensor:
        """(T, S U R): :meth:`onehot` spread over the shrink's columns (slice, used slot, rank), so that masking
        ``h`` is one contiguous elementwise product (a broadcast over a 4-D view costs several times more at
        these sizes). Made once per step and shape."""
        key = (n_slices, rank, dtype)
        m = self._onehot.get(key)
        if m is None:
            oh = self.onehot(dtype)
            m = self._onehot[key] = oh[:, None, :, None].expand(self.n, n_slices, len(self.used), rank) \
                .reshape(self.n, -1).contiguous()
        return m


def _check_stacks(name: str, stacks: Sequence[torch.Tensor], num_slots: int) -> None:
    for s, w in enumerate(stacks):
        if w.dim() not in (3, 4) or (w.dim() == 4 and w.shape[1] != 1) or w.shape[0] != num_slots:
            raise ValueError(f"{name}[{s}]: expected a slot stack of shape (L={num_slots}, 1, rows, cols) or "
                             f"(L, rows, cols), got {tuple(w.shape)}")


def _mat(w: torch.Tensor) -> torch.Tensor:
    """(L, 1, rows, cols) or (L, rows, cols) -> (L, rows, cols), a view."""
    return w[:, 0] if w.dim() == 4 else w


def _versions(tensors) -> tuple | None:
    """The version counters of ``tensors`` (bumped by every in-place write, e.g. vLLM's ``set_lora`` copying an
    adapter into a slot), or None when one is an inference tensor, which keeps no counter (nothing is cached)."""
    try:
        return tuple(t._version for t in tensors)
    except RuntimeError:
        return None


class _Stacks:
    """What one LoRA layer's stacks give every call of a step, built once and kept on the layer's first A stack
    until a stack is replaced or written (its version counter moves):

    - ``a(used, dtype)``: every slice's A of the used slots as one (S U R, K) matrix, rows ordered (slice, used
      slot, rank): the shrink's one GEMM operand (a copy of S U R K numbers, made once per adapter load and set
      of used slots instead of once per call; slots no token uses cost nothing);
    - ``b_t[s][l]``: B_s[l]^T (R, N_s), a view, for the expand of a slot that owns every token;
    - ``b(s, used)``: the used slots' B_s^T stacked (U R, N_s), so a masked expand is one GEMM per slice whatever
      the number of used slots (the masked h is zero outside each token's own slot: the others add exact zeros);
    - ``checked``: the argument shapes already validated against the stacks."""

    __slots__ = ("tensors", "versions", "L", "R", "K", "_a", "_mats", "_bs", "_b", "b_t", "checked")

    @classmethod
    def of(cls, lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor], num_slots: int) -> "_Stacks":
        """The cache of these stacks (``lora_a`` or ``lora_b`` may be empty: the shrink and the expand of a
        row-parallel layer come apart), checked and built when missing or stale."""
        tensors = (*lora_a, *lora_b)
        if not tensors:
            raise ValueError("lora_a/lora_b: expected at least one slot stack, got none")
        versions = _versions(tensors)
        c = getattr(tensors[0], "_routed_lora_stacks", None) if versions is not None else None
        if (c is not None and c.versions == versions and len(c.tensors) == len(tensors)
                and all(a is b for a, b in zip(c.tensors, tensors))):
            return c
        c = cls(lora_a, lora_b, num_slots)
        c.versions = versions
        if versions is not None:
            tensors[0]._routed_lora_stacks = c
        return c

    def __init__(self, lora_a, lora_b, num_slots: int) -> None:
        _check_stacks("lora_a", lora_a, num_slots)
        _check_stacks("lora_b", lora_b, num_slots)
        L = num_slots
        R = lora_a[0].shape[-2] if len(lora_a) else lora_b[0].shape[-1]
        K = lora_a[0].shape[-1] if len(lora_a) else None
        for s, a in enumerate(lora_a):
            if a.shape[-2:] != (R, K):
                raise ValueError(f"lora_a[{s}]: expected (rank R={R}, in_features K={K}) in its last two dims "
                                 f"(as lora_a[0]), got {tuple(a.shape[-2:])}")
        for s, b in enumerate(lora_b):
            if b.shape[-1] != R:
                raise ValueError(f"lora_b[{s}]: expected rank R={R} in its last dim, got {tuple(b.shape[-2:])}")
        self.tensors = (*lora_a, *lora_b)
        self.L, self.R, self.K = L, R, K
        self._mats = [_mat(a) for a in lora_a]  # (L, R, K) views
        self._bs = [_mat(b) for b in lora_b]  # (L, rows, R) views
        self._a: dict = {}
        self._b: dict = {}
        self.b_t = [[b[l].t() for l in range(L)] for b in self._bs]  # (R, rows) views
        self.checked: set = set()

    def a(self, used: tuple, dtype: torch.dtype) -> torch.Tensor:
        a = self._a.get((used, dtype))
        if a is None:
            parts = [m[list(used)] for m in self._mats]  # (U, R, K) each, a gather (copy) per slice
            a = torch.cat(parts).reshape(-1, self.K).to(dtype)
            self._a[(used, dtype)] = a
        return a

    def b(self, s: int, used: tuple) -> torch.Tensor:
        b = self._b.get((s, used))
        if b is None:
            sel = self._bs[s][list(used)]  # (U, rows, R)
            b = self._b[(s, used)] = sel.transpose(1, 2).reshape(len(used) * self.R, sel.shape[1])
        return b

    def check_out(self, y: torch.Tensor, output_slices: Sequence[int], offset: int) -> None:
        key = (y.dim(), y.shape[-1], tuple(output_slices), offset)
        if key in self.checked:
            return
        if y.dim() != 2:
            raise ValueError(f"y: expected a 2-D output (tokens, columns), got shape {tuple(y.shape)}")
        n_b = len(self._bs)
        if len(output_slices) != n_b:
            raise ValueError(f"output_slices: expected one size per lora_b slice ({n_b}), got {len(output_slices)}")
        for s, n in enumerate(output_slices):
            rows = self._bs[s].shape[1]
            if n > rows:
                raise ValueError(f"lora_b[{s}]: expected (>= {n} out rows, rank R={self.R}) in its last two dims, "
                                 f"got {(rows, self.R)}")
        end = offset + sum(output_slices)
        if end > y.shape[1]:
            raise ValueError(f"y: expected at least offset + sum(output_slices) = {end} columns, got {y.shape[1]}")
        self.checked.add(key)


def _shrink_all(x: torch.Tensor, st: _Stacks, plan: SlotPlan, dtype: torch.dtype, n_slices: int):
    """h = x A_used^T viewed (T, S, U, R), in ``dtype``: one GEMM for every slice and used slot; in a masked
    batch each token's other slots' columns are zero (the select step of the module doc)."""
    T = x.shape[0]
    if x.dim() != 2 or x.shape[1] != st.K:
        raise ValueError(f"x: expected (tokens, in_features K={st.K}) as the lora_a stacks, got {tuple(x.shape)}")
    if plan.n != T:
        raise ValueError(f"x: expected {plan.n} rows (one per slot index), got {T}")
    if plan.num_slots != st.L:
        raise ValueError(f"plan: expected {st.L} slots (the stacks' first dim), got {plan.num_slots}")
    h = (x if x.dtype == dtype else x.to(dtype)) @ st.a(plan.used, dtype).t()
    if plan.masked:
        h.mul_(plan.mask(n_slices, st.R, h.dtype))  # each token keeps its own slot's columns only
    return h.view(T, n_slices, len(plan.used), st.R)


def _addmm_(out: torch.Tensor, h: torch.Tensor, w: torch.Tensor, alpha: float) -> None:
    """out += alpha * h w, with ``out`` (T, N) possibly a strided column slice of y; operands cast to its dtype."""
    if h.dtype != out.dtype:
        h = h.to(out.dtype)
    if w.dtype != out.dtype:
        w = w.to(out.dtype)
    out.addmm_(h, w, alpha=alpha)


def lora_linear_(y: torch.Tensor, x: torch.Tensor, lora_a: Sequence[torch.Tensor],
                 lora_b: Sequence[torch.Tensor], scale: float, output_slices: Sequence[int], plan: SlotPlan,
                 *, offset: int = 0, shrink_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``y[t, o_s:o_s+N_s] += scale * B_s[idx_t] A_s[idx_t] x_t`` for every slice s, in place (module doc).

    ``y``: (T, >= offset + sum N_s); ``x``: (T, K); ``lora_a``/``lora_b``: one slot stack per slice;
    ``output_slices``: N_s (an N_s below B_s's row count uses its first N_s rows: vLLM's logits layer pads the
    vocabulary); ``plan``: the step's :class:`SlotPlan`. Returns ``y``.

    Expand: a slot that owns every token is one GEMM per slice with its own B_s (the same operands as a plain
    LoRA batch, so the same bits); a masked batch is one GEMM per slice against the used slots' B_s stacked."""
    if len(lora_a) != len(lora_b):
        raise ValueError(f"lora_a/lora_b: expected one stack per slice in both, got {len(lora_a)} and "
                         f"{len(lora_b)}")
    st = _Stacks.of(lora_a, lora_b, plan.num_slots)
    st.check_out(y, output_slices, offset)
    T = x.shape[0]
    if y.shape[0] != T:
        raise ValueError(f"y: expected a 2-D output with {T} rows (one per token, as x), got {tuple(y.shape)}")
    if not plan.used or T == 0:
        return y  # every token on -1 (or none): the backbone alone
    h = _shrink_all(x, st, plan, shrink_dtype, len(lora_a))
    alpha = float(scale)
    o = offset
    if plan.masked:
        UR = len(plan.used) * st.R
        for s, n in enumerate(output_slices):
            if n:
                _addmm_(y[:, o:o + n], h[:, s].reshape(T, UR), st.b(s, plan.used)[:, :n], alpha)
            o += n
    else:
        l = plan.used[0]
        for s, n in enumerate(output_slices):
            if n:
                _addmm_(y[:, o:o + n], h[:, s, 0], st.b_t[s][l][:, :n], alpha)
            o += n
    return y


def lora_shrink_(buffers, x: torch.Tensor, lora_a: Sequence[torch.Tensor], scale: float,
                 plan: SlotPlan) -> None:
    """``buffers[s][t, :R] = scale * A_s[idx_t] x_t`` (zero for idx_t = -1), each token's own slot's R values.

    ``buffers``: one (T, >= R) tensor per slice, or an (S, T, >= R) tensor (vLLM passes both). Assigns, as vLLM's
    ``bgmv_shrink`` does (its buffers arrive zeroed, so "add" and "assign" agree there)."""
    if len(buffers) != len(lora_a):
        raise ValueError(f"buffers: expected one per lora_a slice ({len(lora_a)}), got {len(buffers)}")
    st = _Stacks.of(lora_a, (), plan.num_slots)
    T, R = x.shape[0], st.R
    for s in range(len(lora_a)):
        bs = buffers[s]
        if bs.dim() != 2 or bs.shape[0] != T or bs.shape[1] < R:
            raise ValueError(f"buffers[{s}]: expected shape ({T}, >= {R}), got {tuple(bs.shape)}")
    if not plan.used or T == 0:
        for s in range(len(lora_a)):
            buffers[s][:, :R] = 0
        return
    h = _shrink_all(x, st, plan, buffers[0].dtype, len(lora_a))
    if plan.masked:
        # sum over slots of the masked h: each token keeps its own slot's R values (the others add exact zeros)
        sel = h.sum(2)
    else:
        sel = h[:, :, 0]  # one slot owns every token
    if scale != 1.0:
        sel = sel * scale
    for s in range(len(lora_a)):
        buffers[s][:, :R] = sel[:, s]


def lora_expand_(y: torch.Tensor, buffers, lora_b: Sequence[torch.Tensor], output_slices: Sequence[int],
                 plan: SlotPlan, *, offset: int = 0, add_inputs: bool = True) -> torch.Tensor:
    """``y[t, o_s:o_s+N_s] (+)= B_s[idx_t] buffers[s][t]`` for idx_t >= 0; rows with idx_t = -1 get nothing
    (with ``add_inputs=False`` their slice is set to zero, as vLLM's ``bgmv_expand_slice`` would write B @ 0).

    ``buffers[s]``: (T, R), each token's own slot's shrunk values (from :func:`lora_shrink_`, possibly reduced
    across ranks in between, or the embedding layer's gathered A rows). In a masked batch each buffer row is
    spread to its own slot's R columns of a (T, U R) matrix (zeros elsewhere; U the used slots), one GEMM per
    slice against the used slots' B stacked, so a token's buffer row only ever meets its own slot's B."""
    st = _Stacks.of((), lora_b, plan.num_slots)
    st.check_out(y, output_slices, offset)
    T, R = y.shape[0], st.R
    if len(buffers) != len(lora_b):
        raise ValueError(f"buffers: expected one per lora_b slice ({len(lora_b)}), got {len(buffers)}")
    for s in range(len(lora_b)):
        if buffers[s].shape[0] != T or buffers[s].shape[-1] < R:
            raise ValueError(f"buffers[{s}]: expected shape ({T}, >= {R}), got {tuple(buffers[s].shape)}")
    if not add_inputs:
        y[:, offset:offset + sum(output_slices)] = 0
    if not plan.used or T == 0:
        return y
    o = offset
    for s, n in enumerate(output_slices):
        buf = buffers[s][:, :R]
        if n:
            if not plan.masked:
                _addmm_(y[:, o:o + n], buf, st.b_t[s][plan.used[0]][:, :n], 1.0)
            else:
                spread = (plan.onehot(buf.dtype)[:, :, None] * buf[:, None, :]).reshape(T, len(plan.used) * R)
                _addmm_(y[:, o:o + n], spread, st.b(s, plan.used)[:, :n], 1.0)
        o += n
    return y
