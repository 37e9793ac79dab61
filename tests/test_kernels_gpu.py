"""The Triton kernels on a CUDA device (skipped without one): real launches, autotuning and the variant choice.

``benchmarks/gpu_check.py`` runs the same checks at the benchmark shape and times them.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

if torch.cuda.is_available():
    triton = pytest.importorskip("triton")
    import routed_lora as rl
    from routed_lora.kernels import launch
    from routed_lora.reference import reference_backward, reference_forward

ATOL = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 1e-1}


@pytest.fixture(autouse=True)
def _reset():
    # One config per kernel unless a test unpins: autotuning every (dtype, rank, flags) combination would mean
    # hundreds of JIT compilations.
    launch.set_variant("auto")
    launch.set_deterministic(True)
    launch.pin_configs(True)
    yield
    launch.set_variant("auto")
    launch.set_deterministic(True)
    launch.pin_configs(False)


def _inputs(M, K, N, r, E, dtype, seed=0, minus1=True):
    g = torch.Generator(device="cuda").manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, device="cuda")  # noqa: E731
    x = rnd(M, K).to(dtype)
    W = (rnd(N, K) / K**0.5).to(dtype)
    b = rnd(N).to(dtype)
    A = (rnd(E, r, K) / K**0.5).to(dtype)
    B = (rnd(E, N, r) / r**0.5).to(dtype)
    lo = -1 if minus1 else 0
    routes = torch.randint(lo, E, (M,), generator=g, device="cuda", dtype=torch.int32)
    gy = rnd(M, N).to(dtype)
    return x, W, b, A, B, routes, gy


def _check(name, got, ref64, low, atol):
    assert got.dtype == low.dtype, f"{name}: dtype {got.dtype} != {low.dtype}"
    err = (got.double() - ref64).abs().max().item()
    bound = 2 * (low.double() - ref64).abs().max().item() + atol
    assert err <= bound, f"{name}: max |err| {err:.3g} > {bound:.3g}"


def _compare(x, W, b, A, B, routes, gy, variant):
    launch.set_variant(variant)
    s = 2.0
    y, h = launch.forward(x, W, b, A, B, routes, s)
    y64, h64 = reference_forward(x, W, b, A, B, routes, s, compute_dtype=torch.float64)
    yl, hl = reference_forward(x, W, b, A, B, routes, s)
    atol = ATOL[x.dtype] * max(1.0, y64.abs().max().item() / 8)
    _check("y", y, y64, yl, atol)
    _check("h", h, h64, hl, atol)
    dx, dA, dB = launch.backward(gy, x, W, A, B, routes, hl, s, True)
    r64 = reference_backward(gy, x, W, A, B, routes, hl, s, True, compute_dtype=torch.float64)
    rlow = reference_backward(gy, x, W, A, B, routes, hl, s, True)
    for name, got, ref, low in zip(("dx", "dA", "dB"), (dx, dA, dB), r64, rlow):
        scale = max(1.0, ref.abs().max().item() / 8)
        _check(name, got, ref, low, ATOL[x.dtype] * scale * (1 if name == "dx" else 4))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("variant", ["fused", "cublas"])
@pytest.mark.parametrize("M,K,N,r,E", [(1, 256, 384, 8, 2), (17, 1000, 520, 16, 3), (1000, 512, 1000, 4, 2),
                                       (333, 256, 256, 128, 8)])
def test_kernels_match_reference(M, K, N, r, E, variant, dtype):
    _compare(*_inputs(M, K, N, r, E, dtype), variant)


@pytest.mark.parametrize("variant", ["fused", "cublas"])
def test_autotuned_kernels_match_reference(variant):
    launch.pin_configs(False)
    _compare(*_inputs(4096, 1024, 1024, 16, 2, torch.bfloat16), variant)


def test_auto_measures_once_and_caches():
    x, W, b, A, B, routes, gy = _inputs(2048, 1024, 1024, 16, 2, torch.bfloat16)
    launch.VARIANT_CACHE.clear()
    before = launch.CALLS.copy()
    _compare(x, W, b, A, B, routes, gy, "auto")
    _compare(x, W, b, A, B, routes, gy, "auto")
    calls = launch.CALLS - before
    assert calls["measured_forward"] == 1 and calls["measured_backward"] == 1, dict(calls)
    assert all(v in ("fused", "cublas", "torch") for v in launch.VARIANT_CACHE.values())


def test_deterministic_backward_is_bitwise_reproducible():
    x, W, b, A, B, routes, gy = _inputs(4096, 512, 512, 16, 2, torch.bfloat16)
    _, h = launch.forward(x, W, b, A, B, routes, 2.0)
    first = launch.backward(gy, x, W, A, B, routes, h, 2.0, True)
    for _ in range(3):
        again = launch.backward(gy, x, W, A, B, routes, h, 2.0, True)
        for a, b_ in zip(first, again):
            assert torch.equal(a, b_)


def test_empty_adapter_gets_exact_zeros_on_gpu():
    x, W, b, A, B, routes, gy = _inputs(1000, 256, 256, 8, 3, torch.bfloat16)
    routes = torch.where(routes == 1, torch.zeros_like(routes), routes)
    for det in (True, False):
        launch.set_deterministic(det)
        _, h = launch.forward(x, W, b, A, B, routes, 2.0)
        _, dA, dB = launch.backward(gy, x, W, A, B, routes, h, 2.0, False)
        assert torch.all(dA[1] == 0) and torch.all(dB[1] == 0)


def test_layer_compiled_and_autocast():
    layer = rl.RoutedLoRALinear(512, 256, r=8, device="cuda")
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 64, 512, device="cuda", requires_grad=True)
    routes = torch.randint(-1, 2, (4, 64), device="cuda")
    compiled = torch.compile(layer, fullgraph=True)
    before = launch.CALLS.copy()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = compiled(x, routes)
    y.float().sum().backward()
    calls = launch.CALLS - before
    assert y.dtype == torch.bfloat16
    assert calls["forward"] >= 1 and calls["backward"] >= 1, dict(calls)
    assert layer.lora_A.grad is not None and x.grad is not None


def _kernels_in(fn):
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def test_launch_floor_on_gpu():
    """Fused forward = 2 kernels, fused backward = 3, nothing else on the device (issue 11, item 1)."""
    launch.set_variant("fused")
    x, W, b, A, B, routes, gy = _inputs(4096, 1024, 1024, 16, 2, torch.bfloat16)
    fwd = _kernels_in(lambda: launch.forward(x, W, b, A, B, routes, 2.0))
    _, h = launch.forward(x, W, b, A, B, routes, 2.0)
    bwd = _kernels_in(lambda: launch.backward(gy, x, W, A, B, routes, h, 2.0, True))
    assert len(fwd) == 2, fwd
    assert len(bwd) == 3, bwd


def test_layer_with_explicit_routes_adds_no_kernel_after_the_first_check():
    """layer(x, routes): the route values are checked once per routes tensor (an async assert, five small
    kernels); later calls on the unchanged tensor launch the fused forward's two kernels only."""
    launch.set_variant("fused")
    x, W, b, A, B, routes, _ = _inputs(4096, 1024, 1024, 16, 2, torch.bfloat16)
    layer = rl.RoutedLoRALinear(1024, 1024, r=16, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.02)
    x.requires_grad_(True)
    fwd = _kernels_in(lambda: layer(x, routes))  # _kernels_in runs it once before profiling
    assert len(fwd) == 2, fwd
    launch.set_variant("auto")


