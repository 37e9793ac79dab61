"""torch.library registration: opcheck, and torch.compile(fullgraph=True) forward and backward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import routed_lora as rl
from routed_lora.ops import routed_lora_backward, routed_lora_forward


def _args(M=9, K=12, N=7, E=2, r=4, dtype=torch.float32, bias=True):
    torch.manual_seed(0)
    x = torch.randn(M, K, dtype=dtype, requires_grad=True)
    W = torch.randn(N, K, dtype=dtype)
    b = torch.randn(N, dtype=dtype) if bias else None
    A = torch.randn(E, r, K, dtype=dtype, requires_grad=True)
    B = torch.randn(E, N, r, dtype=dtype, requires_grad=True)
    routes = torch.randint(-1, E, (M,), dtype=torch.int32)
    return x, W, b, A, B, routes


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_forward(bias):
    x, W, b, A, B, routes = _args(bias=bias)
    torch.library.opcheck(routed_lora_forward, (x, W, b, A, B, routes, 2.0))


@pytest.mark.parametrize("compute_dx", [True, False])
def test_opcheck_backward(compute_dx):
    x, W, b, A, B, routes = _args()
    y, h = routed_lora_forward(x.detach(), W, b, A.detach(), B.detach(), routes, 2.0)
    g = torch.randn_like(y)
    torch.library.opcheck(routed_lora_backward, (g, x.detach(), W, A.detach(), B.detach(), routes, h, 2.0, compute_dx))


@pytest.mark.parametrize("x_grad", [True, False])
def test_eager_function_equals_custom_op(x_grad):
    """The eager autograd.Function and the custom op (used under torch.compile) give bit-identical results."""
    from routed_lora.ops import routed_lora_apply

    results = []
    for use_op in (True, False):
        x, W, b, A, B, routes = _args(M=13)
        x.requires_grad_(x_grad)
        y, h = routed_lora_apply(x, W, b, A, B, routes, 2.0, use_custom_op=use_op)
        assert use_op or not h.requires_grad  # the Function marks h non-differentiable
        (y * torch.arange(y.numel(), dtype=y.dtype).reshape(y.shape)).sum().backward()
        results.append((y.detach(), h.detach(), x.grad, A.grad, B.grad))
    for a, b_ in zip(*results):
        assert (a is None and b_ is None) or torch.equal(a, b_)
    assert (results[0][2] is None) == (not x_grad)


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = rl.RoutedLoRALinear(16, 24, r=4)
        self.b = rl.RoutedLoRALinear(24, 8, r=4, bias=False)
        for m in (self.a, self.b):
            nn.init.normal_(m.lora_B)

    def forward(self, x, routes):
        return self.b(torch.relu(self.a(x, routes)), routes)


def test_compile_fullgraph_forward_backward():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TwoLayer()
    x = torch.randn(3, 5, 16, requires_grad=True)
    routes = torch.randint(-1, 2, (3, 5))
    y_eager = model(x, routes)
    y_eager.sum().backward()
    grads_eager = [p.grad.clone() for p in (model.a.lora_A, model.a.lora_B, model.b.lora_A, model.b.lora_B)]
    dx_eager = x.grad.clone()
    model.zero_grad(set_to_none=True)
    x.grad = None

    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    y = compiled(x, routes)
    y.sum().backward()
    torch.testing.assert_close(y, y_eager)
    torch.testing.assert_close(x.grad, dx_eager)
    for got, want in zip((model.a.lora_A, model.a.lora_B, model.b.lora_A, model.b.lora_B), grads_eager):
        torch.testing.assert_close(got.grad, want)


def test_compile_inductor_with_set_routes():
    torch._dynamo.reset()
    model = TwoLayer()
    x = torch.randn(2, 4, 16)
    routes = torch.randint(-1, 2, (2, 4))
    rl.set_routes(model, routes)
    compiled = torch.compile(model.b, fullgraph=True)
    h = torch.randn(2, 4, 24)
    out = compiled(h)
    out.sum().backward()
    torch.testing.assert_close(out, model.b(h, routes))
    assert model.b.lora_A.grad is not None
