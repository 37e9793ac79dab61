"""The Triton kernels under the interpreter (TRITON_INTERPRET=1, CPU tensors) against the float64 reference.

The launchers decide at call time whether to interpret (CPU tensor + TRITON_INTERPRET=1), whatever the
environment was when triton or the kernels were imported, so setting the variable per test is enough and the
module works in any collection order.

bf16 work-around (test harness only): the interpreter keeps bf16 tensors as raw uint16 bit patterns and its
``tl.dot`` multiplies those integers (results around 1e10). The ``bf16_interpreter_dot`` fixture
(tests/conftest.py) patches the interpreter's ``create_dot`` for the duration of a test so bf16 operands are
widened exactly to fp32 first,
which is what a GPU's bf16 MMA with fp32 accumulation computes. The kernels are unchanged.

Error rule (DESIGN.md §4): ``max|out - ref64| <= 2 * max|ref_lowp - ref64| + atol`` with ref_lowp the
PyTorch path in the test dtype.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton")

import routed_lora as rl  # noqa: E402
from routed_lora.kernels import compiled, launch, plan, tuning  # noqa: E402
from routed_lora.reference import reference_backward, reference_forward  # noqa: E402

ATOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}


@pytest.fixture(autouse=True)
def interpreter(triton_interpreter):
    triton_interpreter("auto")


@pytest.fixture(autouse=True)
def _bf16_dot(bf16_interpreter_dot):
    """The interpreter's bf16 tl.dot defect patched for every test here (tests/conftest.py)."""


@dataclasses.dataclass
class Case:
    dtype: torch.dtype
    M: int
    K: int
    N: int
    r: int
    E: int
    routes: str  # random | one | minus1 | empty | all_minus1
    bias: bool = True
    layout: str = "contiguous"  # contiguous | column_major | sliced

    @property
    def id(self):
        d = str(self.dtype).replace("torch.", "")
        return f"{d}-M{self.M}-K{self.K}-N{self.N}-r{self.r}-E{self.E}-{self.routes}-{self.layout}" + (
            "" if self.bias else "-nobias"
        )


CASES = [
    Case(torch.float32, 1, 24, 20, 4, 2, "random"),
    Case(torch.float32, 17, 40, 37, 8, 3, "minus1", layout="column_major"),
    Case(torch.float32, 130, 33, 18, 16, 2, "random", bias=False),
    Case(torch.float16, 17, 21, 35, 4, 3, "one"),
    Case(torch.float16, 130, 19, 17, 8, 2, "empty", layout="sliced"),
    Case(torch.bfloat16, 17, 37, 23, 16, 3, "random", bias=False),
    Case(torch.bfloat16, 130, 18, 20, 4, 2, "minus1"),
    Case(torch.bfloat16, 1, 20, 33, 8, 3, "all_minus1"),
    Case(torch.float32, 17, 20, 19, 128, 8, "minus1"),  # largest supported: E*r = 1024 columns
]


def make_inputs(c: Case, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    if c.layout == "column_major":
        x = rnd(c.K, c.M).to(c.dtype).t()
    elif c.layout == "sliced":
        x = rnd(c.M, 2 * c.K + 3).to(c.dtype)[:, 1 : 2 * c.K + 1 : 2]
    else:
        x = rnd(c.M, c.K).to(c.dtype)
    W = (rnd(c.N, c.K) / c.K**0.5).to(c.dtype)
    b = rnd(c.N).to(c.dtype) if c.bias else None
    A = (rnd(c.E, c.r, c.K) / c.K**0.5).to(c.dtype)
    B = (rnd(c.E, c.N, c.r) / c.r**0.5).to(c.dtype)
    if c.routes == "random":
        routes = torch.randint(0, c.E, (c.M,), generator=g)
    elif c.routes == "minus1":
        routes = torch.randint(-1, c.E, (c.M,), generator=g)
    elif c.routes == "one":
        routes = torch.full((c.M,), c.E - 1)
    elif c.routes == "empty":  # adapter 0 owns no token
        routes = torch.randint(0, 2, (c.M,), generator=g) * 2 - 1
        routes.clamp_(max=c.E - 1)
    else:
        routes = torch.full((c.M,), -1)
    grad_y = rnd(c.M, c.N).to(c.dtype)
    return x, W, b, A, B, routes.to(torch.int32), grad_y


def check(name, got, ref64, ref_lowp, atol):
    assert got.dtype == ref_lowp.dtype, f"{name}: dtype {got.dtype}, expected {ref_lowp.dtype}"
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)}, expected {tuple(ref64.shape)}"
    err = (got.double() - ref64).abs()
    bound = 2 * (ref_lowp.double() - ref64).abs().max().item() + atol
    if err.numel() and err.max().item() > bound:
        idx = np.unravel_index(int(err.argmax()), tuple(err.shape))
        raise AssertionError(
            f"{name}: max |err| {err.max().item():.3g} > bound {bound:.3g} at index {tuple(int(i) for i in idx)} "
            f"(got {got.double()[idx].item():.6g}, want {ref64[idx].item():.6g})"
        )


