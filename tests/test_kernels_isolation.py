"""Isolation under non-finite values (issue 14, item 1), Triton kernels under the interpreter.

A NaN or an Inf in x or in the upstream gradient g at a token that adapter e does not own (routed -1 or to
another adapter) must never reach e's dA / dB: e's gradient is bit-for-bit the one computed with that token's
values finite, and an adapter that owns no token gets exact zeros. The owning adapter's gradient may be
non-finite (that is the right answer). Run with the interpreter's small plan and with a 132-SM GPU plan, whose
split reductions add partials inside the kernels.
"""

from __future__ import annotations

import math

import pytest
import torch

triton = pytest.importorskip("triton")

from routed_lora.kernels import launch  # noqa: E402


@pytest.fixture(autouse=True)
def interpreter(triton_interpreter):
    triton_interpreter("fused")


@pytest.fixture(autouse=True)
def _bf16_dot(bf16_interpreter_dot):
    """The interpreter's bf16 tl.dot defect patched for every test here (tests/conftest.py)."""


PLANS = {"interpreter": dict(sm_count=8, gpu_tiles=False), "gpu132": dict(sm_count=132, gpu_tiles=True)}


def _inputs(M, K, N, r, E, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x = rnd(M, K).to(dtype)
    W = (rnd(N, K) / K**0.5).to(dtype)
    b = rnd(N).to(dtype)
    A = (rnd(E, r, K) / K**0.5).to(dtype)
    B = (rnd(E, N, r) / r**0.5).to(dtype)
    gy = rnd(M, N).to(dtype)
    return x, W, b, A, B, gy


def _grads(x, W, b, A, B, routes, gy, s=2.0):
    _, h = launch.forward(x, W, b, A, B, routes, s)
    _, dA, dB = launch.backward(gy, x, W, A, B, routes, h, s, True)
    return dA, dB


def _finite(t):
    return bool(torch.isfinite(t.float()).all())


CASES = [("interpreter", bad, where) for bad in ("nan", "inf", "-inf") for where in ("x", "g")] + [
    ("gpu132", "nan", "x"),
    ("gpu132", "inf", "g"),
]


@pytest.mark.parametrize("plan,bad,where", CASES, ids=["-".join(c) for c in CASES])
def test_non_finite_value_reaches_only_its_owner(plan, bad, where):
    """E = 3: adapter 0 owns tokens, adapter 1 owns token 5 (whose x or g is non-finite), adapter 2 owns none;
    token 3 (routed -1) is non-finite too. Adapters 0 and 2 must not see either value."""
    launch.set_interpreter_plan(**PLANS[plan])
    if plan == "gpu132":
        p = launch.make_plan(260, 513, 257, 4, 3, 4, 132)
        assert p.shrink_x.splits > 1 and p.shrink_g.splits > 1 and p.grad_ab.splits > 1, p
    # gpu132: K, N > 256 and M > 256, so the shrink of x and of g and grad_ab all split their reductions.
    M, K, N, r, E = (40, 48, 40, 4, 3) if plan == "interpreter" else (260, 513, 257, 4, 3)
    bad = float(bad)
    x, W, b, A, B, gy = _inputs(M, K, N, r, E, torch.float32)
    routes = torch.zeros(M, dtype=torch.int32)
    routes[3] = -1
    routes[5] = 1
    routes[M - 1] = 1
    clean_dA, clean_dB = _grads(x, W, b, A, B, routes, gy)
    t = x if where == "x" else gy
    t = t.clone()
    t[3, 1] = bad  # route -1
    t[5, 2] = bad  # adapter 1
    xs, gs = (t, gy) if where == "x" else (x, t)
    dA, dB = _grads(xs, W, b, A, B, routes, gs)
    for e in (0, 2):
        assert _finite(dA[e]) and _finite(dB[e]), f"adapter {e}: non-finite gradient from a token it does not own"
        assert torch.equal(dA[e], clean_dA[e]), f"adapter {e}: dA changed (max diff {(dA[e] - clean_dA[e]).abs().max()})"
        assert torch.equal(dB[e], clean_dB[e]), f"adapter {e}: dB changed"
    assert torch.all(dA[2] == 0) and torch.all(dB[2] == 0), "adapter 2 owns no token: gradient must be exactly 0"
    # The owner sees its token's value: a non-finite x reaches dA[1] (dA = s G^T x), a non-finite g reaches dB[1].
    assert not _finite(dA[1] if where == "x" else dB[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_non_finite_low_precision(dtype):
    launch.set_interpreter_plan()
    x, W, b, A, B, gy = _inputs(33, 24, 20, 8, 2, dtype)
    routes = torch.randint(0, 2, (33,), generator=torch.Generator().manual_seed(1)).to(torch.int32)
    routes[7] = 1
    clean = _grads(x, W, b, A, B, routes, gy)
    x2, g2 = x.clone(), gy.clone()
    x2[7] = math.nan
    g2[7, :3] = math.inf
    dA, dB = _grads(x2, W, b, A, B, routes, g2)
    assert torch.equal(dA[0], clean[0][0]) and torch.equal(dB[0], clean[1][0])


def test_all_tokens_minus1_with_nan_gives_exact_zeros():
    launch.set_interpreter_plan()
    x, W, b, A, B, gy = _inputs(20, 24, 20, 4, 2, torch.float32)
    x[4] = math.nan
    gy[9] = math.inf
    routes = torch.full((20,), -1, dtype=torch.int32)
    dA, dB = _grads(x, W, b, A, B, routes, gy)
    assert torch.all(dA == 0) and torch.all(dB == 0)
