"""Explicit FLOP counts of one routed LoRA layer (a multiply-add is 2 FLOPs; bias adds and scalings are ignored).

Notation of DESIGN.md §1: x (M, K), W (N, K), E adapters of rank r; ``m_lora`` tokens carry an adapter (route
>= 0). Modes: ``forward``, ``backward`` (the input gradient and both adapters' gradients; the frozen W and b get
none) and ``full`` (both).

- floor (frozen nn.Linear): forward 2MNK, backward (dx only) 2MNK.
- minimal LoRA work, each token through its own adapter only:
  forward 2 m r (K + N) (shrink, expand); backward 4 m r (K + N) (G = g B, dx += G A, dA = G^T x, dB = g^T h).
- masked dense form (every adapter's rank-r block on every token, as the PyTorch path and the naive layer
  compute it): the same with m = E M.

TFLOP/s in the reports divide the *useful* count (floor + minimal LoRA) by the time, so providers are compared on
the same numerator.
"""

from __future__ import annotations

__all__ = ["MODES", "floor_flops", "lora_flops", "useful_flops", "masked_flops"]

MODES = ("forward", "backward", "full")


def _check(mode):
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")


def floor_flops(M: int, K: int, N: int, mode: str = "full") -> int:
    """The frozen linear: forward 2MNK, backward 2MNK (input gradient only)."""
    _check(mode)
    one = 2 * M * N * K
    return {"forward": one, "backward": one, "full": 2 * one}[mode]


def lora_flops(m_lora: int, K: int, N: int, r: int, mode: str = "full") -> int:
    """LoRA work for ``m_lora`` token-adapter pairs of rank r: forward 2mr(K+N), backward 4mr(K+N)."""
    _check(mode)
    fwd = 2 * m_lora * r * (K + N)
    return {"forward": fwd, "backward": 2 * fwd, "full": 3 * fwd}[mode]


def useful_flops(M: int, K: int, N: int, r: int, m_lora: int, mode: str = "full") -> int:
    """Floor plus the minimal LoRA work (each routed token through its own adapter only)."""
    return floor_flops(M, K, N, mode) + lora_flops(m_lora, K, N, r, mode)


def masked_flops(M: int, K: int, N: int, r: int, E: int, mode: str = "full") -> int:
    """Floor plus the masked dense form: all E adapters on every token."""
    return floor_flops(M, K, N, mode) + lora_flops(E * M, K, N, r, mode)
