"""Random routed-LoRA cases and a float64 per-token oracle, shared by the Triton interpreter tests.

The oracle is independent of both implementations under test: it loops over adapters, selects each adapter's
tokens by index (no route mask, no concatenated adapters) and computes every product in float64:

    y_m   = W x_m + b + s B[e] A[e] x_m                  e = rho_m (no LoRA term for rho_m = -1)
    dx_m  = W^T g_m + s A[e]^T B[e]^T g_m
    dA[e] = s sum_{m: rho_m = e} (B[e]^T g_m) x_m^T
    dB[e] = s sum_{m: rho_m = e} g_m (A[e] x_m)^T        (zero for an adapter without tokens)

(routed_lora/testing.py on main had no fuzz generator when this was written; this one is for the kernels.)
"""

from __future__ import annotations

import dataclasses

import torch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
RANKS = (1, 2, 3, 4, 5, 8, 16, 24, 64)
ROUTE_MIXES = ("random", "with_minus1", "all_minus1", "single", "one_empty")
LAYOUTS = ("contiguous", "transposed", "sliced")


@dataclasses.dataclass
class FuzzCase:
    seed: int
    dtype: torch.dtype
    M: int
    K: int
    N: int
    r: int
    E: int
    mix: str
    layout: str
    bias: bool
    scaling: float

    @property
    def id(self) -> str:
        d = str(self.dtype).replace("torch.", "")
        return (f"s{self.seed}-{d}-M{self.M}-K{self.K}-N{self.N}-r{self.r}-E{self.E}-{self.mix}-{self.layout}"
                + ("" if self.bias else "-nobias"))


def random_case(seed: int, max_dim: int = 40, max_rank: int = 64) -> FuzzCase:
    """One random case: E 1-8, r from RANKS (<= max_rank), M 0..max_dim (0 included), K, N 1..max_dim."""
    g = torch.Generator().manual_seed(seed)
    pick = lambda seq: seq[int(torch.randint(len(seq), (1,), generator=g))]  # noqa: E731
    M = 0 if seed % 17 == 0 else int(torch.randint(1, max_dim + 1, (1,), generator=g))
    return FuzzCase(
        seed=seed,
        dtype=pick(DTYPES),
        M=M,
        K=int(torch.randint(1, max_dim + 1, (1,), generator=g)),
        N=int(torch.randint(1, max_dim + 1, (1,), generator=g)),
        r=pick([r for r in RANKS if r <= max_rank]),
        E=int(torch.randint(1, 9, (1,), generator=g)),
        mix=pick(ROUTE_MIXES),
        layout=pick(LAYOUTS),
        bias=bool(torch.randint(2, (1,), generator=g)),
        scaling=pick((0.5, 2.0, 1.0 / 3.0)),
    )


def make_routes(c: FuzzCase, g: torch.Generator) -> torch.Tensor:
    if c.mix == "random":
        routes = torch.randint(0, c.E, (c.M,), generator=g)
    elif c.mix == "with_minus1":
        routes = torch.randint(-1, c.E, (c.M,), generator=g)
    elif c.mix == "all_minus1":
        routes = torch.full((c.M,), -1)
    elif c.mix == "single":
        routes = torch.full((c.M,), int(torch.randint(0, c.E, (1,), generator=g)))
    else:  # one_empty: the last adapter owns no token (E = 1: every token -1 or 0 ... 0 owns none)
        routes = torch.randint(-1, max(c.E - 1, 0), (c.M,), generator=g)
    return routes.to(torch.int32)


def make_inputs(c: FuzzCase):
    """(x, W, b, A, B, routes, g) in c.dtype; x laid out as c.layout says (non-contiguous for two of three)."""
    g = torch.Generator().manual_seed(1000 + c.seed)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    if c.layout == "transposed":
        x = rnd(c.K, c.M).to(c.dtype).t()
    elif c.layout == "sliced":
        x = rnd(c.M, 2 * c.K + 1).to(c.dtype)[:, 1::2]
    else:
        x = rnd(c.M, c.K).to(c.dtype)
    W = (rnd(c.N, c.K) / c.K**0.5).to(c.dtype)
    b = rnd(c.N).to(c.dtype) if c.bias else None
    A = (rnd(c.E, c.r, c.K) / c.K**0.5).to(c.dtype)
    B = (rnd(c.E, c.N, c.r) / c.r**0.5).to(c.dtype)
    routes = make_routes(c, g)
    gy = rnd(c.M, c.N).to(c.dtype)
    return x, W, b, A, B, routes, gy


