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
"""

from __future__ import annotations

import torch

__all__ = [
    "route_mask",
    "apply_route_mask_",
    "reference_forward",
    "reference_backward",
    "concat_lora_A",
    "concat_lora_B",
    "split_lora_B_grad",
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
        with torch.inference_mode(False), torch.no_grad():
            t = _CONSTANTS[key] = _make_constant(kind, device, dtype, n)
    return t


def _make_constant(kind, device, dtype, n):
    if kind == "owner":
        return torch.arange(n, device=device, dtype=dtype)
    return torch.zeros((), device=device, dtype=dtype)


def apply_route_mask_(t: torch.Tensor, routes: torch.Tensor, num_adapters: int) -> torch.Tensor:
    """Zero, in place, the columns of (M, E*r) ``t`` that belong to adapters other than each row's route.

    Two kernels (a comparison and ``masked_fill_``) instead of building a one-hot in ``t``'s dtype and
    multiplying: on a GPU every op costs host time, and this runs twice per layer call."""
    M = t.shape[0]
    owner = _constant("owner", routes.device, routes.dtype, num_adapters)
    foreign = (routes.reshape(-1, 1) != owner).unsqueeze(-1)
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
    E, r, _ = lora_A.shape
    y = torch.nn.functional.linear(x, weight, bias)
    h = apply_route_mask_(x @ concat_lora_A(lora_A).t(), routes, E)
    y.addmm_(h, concat_lora_B(lora_B).t(), alpha=float(scaling))
    return y, h


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
    zero = _constant("zero", grad_y.device, grad_y.dtype)  # ignored by addmm with beta = 0, but must exist
    dB_cat = torch.addmm(zero, grad_y.t(), h_masked, beta=0, alpha=s)  # s folded into the GEMM
    dA_cat = torch.addmm(zero, G.t(), x, beta=0, alpha=s)
    return dx, dA_cat.reshape(E, r, K), split_lora_B_grad(dB_cat, E)