def run_case(c: Case, variant="fused", gemm=None):
    x, W, b, A, B, routes, gy = make_inputs(c)
    s = 2.0
    before = launch.CALLS.copy()
    y, h = launch.forward(x, W, b, A, B, routes, s)
    y64, h64 = reference_forward(x, W, b, A, B, routes, s, compute_dtype=torch.float64)
    yl, hl = reference_forward(x, W, b, A, B, routes, s)
    atol = ATOL[c.dtype]
    check("y", y, y64, yl, atol)
    check("h_masked", h, h64, hl, atol)
    # The backward gets the h of the reference (the two backends exchange h in the same format).
    h_in = hl
    dx, dA, dB = launch.backward(gy, x, W, A, B, routes, h_in, s, True)
    r64 = reference_backward(gy, x, W, A, B, routes, h_in, s, True, compute_dtype=torch.float64)
    rl_ = reference_backward(gy, x, W, A, B, routes, h_in, s, True)
    for name, got, want, low in zip(("dx", "dA", "dB"), (dx, dA, dB), r64, rl_):
        check(name, got, want, low, atol * (4 if name != "dx" else 1))
    # Structural exactness: non-owning columns of h are exact zeros, unused adapters get exact zero gradients.
    owner = torch.arange(c.E).repeat_interleave(c.r)
    assert torch.all(h[routes[:, None].long() != owner[None, :]] == 0), "h_masked: a non-owned column is not 0"
    for e in range(c.E):
        if not bool((routes == e).any()):
            assert torch.all(dA[e] == 0) and torch.all(dB[e] == 0), f"adapter {e} owns no token: gradient not 0"
    # The kernels ran: no silent fallback to the PyTorch path.
    calls = launch.CALLS - before
    assert calls[f"forward_{variant}"] == 1 and calls[f"backward_{variant}"] == 1, dict(calls)
    assert calls["forward_torch"] == 0 and calls["backward_torch"] == 0, dict(calls)
    lin = gemm or ("linear" if variant == "fused" else "linear_lora")
    assert calls["shrink"] == 2 and calls["grad_ab"] == 1 and calls[lin] == 2, dict(calls)
    # No backward dx when not asked.
    dx2, dA2, dB2 = launch.backward(gy, x, W, A, B, routes, h_in, s, False)
    assert dx2 is None
    assert torch.equal(dA2, dA) and torch.equal(dB2, dB), "repeated backward differs (fixed-order reductions)"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_kernels_match_reference(case):
    run_case(case)


@pytest.mark.parametrize("case", [CASES[1], CASES[4], CASES[6]], ids=lambda c: c.id)
def test_cublas_variant_matches_reference(case):
    launch.set_variant("cublas")
    run_case(case, variant="cublas")


def test_looped_adapter_columns(monkeypatch):
    """E*r wider than the column tile: looped in the GEMM epilogue, split over the grid in shrink and grad_ab.

    (This test also covered the atomic mode, which is gone: the fixed-order reduction now costs no launch.)"""
    monkeypatch.setattr(plan, "MAX_BLOCK_R", 16)  # read where the plans are built
    launch.set_interpreter_plan()  # new key generation: the plans are rebuilt with the patched tile width
    run_case(Case(torch.float32, 40, 20, 19, 16, 3, "minus1"))
    run_case(Case(torch.bfloat16, 17, 18, 21, 8, 3, "random"))