def per_token_reference(x, W, b, A, B, routes, gy, scaling):
    """(y, dx, dA, dB) in float64 by the per-token formulas of the module docstring."""
    x, W, A, B, gy = (t.double() for t in (x, W, A, B, gy))
    s = float(scaling)
    y = x @ W.t() + (0 if b is None else b.double())
    dx = gy @ W
    dA, dB = torch.zeros_like(A), torch.zeros_like(B)
    for e in range(A.shape[0]):
        idx = (routes == e).nonzero().flatten()
        if idx.numel() == 0:
            continue
        xe, ge = x[idx], gy[idx]
        he = xe @ A[e].t()  # (m_e, r)
        y[idx] += s * he @ B[e].t()
        Ge = ge @ B[e]  # (m_e, r)
        dx[idx] += s * Ge @ A[e]
        dA[e] = s * Ge.t() @ xe
        dB[e] = s * ge.t() @ he
    return y, dx, dA, dB


# ---------------------------------------------------------------------------------------------------------------
# The fuzz test: the Triton kernels under the interpreter against the oracle.

import numpy as np  # noqa: E402
import pytest  # noqa: E402

triton = pytest.importorskip("triton")

from routed_lora.kernels import launch  # noqa: E402
from routed_lora.reference import reference_backward, reference_forward  # noqa: E402

ATOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}
N_CASES = 32


@pytest.fixture(autouse=True)
def interpreter(triton_interpreter):
    triton_interpreter("fused")


@pytest.fixture(autouse=True)
def _bf16_dot(bf16_interpreter_dot):
    """The interpreter's bf16 tl.dot defect patched for every test here (tests/conftest.py)."""


def _check(case, name, got, ref64, low, atol):
    assert got.dtype == low.dtype, f"{case.id}: {name} dtype {got.dtype}, expected {low.dtype}"
    assert got.shape == ref64.shape, f"{case.id}: {name} shape {tuple(got.shape)}, expected {tuple(ref64.shape)}"
    if not got.numel():
        return
    err = (got.double() - ref64).abs()
    bound = 2 * (low.double() - ref64).abs().max().item() + atol
    if err.max().item() > bound:
        idx = np.unravel_index(int(err.argmax()), tuple(err.shape))
        raise AssertionError(f"{case.id}: {name} max |err| {err.max().item():.3g} > bound {bound:.3g} at "
                             f"{tuple(int(i) for i in idx)}")


@pytest.mark.parametrize("seed", range(N_CASES))
def test_fuzz_triton_against_per_token_reference(seed):
    c = random_case(seed, max_dim=40, max_rank=64)
    x, W, b, A, B, routes, gy = make_inputs(c)
    y, h = launch.forward(x, W, b, A, B, routes, c.scaling)
    dx, dA, dB = launch.backward(gy, x, W, A, B, routes, h, c.scaling, True)
    y64, dx64, dA64, dB64 = per_token_reference(x, W, b, A, B, routes, gy, c.scaling)
    yl, hl = reference_forward(x, W, b, A, B, routes, c.scaling)
    dxl, dAl, dBl = reference_backward(gy, x, W, A, B, routes, hl, c.scaling, True)
    atol = ATOL[c.dtype] * max(1.0, c.scaling)
    _check(c, "y", y, y64, yl, atol)
    _check(c, "dx", dx, dx64, dxl, atol)
    _check(c, "dA", dA, dA64, dAl, 4 * atol)
    _check(c, "dB", dB, dB64, dBl, 4 * atol)
    for e in range(c.E):
        if not bool((routes == e).any()):
            assert torch.all(dA[e] == 0) and torch.all(dB[e] == 0), f"{c.id}: adapter {e} owns no token"


def test_fuzz_covers_the_space():
    """The generator reaches every dtype, layout and route mix, M = 0, E = 1 and 8, r = 1 and 64."""
    cases = [random_case(s) for s in range(N_CASES)]
    assert {c.dtype for c in cases} == set(DTYPES)
    assert {c.layout for c in cases} == set(LAYOUTS)
    assert {c.mix for c in cases} == set(ROUTE_MIXES)
    assert any(c.M == 0 for c in cases) and {1, 8} <= {c.E for c in cases}
    assert {1, 64} <= {c.r for c in cases}
