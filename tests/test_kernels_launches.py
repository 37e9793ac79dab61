"""Launch floor, scratch and host cost of the Triton path (issue 11, items 1 and 2), checked on the CPU.

* The plan is a pure function of (shape, dtype size, SM count): a 132-SM GPU plan is built here and run under
  the interpreter with the GPU's tiles, and its split reductions are exercised (K, N and M above 256).
* Kernel launches are counted where the interpreter runs a grid (``GridExecutor.__call__``), and every aten op
  issued outside kernels is recorded with a ``TorchDispatchMode``: the fused forward is exactly 2 launches and
  2 allocations (y, h), the backward 3 launches and 3 allocations (dx, dA, dB), and nothing else.
* Scratch at the issue shape (M = 8192, K = N = 4096, r = 16, E = 2, bf16, 132 SMs) is at most 4 MiB and is
  allocated once, not per call.
* Python function calls per layer fwd + bwd with the kernel launches stubbed: at most 120.
"""

from __future__ import annotations

import collections
import os
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

triton = pytest.importorskip("triton")

import routed_lora as rl  # noqa: E402
from routed_lora.kernels import launch  # noqa: E402
from routed_lora.reference import reference_backward, reference_forward  # noqa: E402


@pytest.fixture(autouse=True)
def interpreter(triton_interpreter):
    triton_interpreter("fused")


class _Recorder(TorchDispatchMode):
    """Records aten ops issued outside kernel execution and counts kernel launches (interpreter grids)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.launches = 0
        self.in_kernel = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.in_kernel:
            self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def recorder(monkeypatch):
    from triton.runtime import interpreter as interp

    rec = _Recorder()
    original = interp.GridExecutor.__call__

    def counted(self, *args, **kwargs):
        rec.launches += 1
        rec.in_kernel = True
        try:
            return original(self, *args, **kwargs)
        finally:
            rec.in_kernel = False

    monkeypatch.setattr(interp.GridExecutor, "__call__", counted)
    return rec


def _inputs(M, K, N, r, E, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x, W, b = rnd(M, K), rnd(N, K) / K**0.5, rnd(N)
    A, B = rnd(E, r, K) / K**0.5, rnd(E, N, r) / r**0.5
    routes = torch.randint(-1, E, (M,), generator=g).to(torch.int32)
    return x, W, b, A, B, routes, rnd(M, N)


def test_plan_is_pure_and_fits_the_scratch_budget():
    p = launch.make_plan(8192, 4096, 4096, 16, 2, 2, 132)
    launch.make_plan.cache_clear()
    assert launch.make_plan(8192, 4096, 4096, 16, 2, 2, 132) == p  # same inputs, same plan (no device query)
    assert p.scratch_bytes <= 4 << 20, f"scratch {p.scratch_bytes} B > 4 MiB: {p}"
    assert launch.scratch_bytes(8192, 4096, 4096, 16, 2) == p.scratch_bytes
    # The issue shape's G/dB partials were 43.4 MB before (33.5 MB of them dB partials).
    assert p.part_bytes <= 3 << 20 and p.g_bytes == 8192 * 32 * 2
    # Small M (decode) splits the reduction instead; still within budget.
    for M in (1, 16, 64, 512):
        q = launch.make_plan(M, 4096, 4096, 16, 2, 2, 132)
        assert q.shrink_x.splits > 1 and q.scratch_bytes <= 4 << 20, q


def test_132_sm_plan_launch_floor_and_no_other_aten_ops(recorder):
    launch.set_interpreter_plan(sm_count=132, gpu_tiles=True)
    M, K, N, r, E = 257, 260, 257, 4, 2
    p = launch.make_plan(M, K, N, r, E, 4, 132)
    assert p.shrink_x.splits > 1 and p.shrink_g.splits > 1 and p.grad_ab.splits > 1, p
    x, W, b, A, B, routes, gy = _inputs(M, K, N, r, E)
    s = 2.0
    _, h = launch.forward(x, W, b, A, B, routes, s)  # first calls of the keys: plan, arena, JIT
    first = launch.backward(gy, x, W, A, B, routes, h, s, True)
    arenas = launch.CALLS["arena_allocations"]
    recorder.launches = 0
    with recorder:
        y, h = launch.forward(x, W, b, A, B, routes, s)
    fwd_ops, fwd_launches = dict(recorder.ops), recorder.launches
    recorder.ops.clear()
    recorder.launches = 0
    with recorder:
        dx, dA, dB = launch.backward(gy, x, W, A, B, routes, h, s, True)
    bwd_ops, bwd_launches = dict(recorder.ops), recorder.launches
    assert fwd_launches == 2, f"forward launched {fwd_launches} kernels"
    assert bwd_launches == 3, f"backward launched {bwd_launches} kernels"
    assert fwd_ops == {"aten.empty.memory_format": 2}, f"forward aten ops besides y, h: {fwd_ops}"
    assert bwd_ops == {"aten.empty.memory_format": 3}, f"backward aten ops besides dx, dA, dB: {bwd_ops}"
    assert launch.CALLS["arena_allocations"] == arenas, "scratch allocated again on a cached call"
    # ... and the results are right (the in-kernel split sums), bit-identical on repeat.
    y64, _ = reference_forward(x, W, b, A, B, routes, s, compute_dtype=torch.float64)
    r64 = reference_backward(gy, x, W, A, B, routes, h, s, True, compute_dtype=torch.float64)
    for name, got, want in zip(("y", "dx", "dA", "dB"), (y, dx, dA, dB), (y64, *r64)):
        err = (got.double() - want).abs().max().item()
        assert err < 1e-3 * max(1.0, want.abs().max().item()), f"{name}: max |err| {err:.3g}"
    assert all(torch.equal(a, b_) for a, b_ in zip(first, (dx, dA, dB))), "repeated backward not bit-identical"


def test_python_calls_per_layer_step_with_launches_stubbed():
    """Host cost: the whole layer fwd + bwd (module call, validation, autograd Function, launcher) in Python
    function calls, once the key is cached and with each kernel launch replaced by a stub (counted: 1 call)."""
    rl.set_backend("triton")
    try:
        layer = rl.RoutedLoRALinear(32, 24, r=4, adapters=("a", "b"))
        x = torch.randn(8, 32, requires_grad=True)
        routes = torch.randint(-1, 2, (8,), dtype=torch.int32)

        def step():
            y = layer(x, routes)
            y.backward(torch.ones_like(y))

        step()  # caches the key, compiles (interprets) once
        stubbed = 0

        def stub(*args):
            return None

        for calls in (launch._FORWARD_CALLS, launch._BACKWARD_CALLS):
            for c in calls.values():
                c = getattr(c, "call", c)
                for name in ("shrink", "linear", "grad_ab"):
                    if hasattr(c, name):
                        getattr(c, name).run = stub
                        stubbed += 1
        counts = collections.Counter()

        def prof(frame, event, arg):
            if event == "call":
                counts[f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_code.co_name}"] += 1

        before = launch.CALLS.copy()
        sys.setprofile(prof)
        try:
            step()
        finally:
            sys.setprofile(None)
        ran = launch.CALLS - before
        assert ran["shrink"] == 2 and ran["linear"] == 2 and ran["grad_ab"] == 1, dict(ran)
        total = sum(counts.values())
        assert total <= 120, f"{total} Python calls per fwd+bwd: {counts.most_common(25)}"
    finally:
        rl.set_backend("auto")
        launch._FORWARD_CALLS.clear()
        launch._BACKWARD_CALLS.clear()
