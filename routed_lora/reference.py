"""The pure-PyTorch routed-LoRA path: the specification, the CPU path and the oracle of every test.

Notation (DESIGN.md §1): x (M, K) tokens, W (N, K) frozen, b (N,) frozen, E adapters, A (E, r, K),
B (E, N, r), s the scaling, routes rho (M,) with values in {-1, 0..E-1}; -1 means "backbone only".

    y_m = W x_m + b + s * B[rho_m] A[rho_m] x_m        (no LoRA term when rho_m = -1)

With A_cat = A.reshape(E*r, K), B_cat = B.permute(1, 0, 2).reshape(N, E*r), h = x A_cat^T (M, E*r) and
``mask`` keeping only the r columns of the owning adapter (all zero for rho = -1):

    forward   y  = x W^T + b + s * (h * mask) B_cat^T
    backward  G  = (g B_cat) * mask
              dx = g W + s * G A_cat
              dB_cat = s * g^T (h * mask)     block e only sees tokens with rho = e
              dA_cat = s * G^T x              likewise
              (no gradient for W or b)

The masked form costs E times the minimal LoRA FLOPs, which for E = 2 and r <= 64 is a few percent of the
backbone GEMM, and it is made of a handful of large GEMMs (no loop over tokens or adapters). Every (M, N)
product is accumulated in place into ``y`` or ``dx``; the only extra activation kept for the backward is the
masked shrink h (M, E*r).

Masking zeroes in place (``masked_fill_``) the entries of adapters a token does not own, so such a token
contributes an exact zero to that adapter's gradient: an adapter with no tokens gets exact zeros, and
changing the upstream gradient at tokens of another adapter leaves its gradient bit-for-bit unchanged (adding a
zero product to a partial sum is exact). In-place masking also avoids fresh (M, E*r) allocations, which on the
CPU cost more than the masking itself.

The weight gradients are sums over tokens, where a masked zero meets the unmasked operand: 0 * NaN = NaN would
let one token's non-finite x (or g) reach every adapter. :func:`isolated_grad` keeps it out of the adapters that
do not own the token (see its modes). No-grad calls run :func:`inference_forward`: the same GEMMs without the
autograd Function and without keeping h, bit-identical to the training forward.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "route_mask",
    "apply_route_mask_",
    "reference_forward",
    "inference_forward",
    "lora_views",
    "reference_backward",
    "concat_lora_A",
    "concat_lora_B",
    "split_lora_B_grad",
    "isolated_grad",
    "set_isolation_mode",
    "ISOLATION_MODES",
]


def route_mask(routes: torch.Tensor, num_adapters: int, dtype: torch.dtype) -> torch.Tensor:
    """One-hot (M, E, 1) route matrix in ``dtype``: entry (m, e) is 1 where routes[m] == e (a row of zeros for -1)."""
    owner = torch.arange(num_adapters, device=routes.device, dtype=routes.dtype)
    return (routes.reshape(-1, 1) == owner).to(dtype).unsqueeze(-1)


_CONSTANTS: dict = {}


def _constant(kind: str, device: torch.device, dtype: torch.dtype, n: int = 0) -> torch.Tensor:
    """A small constant tensor ("owner" = arange(n), "zero" = a 0-d zero), made once per device and dtype.

    Every layer call needs them twice; on a GPU each fresh one is a kernel launch and host time. Not cached while
    torch.compile traces (it makes its own constants) and made outside inference mode, so a cached tensor is an
    ordinary one whatever mode first asked for it."""
    if torch.compiler.is_compiling():
        return _make_constant(kind, device, dtype, n)
    key = (kind, device, dtype, n)
    t = _CONSTANTS.get(key)
    if t is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            # made inside a CUDA-graph capture it would live in the graph's private pool: not cached
            return _make_constant(kind, device, dtype, n)
        with torch.inference_mode(False), torch.no_grad():
            t = _CONSTANTS[key] = _make_constant(kind, device, dtype, n)
    return t


def _make_constant(kind, device, dtype, n):
    if kind == "owner":
        return torch.arange(n, device=device, dtype=dtype)
    return torch.zeros((), device=device, dtype=dtype)


def foreign_mask(routes: torch.Tensor, num_adapters: int) -> torch.Tensor:
    """(M, E, 1) bool: True where adapter e is not token m's route (every e for -1)."""
    owner = _constant("owner", routes.device, routes.dtype, num_adapters)
    return (routes.reshape(-1, 1) != owner).unsqueeze(-1)