def test_gradient_isolation_bit_for_bit():
    """Changing g at tokens of adapter 1 leaves adapter 0's dA and dB bit-for-bit unchanged."""
    c = Case(torch.float32, 40, 20, 19, 4, 2, "random")
    x, W, b, A, B, routes, gy = make_inputs(c)
    _, h = launch.forward(x, W, b, A, B, routes, 2.0)
    _, dA, dB = launch.backward(gy, x, W, A, B, routes, h, 2.0, False)
    gy2 = gy.clone()
    gy2[routes == 1] = torch.randn_like(gy2[routes == 1]) * 100
    _, dA2, dB2 = launch.backward(gy2, x, W, A, B, routes, h, 2.0, False)
    assert torch.equal(dA[0], dA2[0]) and torch.equal(dB[0], dB2[0])
    assert not torch.equal(dA[1], dA2[1])


def test_pinned_config_override():
    launch.pin_configs({"linear": {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 32}})
    run_case(Case(torch.float32, 40, 36, 20, 4, 2, "minus1"))
    with pytest.raises(ValueError, match="unknown kernels"):
        launch.pin_configs({"nope": {}})


def test_autotuned_path():
    """The GEMM autotuning path (keys, pruning), timed by the wall clock under the interpreter: results stay exact
    although every config runs, and the chosen config is then launched directly."""
    launch.autotune_in_interpreter(True)
    for variant in ("fused", "cublas"):
        launch.set_variant(variant)
        run_case(Case(torch.float32, 40, 36, 33, 4, 2, "minus1"), variant=variant)
        # The same key again: the chosen config is launched directly (no autotuner), with the same result.
        x, W, b, A, B, routes, gy = make_inputs(Case(torch.float32, 40, 36, 33, 4, 2, "minus1"))
        y1, h1 = launch.forward(x, W, b, A, B, routes, 2.0)
        before = launch.CALLS.copy()
        y2, h2 = launch.forward(x, W, b, A, B, routes, 2.0)
        assert torch.equal(y1, y2) and torch.equal(h1, h2)
        assert not any(k.startswith("autotuned_") for k in (launch.CALLS - before)), dict(launch.CALLS - before)
    tuned = {k[0]: t for k, t in launch._AUTOTUNERS.items() if k[1]}
    assert set(tuned) >= {"linear", "linear_lora"}
    assert all(getattr(t, "best_config", None) is not None for t in tuned.values())


def test_auto_choice_measures_once_caches_and_skips_failing_variants(monkeypatch):
    """The `auto` logic without a GPU: the timer is replaced, the key is a CUDA-like one."""
    timings = {"fused": 3.0, "cublas": 2.0, "torch": 2.5}
    calls = []

    def fake_time(fn, calls_=10, replays=3):
        name = fn()
        calls.append(name)
        return timings[name]

    def broken():
        raise RuntimeError("out of shared memory")

    monkeypatch.setitem(launch._TIMER, "fn", fake_time)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    key = ("cuda:0:fake", "forward", torch.bfloat16, 64, 32, 32, 4, 2, True)
    launch.VARIANT_CACHE.pop(key, None)
    cands = {"fused": broken, "cublas": lambda: "cublas", "torch": lambda: "torch"}
    assert launch._choose("forward", key, cands) == "cublas"
    assert launch._choose("forward", key, cands) == "cublas"  # cached: measured once
    assert calls == ["cublas", "torch"]
    assert "out of shared memory" in launch.VARIANT_ERRORS[key + ("fused",)]
    launch.set_variant("torch")
    assert launch._choose("forward", key, cands) == "torch"  # a forced variant wins over the cache
    launch.VARIANT_CACHE.pop(key, None)


def test_zero_tokens():
    x, W, b, A, B, routes, gy = make_inputs(Case(torch.float32, 0, 20, 19, 4, 2, "random"))
    y, h = launch.forward(x, W, b, A, B, routes, 2.0)
    assert y.shape == (0, 19) and h.shape == (0, 8)
    dx, dA, dB = launch.backward(gy, x, W, A, B, routes, h, 2.0, True)
    assert dx.shape == (0, 20) and torch.all(dA == 0) and torch.all(dB == 0)


