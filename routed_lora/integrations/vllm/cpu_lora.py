"""Our CPU LoRA op for vLLM's punica wrapper: one shrink against every slot, a per-token slot selection, one
expand GEMM per slice and used slot. Pure PyTorch; does not import vLLM (:mod:`.plugin` wires it in).

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
layer's lean decode (routed_lora/layer.py ``_decode``, DESIGN.md §1):

    shrink   h = x A_all^T,  A_all = [A_0; ...; A_(S-1)] reshaped (S L R, K): ONE GEMM for all slices and slots,
             viewed (T, S, L, R)
    select   h[t, s, l] *= [l == idx_t]      (one-hot mask; all zero for idx_t = -1, so those rows get no term)
    expand   y_s += scale * sum over used slots l of  h[:, s, l] B_s[l]^T     (one GEMM over all T rows per used
             slot: rows of other slots are exact zeros there, so each token gets exactly its own slot's term)

The shrink costs L times the minimal LoRA FLOPs (every slot is computed for every token) and the expand |used|
times; for L <= 4 and R <= 16 that is a few percent of the backbone GEMM (T K sum N_s). When one slot owns
every token (a plain-LoRA batch, or a routed decoding step whose tokens all sit on one adapter) the mask is
skipped: the same GEMMs on the same operands, so the same bits.

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
        """(T, L) in ``dtype``: 1 at (t, idx_t), else 0; a row of zeros for idx_t = -1. Made once per dtype."""
        m = self._onehot.get(dtype)
        if m is None:
            L = self.num_slots
            # slot -1 goes to an extra column L, dropped: its row stays all zero
            col = torch.where(self.idx < 0, L, self.idx).view(-1, 1)
            m = torch.zeros(self.n, L + 1, dtype=dtype).scatter_(1, col, 1.0)[:, :L]
            self._onehot[dtype] = m
        return m


def _check_stacks(name: str, stacks: Sequence[torch.Tensor], num_slots: int) -> None:
    for s, w in enumerate(stacks):
        if w.dim() not in (3, 4) or (w.dim() == 4 and w.shape[1] != 1) or w.shape[0] != num_slots:
            raise ValueError(f"{name}[{s}]: expected a slot stack of shape (L={num_slots}, 1, rows, cols) or "
                             f"(L, rows, cols), got {tuple(w.shape)}")


def _mat(w: torch.Tensor) -> torch.Tensor:
    """(L, 1, rows, cols) or (L, rows, cols) -> (L, rows, cols), a view."""
    return w[:, 0] if w.dim() == 4 else w


def _shrink_all(x: torch.Tensor, lora_a: Sequence[torch.Tensor], plan: SlotPlan, dtype: torch.dtype):
    """h = x A_all^T viewed (T, S, L, R), in ``dtype``: one GEMM for every slice and slot."""
    T, K = x.shape
    if plan.n != T:
        raise ValueError(f"x: expected {plan.n} rows (one per slot index), got {T}")
    _check_stacks("lora_a", lora_a, plan.num_slots)
    L, R = plan.num_slots, lora_a[0].shape[-2]
    for s, a in enumerate(lora_a):
        if a.shape[-1] != K or a.shape[-2] != R:
            raise ValueError(f"lora_a[{s}]: expected (rank R={R}, in_features K={K}) in its last two dims "
                             f"(x has K={K}), got {tuple(a.shape[-2:])}")
    # the slices are separate tensors: one copy of S*L*R*K numbers (small beside x) buys one GEMM for them all
    mats = [_mat(a).reshape(L * R, K) for a in lora_a]
    a_all = mats[0] if len(mats) == 1 else torch.cat(mats)
    h = x.to(dtype) @ a_all.to(dtype).t()
    return h.view(T, len(lora_a), L, R)


def _expand_slot_(out: torch.Tensor, h_l: torch.Tensor, b_l: torch.Tensor, alpha: float) -> None:
    """out += alpha * h_l b_l^T, with b_l (N, R) and out (T, N) possibly a strided column slice of y."""
    if h_l.dtype != out.dtype:
        h_l = h_l.to(out.dtype)
    if b_l.dtype != out.dtype:
        b_l = b_l.to(out.dtype)
    out.addmm_(h_l, b_l.t(), alpha=alpha)


def _expand_from_slots_(y: torch.Tensor, h: torch.Tensor, lora_b: Sequence[torch.Tensor],
                        output_slices: Sequence[int], plan: SlotPlan, offset: int, alpha: float) -> None:
    """y_s += alpha * sum over used l of h[:, s, l] B_s[l]^T; ``h`` (T, S, L, R) already masked if the plan is."""
    o = offset
    for s, n in enumerate(output_slices):
        b = _mat(lora_b[s])
        if n:
            ys = y[:, o:o + n]
            for l in plan.used:
                _expand_slot_(ys, h[:, s, l], b[l, :n], alpha)
        o += n


def _check_out(y: torch.Tensor, T: int, lora_b, output_slices, offset: int, num_slots: int, R: int) -> None:
    if y.dim() != 2 or y.shape[0] != T:
        raise ValueError(f"y: expected a 2-D output with {T} rows (one per token), got {tuple(y.shape)}")
    if len(lora_b) != len(output_slices):
        raise ValueError(f"output_slices: expected one size per lora_b slice ({len(lora_b)}), got "
                         f"{len(output_slices)}")
    _check_stacks("lora_b", lora_b, num_slots)
    for s, (b, n) in enumerate(zip(lora_b, output_slices)):
        if b.shape[-1] != R or b.shape[-2] < n:
            raise ValueError(f"lora_b[{s}]: expected (>= {n} out rows, rank R={R}) in its last two dims, got "
                             f"{tuple(b.shape[-2:])}")
    end = offset + sum(output_slices)
    if end > y.shape[1]:
        raise ValueError(f"y: expected at least offset + sum(output_slices) = {end} columns, got {y.shape[1]}")


def lora_linear_(y: torch.Tensor, x: torch.Tensor, lora_a: Sequence[torch.Tensor],
                 lora_b: Sequence[torch.Tensor], scale: float, output_slices: Sequence[int], plan: SlotPlan,
                 *, offset: int = 0, shrink_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``y[t, o_s:o_s+N_s] += scale * B_s[idx_t] A_s[idx_t] x_t`` for every slice s, in place (module doc).

    ``y``: (T, >= offset + sum N_s); ``x``: (T, K); ``lora_a``/``lora_b``: one slot stack per slice;
    ``output_slices``: N_s (an N_s below B_s's row count uses its first N_s rows: vLLM's logits layer pads the
    vocabulary); ``plan``: the step's :class:`SlotPlan`. Returns ``y``."""
    if len(lora_a) != len(lora_b):
        raise ValueError(f"lora_a/lora_b: expected one stack per slice in both, got {len(lora_a)} and "
                         f"{len(lora_b)}")
    T = x.shape[0]
    R = lora_a[0].shape[-2] if len(lora_a) else 0
    _check_out(y, T, lora_b, output_slices, offset, plan.num_slots, R)
    if not plan.used or T == 0:
        return y  # every token on -1 (or none): the backbone alone
    h = _shrink_all(x, lora_a, plan, shrink_dtype)
    if plan.masked:
        h.mul_(plan.onehot(h.dtype)[:, None, :, None])
    _expand_from_slots_(y, h, lora_b, output_slices, plan, offset, float(scale))
    return y


