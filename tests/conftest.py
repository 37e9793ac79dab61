"""Shared fixtures."""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: with tiny models on 2 shared cores extra threads mostly spin (up to 30x
    slower under load)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def bf16_interpreter_dot(monkeypatch):
    """Triton's interpreter multiplies the raw bits of bf16 operands in tl.dot (errors of 1e11): widen bf16
    operands to fp32 exactly first, which is what a GPU's bf16 MMA with fp32 accumulation computes. The harness
    is patched, never the kernel."""
    import triton.language as tl
    from triton.runtime import interpreter as interp

    original = interp.InterpreterBuilder.create_dot

    def widen(h):
        if h.dtype.scalar != tl.bfloat16:
            return h
        bits = h.data.astype(np.uint32) << np.uint32(16)
        return interp.TensorHandle(bits.view(np.float32), tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(interp.InterpreterBuilder, "create_dot", create_dot)


@pytest.fixture
def triton_interpreter(monkeypatch):
    """Run the Triton launchers under the interpreter with one dispatch variant (``use("fused")``), the
    interpreter's plan and no pinned configs; everything is restored afterwards."""
    from routed_lora.kernels import launch

    def use(variant: str = "auto") -> None:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        launch.set_variant(variant)
        launch.pin_configs(False)
        launch.set_interpreter_plan()

    yield use
    launch.set_variant("auto")
    launch.pin_configs(False)
    launch.autotune_in_interpreter(False)
    launch.set_interpreter_plan()