def apply_route_mask_(t: torch.Tensor, routes: torch.Tensor, num_adapters: int, foreign=None) -> torch.Tensor:
    """Zero, in place, the columns of (M, E*r) ``t`` that belong to adapters other than each row's route.

    Two kernels (a comparison and ``masked_fill_``) instead of building a one-hot in ``t``'s dtype and
    multiplying: on a GPU every op costs host time, and this runs twice per layer call. ``foreign``: the mask
    of :func:`foreign_mask`, if already made."""
    M = t.shape[0]
    if foreign is None:
        foreign = foreign_mask(routes, num_adapters)
    t.view(M, num_adapters, t.shape[1] // num_adapters).masked_fill_(foreign, 0)
    return t


def concat_lora_A(lora_A: torch.Tensor) -> torch.Tensor:
    """(E, r, K) -> A_cat (E*r, K), a view."""
    E, r, K = lora_A.shape
    return lora_A.reshape(E * r, K)


def concat_lora_B(lora_B: torch.Tensor) -> torch.Tensor:
    """(E, N, r) -> B_cat (N, E*r): column e*r + j holds B[e, :, j]."""
    E, N, r = lora_B.shape
    return lora_B.permute(1, 0, 2).reshape(N, E * r)


def split_lora_B_grad(dB_cat: torch.Tensor, num_adapters: int) -> torch.Tensor:
    """(N, E*r) -> (E, N, r), the inverse of :func:`concat_lora_B`."""
    N, Er = dB_cat.shape
    r = Er // num_adapters
    return dB_cat.reshape(N, num_adapters, r).permute(1, 0, 2).contiguous()


def _cast(t, dtype):
    return None if t is None else (t if dtype is None or t.dtype == dtype else t.to(dtype))


def reference_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    routes: torch.Tensor,
    scaling: float,
    *,
    compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(y, h_masked)`` for 2-D ``x`` (M, K) and 1-D ``routes`` (M,).

    ``compute_dtype=torch.float64`` computes (and returns) everything in float64: the oracle of the tests.
    """
    x, weight, bias = _cast(x, compute_dtype), _cast(weight, compute_dtype), _cast(bias, compute_dtype)
    lora_A, lora_B = _cast(lora_A, compute_dtype), _cast(lora_B, compute_dtype)
    y = torch.nn.functional.linear(x, weight, bias)
    h = _add_lora_(y, x, lora_A, lora_B, routes, float(scaling), _used_adapters(routes, x), keep_h=True)
    return y, h


# Up to this many tokens on the CPU the routes are read on the host (free there: no device to wait for), so
# the forward knows which adapters are used: it expands only those, one small GEMM each (no B_cat copy), and
# a no-grad call skips the mask when one adapter owns every token. Above it, the masked form's few large GEMMs.
SMALL_M = 64


def _used_adapters(routes: torch.Tensor, x: torch.Tensor) -> list[int] | None:
    """The sorted distinct route values (-1 included) when cheap to know (CPU, M <= SMALL_M), else None."""
    M = x.shape[0]
    if M == 0:
        return []
    if M <= SMALL_M and routes.device.type == "cpu" and not torch.compiler.is_compiling():
        return sorted(set(routes.tolist()))
    return None


_LAST_PLAN: list = [None]


def decode_route_plan(routes: torch.Tensor, flat: torch.Tensor, x: torch.Tensor, num_adapters: int) -> tuple:
    """``(used, foreign)`` for a no-grad call with ``flat`` = ``routes.reshape(-1)``: :func:`_used_adapters` and,
    when a mask is needed, the :func:`foreign_mask` (else None). Kept for the last routes tensor seen (and its version counter), because
    every routed layer of a model reads the same routes tensor in a decoding step (``set_routes`` shares it):
    the first layer makes the plan, the others reuse it. Inference tensors (no version counter) are not kept."""
    last = _LAST_PLAN[0]
    cacheable = not routes.is_inference()
    if (
        cacheable
        and last is not None
        and last[0] is routes
        and last[1] == routes._version
        and last[2] == num_adapters
        and last[3] == x.shape[0]
    ):
        return last[4]
    used = _used_adapters(flat, x)
    foreign = None
    if used is None or len(used) > 1:
        foreign = foreign_mask(flat, num_adapters)
    plan = (used, foreign)
    if cacheable and not (flat.device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        # (a mask made inside a CUDA-graph capture lives in the graph's pool: never kept beyond it)
        _LAST_PLAN[0] = (routes, routes._version, num_adapters, x.shape[0], plan)
    return plan


def _add_lora_(y, x, lora_A, lora_B, routes, s, used, *, keep_h, views=None, foreign=None):
    """``y += s * (h * mask) B_cat^T`` in place, h = x A_cat^T; returns the masked h if ``keep_h`` else None.

    ``used`` (see :func:`_used_adapters`): None gives the masked form (one expand GEMM over all adapters); a
    list expands each used adapter e with its own block, ``y += s * h[:, e] B_e^T``, in ascending e. Training
    calls and no-grad calls run the same GEMMs on the same operands (masking never changes the block a token
    owns, and an adapter's block is only read for its own tokens), so their outputs are bit-identical: the
    old and the new log-probs of a GRPO update agree exactly. ``views``: (A_cat^T, [B_e^T for each e]) made
    beforehand (:func:`lora_views`, no-grad calls only), else made here."""
    E, r, _ = lora_A.shape
    if not keep_h and used is not None and (not used or used == [-1]):
        return None  # no LoRA term at all (no tokens, or every token on -1)
    A_cat_t, B_t = views if views is not None else (concat_lora_A(lora_A).t(), None)
    h = x @ A_cat_t
    if used is None:
        apply_route_mask_(h, routes, E, foreign)
        y.addmm_(h, concat_lora_B(lora_B).t(), alpha=s)
        return h
    if keep_h or len(used) > 1:  # when one adapter owns every token, y does not need the mask
        apply_route_mask_(h, routes, E, foreign)
    for e in used:
        if e >= 0:
            B_e_t = B_t[e] if B_t is not None else lora_B[e].t()
            y.addmm_(h if E == 1 else h[:, e * r : (e + 1) * r], B_e_t, alpha=s)
    return h if keep_h else None


def lora_views(lora_A: torch.Tensor, lora_B: torch.Tensor) -> tuple:
    """(A_cat^T (K, E*r), [B_e^T (r, N) for each e]): views of the adapters (no copy), made without autograd
    history, for no-grad calls that want them made once rather than per call (each view op costs a few us,
    comparable to an M = 1 LoRA GEMM). They follow in-place updates of the parameters (optimizer steps,
    load_state_dict), not a replaced storage: callers check ``data_ptr`` (see RoutedLoRALinear._decode).
    Views, never a cached copy (a B_cat copy would save one more GEMM operand per call): in-place updates
    through ``.data`` do not move the version counter, so no key could tell a copy is stale."""
    with torch.inference_mode(False), torch.no_grad():
        return concat_lora_A(lora_A).t(), [lora_B[e].t() for e in range(lora_B.shape[0])]


def inference_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    routes: torch.Tensor,
    scaling: float,
    *,
    views: tuple | None = None,
    plan: tuple | None = None,
) -> torch.Tensor:
    """``y`` alone, for calls that need no gradient (decoding): :func:`reference_forward` without keeping h,
    with the fewest ops (at M = 1 each op's fixed cost is comparable to the LoRA work itself).

    Bit-identical to :func:`reference_forward`'s ``y`` (see :func:`_add_lora_`). Small CPU calls: every token
    on -1 is ``F.linear`` alone; every token on one adapter e is ``y = x W^T + b``, ``y += s (x A_cat^T)[:, e]
    B_e^T`` (three ops, no mask); a mix masks h and expands each used adapter. ``views``: see
    :func:`lora_views`; ``plan``: see :func:`decode_route_plan`.
    """
    y = torch.nn.functional.linear(x, weight, bias)
    used, foreign = plan if plan is not None else (_used_adapters(routes, x), None)
    _add_lora_(y, x, lora_A, lora_B, routes, float(scaling), used, keep_h=False, views=views, foreign=foreign)
    return y


def reference_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    routes: torch.Tensor,
    h_masked: torch.Tensor,
    scaling: float,
    compute_dx: bool = True,
    *,
    compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Return ``(dx, dA, dB)``; ``dx`` is None when ``compute_dx`` is False (the input needs no gradient)."""
    grad_y, x, weight = _cast(grad_y, compute_dtype), _cast(x, compute_dtype), _cast(weight, compute_dtype)
    lora_A, lora_B = _cast(lora_A, compute_dtype), _cast(lora_B, compute_dtype)
    h_masked = _cast(h_masked, compute_dtype)
    E, r, K = lora_A.shape
    s = float(scaling)
    A_cat, B_cat = concat_lora_A(lora_A), concat_lora_B(lora_B)
    G = apply_route_mask_(grad_y @ B_cat, routes, E)
    dx = None
    if compute_dx:
        dx = grad_y @ weight
        dx.addmm_(G, A_cat, alpha=s)
    dB_cat = isolated_grad(grad_y, h_masked, G, routes, E, s, blocks="right")  # (N, E*r), s g^T h
    dA_cat = isolated_grad(G, x, h_masked, routes, E, s, blocks="left")  # (E*r, K), s G^T x
    return dx, dA_cat.reshape(E, r, K), split_lora_B_grad(dB_cat, E)


# How isolated_grad keeps a non-finite value at a token out of the adapters that do not own it:
# "auto" = "recheck" on CPU (a finite check of the small result, free of syncs there) and "sanitize" elsewhere
# (no host synchronisation); "none" is the plain product (0 * NaN = NaN leaks into every adapter), kept for the
# benchmark that measures what isolation costs.
ISOLATION_MODES = ("auto", "recheck", "sanitize", "none")
_SUM_DTYPE = {torch.float16: torch.float32}  # fp16 sums overflow at 65504: a false alarm each time
_isolation = "auto"


def set_isolation_mode(mode: str) -> str:
    """Select how the backward isolates adapters from non-finite values (see :func:`isolated_grad`); returns
    the previous mode. For benchmarks and tests; ``"auto"`` is the right choice otherwise."""
    global _isolation
    if mode not in ISOLATION_MODES:
        raise ValueError(f"mode: expected one of {ISOLATION_MODES}, got {mode!r}")
    old, _isolation = _isolation, mode
    return old


def isolated_grad(
    U: torch.Tensor,
    V: torch.Tensor,
    owned: torch.Tensor,
    routes: torch.Tensor,
    num_adapters: int,
    scaling: float,
    *,
    blocks: str,
) -> torch.Tensor:
    """``s * U^T V`` (a sum over the M tokens) for a weight gradient, where one operand is route-masked.

    ``blocks="right"``: V (M, E*r) is masked (zero outside each token's own adapter block) and U (M, C) is not;
    the result (C, E*r) holds adapter e's gradient in columns e*r .. e*r+r-1 (dB_cat = s g^T h).
    ``blocks="left"``: U (M, E*r) is masked and V (M, C) is not; the result (E*r, C) holds adapter e's gradient
    in rows e*r .. e*r+r-1 (dA_cat = s G^T x). ``owned`` (M, E*r) is a masked tensor whose own block is
    non-finite at a token whenever that token's row of the unmasked operand is (h for x, G for g).

    The plain product lets a non-finite entry of the unmasked operand at token m reach every adapter, since
    0 * NaN = NaN. Isolation keeps it out of the adapters that do not own m, and an adapter with no tokens gets
    exact zeros:

    - ``recheck`` (CPU): the plain product, then one sum of the small result; only when that finds
      a non-finite entry is each adapter's block recomputed from its own tokens (index_select). Clean inputs
      keep the plain product's bits and pay one float64 sum of the (C, E*r) result.
    - ``sanitize`` (no host synchronisation, for GPUs): zero the non-finite entries of the unmasked operand
      (``nan_to_num``, one pass over it), take the product, then fill with NaN the block of every adapter owning
      a token whose row was non-finite. Clean inputs keep the plain product's bits.
    """
    mode = _isolation
    if mode == "auto":
        mode = "recheck" if U.device.type == "cpu" else "sanitize"
    if blocks == "right":
        free, masked = U, V
    elif blocks == "left":
        free, masked = V, U
    else:
        raise ValueError(f"blocks: expected 'left' or 'right', got {blocks!r}")
    E = num_adapters
    M, Er = masked.shape
    r = Er // E
    zero = _constant("zero", U.device, U.dtype)  # ignored by addmm with beta = 0, but must exist

    def product(u, v):
        return torch.addmm(zero, u.t(), v, beta=0, alpha=scaling)  # s folded into the GEMM

    if mode == "sanitize":
        free = torch.nan_to_num(free, nan=0.0, posinf=0.0, neginf=0.0)
        U, V = (free, masked) if blocks == "right" else (masked, free)
    out = product(U, V)
    # the result with the adapters on dim 1: (C, E, r) for "right", (1, E, r*C) for "left"
    per_adapter = out.view(-1, E, r) if blocks == "right" else out.view(1, E, -1)
    if mode == "sanitize":
        bad = ~torch.isfinite(owned).view(M, E, r).all(dim=2).all(dim=0)  # (E,): owns a non-finite row
        per_adapter.masked_fill_(bad.view(1, E, 1), float("nan"))
    elif mode == "recheck" and M > 0 and not math.isfinite(float(out.sum(dtype=_SUM_DTYPE.get(out.dtype)))):
        # one sum of the small result: a non-finite entry cannot cancel (NaN stays NaN, Inf - Inf is NaN), and
        # an overflowing sum of finite entries only costs a needless recompute. torch.isfinite(out).all()
        # costs ~25x more on CPU (~250 us for 32 x 1024 against ~10 us)
        for e in range(E):
            idx = (routes == e).nonzero().reshape(-1)
            own = slice(e * r, (e + 1) * r)
            f, m = free.index_select(0, idx), masked.index_select(0, idx)[:, own]
            if blocks == "right":
                out[:, own] = product(f, m)
            else:
                out[own] = product(m, f)
    return out