def test_cpu_tensor_without_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    x, W, b, A, B, routes, gy = make_inputs(CASES[0])
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        launch.forward(x, W, b, A, B, routes, 2.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_public_layer_with_triton_backend(dtype):
    """RoutedLoRALinear with set_backend("triton") runs the kernels; every gradient matches the torch backend."""
    torch.manual_seed(0)
    layer = rl.RoutedLoRALinear(24, 19, r=4, lora_alpha=8, adapters=("reasoning", "tool", "extra"), dtype=dtype)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.5)
        layer.bias.normal_()
    x = torch.randn(2, 9, 24, dtype=dtype)
    routes = torch.randint(-1, 2, (2, 9))  # adapter "extra" owns no token
    results = {}
    for backend in ("torch", "triton"):
        rl.set_backend(backend)
        try:
            layer.zero_grad(set_to_none=True)
            xi = x.clone().requires_grad_(True)
            before = launch.CALLS.copy()
            y = layer(xi, routes)
            y.float().square().sum().backward()
            calls = launch.CALLS - before
        finally:
            rl.set_backend("auto")
        results[backend] = (y.detach(), xi.grad, layer.lora_A.grad.clone(), layer.lora_B.grad.clone(), calls)
    yt, dxt, dAt, dBt, calls = results["triton"]
    assert calls["forward_fused"] == 1 and calls["backward_fused"] == 1, dict(calls)
    assert not results["torch"][4], "the torch backend launched kernels"
    assert yt.dtype == dtype and dxt.dtype == dtype and dAt.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 6e-2
    for name, got, want in zip(("y", "dx", "dA", "dB"), results["triton"][:4], results["torch"][:4]):
        scale = max(1.0, want.double().abs().max().item())
        err = (got.double() - want.double()).abs().max().item()
        assert err <= tol * scale, f"{name}: triton vs torch backend max |err| {err:.3g} (scale {scale:.3g})"
    assert torch.all(dAt[2] == 0) and torch.all(dBt[2] == 0)