def test_tma_gemm_on_sm90():
    if torch.cuda.get_device_capability()[0] != 9 or not launch._device_tma(torch.cuda.current_device()):
        pytest.skip("TMA GEMM is for sm_90 with a Triton that has tl.make_tensor_descriptor")
    launch.set_variant("fused")
    x, W, b, A, B, routes, gy = _inputs(1000, 512, 384, 16, 2, torch.bfloat16)
    before = launch.CALLS.copy()
    _compare(x, W, b, A, B, routes, gy, "fused")
    calls = launch.CALLS - before
    assert calls["linear_tma"] == 2 and calls["linear"] == 0, dict(calls)


def test_non_finite_isolation_on_gpu():
    x, W, b, A, B, routes, gy = _inputs(1000, 512, 384, 8, 3, torch.bfloat16)
    routes = torch.where(routes == 2, torch.ones_like(routes), routes)  # adapter 2 owns no token
    routes[5], routes[6] = 1, -1
    _, h = launch.forward(x, W, b, A, B, routes, 2.0)
    _, dA, dB = launch.backward(gy, x, W, A, B, routes, h, 2.0, False)
    x2, g2 = x.clone(), gy.clone()
    x2[5, 3] = float("nan")
    x2[6, 4] = float("inf")
    g2[5, 7] = float("nan")
    g2[6, 1] = float("-inf")
    _, h2 = launch.forward(x2, W, b, A, B, routes, 2.0)
    _, dA2, dB2 = launch.backward(g2, x2, W, A, B, routes, h2, 2.0, False)
    assert torch.equal(dA2[0], dA[0]) and torch.equal(dB2[0], dB[0])
    assert torch.all(dA2[2] == 0) and torch.all(dB2[2] == 0)


def test_cuda_graph_training_step_recipe():
    """The documented recipe: torch.cuda.make_graphed_callables on a routed layer (routes set once), forward and
    backward replayed from a graph, equal to the eager step."""
    torch.manual_seed(0)
    layer = rl.RoutedLoRALinear(512, 384, r=16, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
    routes = torch.randint(-1, 2, (256,), device="cuda", dtype=torch.int32)
    rl.set_routes(layer, routes)
    x = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    y.float().square().sum().backward()
    eager = (y.detach().clone(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone())
    layer.zero_grad(set_to_none=True)
    graphed = torch.cuda.make_graphed_callables(layer, (x.detach().clone().requires_grad_(True),))
    layer.zero_grad(set_to_none=True)
    x2 = x.detach().clone().requires_grad_(True)
    y2 = graphed(x2)
    y2.float().square().sum().backward()
    torch.cuda.synchronize()
    assert torch.equal(y2.detach(), eager[0])
    assert torch.equal(layer.lora_A.grad, eager[1]) and torch.equal(layer.lora_B.grad, eager[2])