def lora_shrink_(buffers, x: torch.Tensor, lora_a: Sequence[torch.Tensor], scale: float,
                 plan: SlotPlan) -> None:
    """``buffers[s][t, :R] = scale * A_s[idx_t] x_t`` (zero for idx_t = -1), each token's own slot's R values.

    ``buffers``: one (T, >= R) tensor per slice, or an (S, T, >= R) tensor (vLLM passes both). Assigns, as vLLM's
    ``bgmv_shrink`` does (its buffers arrive zeroed, so "add" and "assign" agree there)."""
    if len(buffers) != len(lora_a):
        raise ValueError(f"buffers: expected one per lora_a slice ({len(lora_a)}), got {len(buffers)}")
    T = x.shape[0]
    R = lora_a[0].shape[-2] if len(lora_a) else 0
    for s in range(len(lora_a)):
        bs = buffers[s]
        if bs.dim() != 2 or bs.shape[0] != T or bs.shape[1] < R:
            raise ValueError(f"buffers[{s}]: expected shape ({T}, >= {R}), got {tuple(bs.shape)}")
    if not plan.used or T == 0:
        for s in range(len(lora_a)):
            buffers[s][:, :R] = 0
        return
    h = _shrink_all(x, lora_a, plan, buffers[0].dtype)
    if plan.masked:
        # sum over slots of the masked h: each token keeps its own slot's R values (the others add exact zeros)
        sel = (h * plan.onehot(h.dtype)[:, None, :, None]).sum(2)
    else:
        sel = h[:, :, plan.used[0]]  # one slot owns every token
    if scale != 1.0:
        sel = sel * scale
    for s in range(len(lora_a)):
        buffers[s][:, :R] = sel[:, s]


def lora_expand_(y: torch.Tensor, buffers, lora_b: Sequence[torch.Tensor], output_slices: Sequence[int],
                 plan: SlotPlan, *, offset: int = 0, add_inputs: bool = True) -> torch.Tensor:
    """``y[t, o_s:o_s+N_s] (+)= B_s[idx_t] buffers[s][t]`` for idx_t >= 0; rows with idx_t = -1 get nothing
    (with ``add_inputs=False`` their slice is set to zero, as vLLM's ``bgmv_expand_slice`` would write B @ 0).

    ``buffers[s]``: (T, R), each token's own slot's shrunk values (from :func:`lora_shrink_`, possibly reduced
    across ranks in between, or the embedding layer's gathered A rows). Rows are split by slot with the plan's
    one-hot mask, so a token's buffer row only ever meets its own slot's B."""
    T = y.shape[0]
    R = lora_b[0].shape[-1] if len(lora_b) else 0
    _check_out(y, T, lora_b, output_slices, offset, plan.num_slots, R)
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
        b, buf = _mat(lora_b[s]), buffers[s][:, :R]
        if n:
            ys = y[:, o:o + n]
            if not plan.masked:
                _expand_slot_(ys, buf, b[plan.used[0], :n], 1.0)
            else:
                m = plan.onehot(buf.dtype)
                for l in plan.used:
                    _expand_slot_(ys, buf * m[:, l:l + 1], b[l, :n], 1.0)
        o += n
    return y