def test_shared_memory_fallback_retries_smaller_configs(monkeypatch):
    """A launch the GPU refuses for shared memory (fp32 at BLOCK_R = 128 on an H200, seen there) is retried with
    fewer pipeline stages / the other shipped configs, and the one that fits is kept for later calls; if none
    fits the original error is raised. The kernel is a fake that refuses every config with more than one stage."""
    from triton.runtime.errors import OutOfResources

    launched = []
    limit = {"stages": 1}

    class FakeKernel:
        def __getitem__(self, grid):
            def run(*args, num_warps, num_stages):
                if num_stages > limit["stages"]:
                    raise OutOfResources(262144, 232448, "shared memory")
                launched.append((grid, num_stages))

            return run

    for reader in (compiled, tuning):
        monkeypatch.setattr(reader, "_jit_or_interpreted", lambda name, interpret: FakeKernel())
    cfg = launch.LINEAR_CONFIGS[0]
    meta = {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    grid = lambda m: (m["BLOCK_M"],)  # noqa: E731
    tail = {"BLOCK_M": 0, "BLOCK_N": 0, "BLOCK_K": 0, "GROUP_M": 0}
    L = launch._Launch("linear", True, tail, meta, grid)
    L._set_meta(meta)
    before = launch.CALLS["shared_memory_fallback"]
    L.run(L.g0, L.g1, L.g2, None, None, None, None, None, None, "arg", *L.tail)
    assert launched[-1][1] == 1 and L.meta["num_stages"] == 1 and L.meta["BLOCK_M"] == cfg.kwargs["BLOCK_M"]
    assert launch.CALLS["shared_memory_fallback"] == before + 1
    assert dict(zip(L.tail_names, L.tail))["BLOCK_M"] == cfg.kwargs["BLOCK_M"]
    limit["stages"] = 0  # nothing fits: the original error surfaces
    L2 = launch._Launch("linear", True, tail, meta, grid)
    L2._set_meta(meta)
    with pytest.raises(OutOfResources):
        L2.run(L2.g0, L2.g1, L2.g2, None, None, None, None, None, None, "arg", *L2.tail)


def test_auto_times_by_cuda_graph_replay(monkeypatch):
    """`auto` times device work: the calls are captured once in a CUDA graph and the replays are timed between
    events (per-call time = replay time / calls), so host time is not measured. torch.cuda is faked here."""
    log = []

    class FakeGraph:
        def replay(self):
            log.append("replay")

    class FakeCapture:
        def __init__(self, graph):
            pass

        def __enter__(self):
            log.append("capture")

        def __exit__(self, *exc):
            log.append("end_capture")

    class FakeEvent:
        times = iter([0.0, 3.0, 10.0, 14.0, 20.0, 25.0])

        def __init__(self, enable_timing=False):
            self.t = None

        def record(self):
            self.t = next(FakeEvent.times)

        def elapsed_time(self, end):
            return end.t - self.t

    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", FakeCapture)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    assert launch._TIMER["fn"] is launch.device_time_ms
    ms = launch.device_time_ms(lambda: log.append("call"), calls=10, replays=3)
    assert ms == pytest.approx(4.0 / 10)  # replays took 3, 4, 5 ms for 10 calls each: median 4
    assert log[:13] == ["call", "capture"] + ["call"] * 10 + ["end_capture"]
    assert log.count("replay") == 4 and "call" not in log[13:]  # one warm replay + three timed, no eager calls


@pytest.mark.parametrize(
    "case",
    [
        Case(torch.float32, 37, 40, 24, 4, 2, "minus1"),
        Case(torch.float16, 17, 48, 40, 8, 3, "empty"),
        Case(torch.bfloat16, 33, 32, 56, 16, 2, "random", bias=False),
    ],
    ids=lambda c: c.id,
)
def test_tma_gemm_matches_reference(case):
    """The sm_90 GEMM (TMA descriptors, persistent tile loop) under the interpreter, forward and dx, with a
    persistent grid smaller than the tile count (3 programs)."""
    launch.set_interpreter_plan(sm_count=3, tma=True)
    run_case(case, gemm="linear_tma")


def test_tma_falls_back_when_operands_are_not_tma_aligned():
    """A row stride that is not a multiple of 16 bytes (K = 37 fp32) cannot be described: the plain kernel runs."""
    launch.set_interpreter_plan(sm_count=3, tma=True)
    run_case(Case(torch.float32, 17, 37, 24, 4, 2, "minus1"), gemm="linear")


def test_tma_version_and_arch_gate():
    assert launch.tma_supported("3.6.0", (9, 0))
    assert launch.tma_supported("3.9.1+git", (9, 0))
    assert not launch.tma_supported("3.3.1", (9, 0))  # no tl.make_tensor_descriptor yet
    assert not launch.tma_supported("3.6.0", (8, 0))  # Ampere keeps cp.async
    assert not launch.tma_supported("3.6.0", (10, 0))  # Blackwell: not tuned or tested here
    assert not launch.tma_supported("3.6.0", (9, 0), has_descriptors=False)


def test_autotuning_with_no_fitting_config_falls_back_to_fewer_stages(monkeypatch):
    """Every autotuning config refused for shared memory (fp32 operands in the sm_90 TMA tiles would be): the
    first shipped config is retried with fewer stages instead of failing the call."""
    from triton.runtime.errors import OutOfResources

    launched = []

    class Refusing:
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                raise OutOfResources(300000, 232448, "shared memory")

            return run

    class FakeKernel:
        def __getitem__(self, grid):
            def run(*args, num_warps, num_stages):
                if num_stages > 2:
                    raise OutOfResources(262144, 232448, "shared memory")
                launched.append(num_stages)

            return run

    monkeypatch.setattr(compiled, "_autotuner", lambda name, interpret: Refusing())
    for reader in (compiled, tuning):
        monkeypatch.setattr(reader, "_jit_or_interpreted", lambda name, interpret: FakeKernel())
    tail = {"BLOCK_M": 0, "BLOCK_N": 0, "BLOCK_K": 0, "GROUP_M": 0}
    L = launch._Launch("linear_tma", True, tail, None, lambda m: (1,))
    L.run(L.g0, L.g1, L.g2, None, None, None, None, None, None, "arg", *L.tail)
    assert launched == [2] and L.meta["num_stages"] == 2
    assert L.meta["BLOCK_N"] == launch.TMA_CONFIGS[0].kwargs["BLOCK_N"]
