"""RoutedLoRALinear against an independent float64 per-token implementation, every gradient compared."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import routed_lora as rl
from routed_lora.reference import reference_forward


def per_token_reference(x, W, b, A, B, routes, s):
    """Independent oracle: a Python loop over tokens in float64, autograd for the gradients."""
    x, W, A, B = x.double(), W.double(), A.double(), B.double()
    b = None if b is None else b.double()
    rows = []
    flat = x.reshape(-1, x.shape[-1])
    rflat = routes.reshape(-1).tolist()
    for m, k in enumerate(rflat):
        y = W @ flat[m]
        if b is not None:
            y = y + b
        if k >= 0:
            y = y + s * (B[k] @ (A[k] @ flat[m]))
        rows.append(y)
    return torch.stack(rows).reshape(*x.shape[:-1], W.shape[0])


def make_layer(K, N, r=4, E=2, bias=True, dtype=torch.float64, alpha=None, seed=0):
    torch.manual_seed(seed)
    names = tuple(f"a{i}" for i in range(E))
    layer = rl.RoutedLoRALinear(K, N, bias=bias, r=r, lora_alpha=alpha or 2 * r, adapters=names, dtype=dtype)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.5)
        if bias:
            layer.bias.normal_()
    return layer


def compare_with_oracle(layer, x, routes, atol=1e-10, rtol=1e-9):
    x = x.detach().requires_grad_(True)
    y = layer(x, routes)
    g = torch.randn_like(y)
    y.backward(g)
    xo = x.detach().double().requires_grad_(True)
    Ao = layer.lora_A.detach().double().requires_grad_(True)
    Bo = layer.lora_B.detach().double().requires_grad_(True)
    yo = per_token_reference(xo, layer.weight, layer.bias, Ao, Bo, routes, layer.scaling)
    yo.backward(g.double())
    for t in (Ao, Bo):  # an adapter used by no token gets no gradient at all from the loop
        if t.grad is None:
            t.grad = torch.zeros_like(t)
    for name, got, want in [
        ("y", y, yo),
        ("dx", x.grad, xo.grad),
        ("dA", layer.lora_A.grad, Ao.grad),
        ("dB", layer.lora_B.grad, Bo.grad),
    ]:
        assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
        err = (got.double() - want).abs()
        tol = atol + rtol * want.abs()
        bad = (err > tol).nonzero()
        assert bad.numel() == 0, f"{name}: max err {err.max():.3g} at index {bad[0].tolist()}"


@pytest.mark.parametrize("M", [1, 17, 1000])
@pytest.mark.parametrize("K,N,r,E", [(13, 7, 3, 2), (24, 40, 8, 3), (33, 17, 1, 1)])
def test_matches_per_token_oracle(M, K, N, r, E):
    layer = make_layer(K, N, r=r, E=E)
    x = torch.randn(M, K, dtype=torch.float64)
    routes = torch.randint(-1, E, (M,))
    compare_with_oracle(layer, x, routes)


@pytest.mark.parametrize("case", ["all_minus1", "all_0", "all_1", "no_adapter1", "random"])
def test_routing_cases(case):
    M, K, N = 37, 11, 9
    layer = make_layer(K, N, r=4, E=2)
    routes = {
        "all_minus1": torch.full((M,), -1),
        "all_0": torch.zeros(M, dtype=torch.long),
        "all_1": torch.ones(M, dtype=torch.long),
        "no_adapter1": torch.randint(-1, 1, (M,)),
        "random": torch.randint(-1, 2, (M,)),
    }[case]
    compare_with_oracle(layer, torch.randn(M, K, dtype=torch.float64), routes)


def test_3d_and_noncontiguous_input():
    layer = make_layer(16, 10, r=4, E=2)
    base = torch.randn(5, 16, 7, dtype=torch.float64)
    x = base.transpose(1, 2)  # (5, 7, 16), non-contiguous
    assert not x.is_contiguous()
    routes = torch.randint(-1, 2, (5, 7))
    compare_with_oracle(layer, x, routes)


def test_adapter_without_tokens_gets_exact_zero_grad():
    layer = make_layer(12, 8, r=4, E=3)
    x = torch.randn(50, 12, dtype=torch.float64)
    routes = torch.randint(-1, 2, (50,))  # adapter 2 owns nothing
    layer(x, routes).sum().backward()
    assert torch.count_nonzero(layer.lora_A.grad[2]) == 0
    assert torch.count_nonzero(layer.lora_B.grad[2]) == 0
    assert torch.count_nonzero(layer.lora_A.grad[0]) > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_other_adapter_upstream_grad_leaves_grad_bitwise_unchanged(dtype):
    layer = make_layer(32, 24, r=8, E=2, dtype=dtype)
    x = torch.randn(300, 32, dtype=dtype, requires_grad=True)
    routes = torch.randint(-1, 2, (300,))
    g = torch.randn(300, 24, dtype=dtype)
    layer(x, routes).backward(g)
    dA0, dB0 = layer.lora_A.grad[0].clone(), layer.lora_B.grad[0].clone()
    layer.zero_grad(set_to_none=True)
    g2 = g.clone()
    sel = routes == 1
    g2[sel] = 100 * torch.randn_like(g2[sel])
    layer(x, routes).backward(g2)
    assert torch.equal(layer.lora_A.grad[0], dA0)
    assert torch.equal(layer.lora_B.grad[0], dB0)
    assert not torch.equal(layer.lora_A.grad[1], torch.zeros_like(dA0))


@pytest.mark.parametrize("shape", [(1, 20), (17, 20), (3, 5, 20)])
def test_all_minus1_equals_nn_linear_exactly(shape):
    torch.manual_seed(1)
    lin = nn.Linear(20, 13)
    layer = rl.RoutedLoRALinear.from_linear(lin, r=4)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(*shape, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    routes = torch.full(shape[:-1], -1)
    y = layer(x, routes)
    y_ref = nn.functional.linear(x2, lin.weight.detach(), lin.bias.detach())
    assert torch.equal(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert torch.equal(x.grad, x2.grad)


def test_no_grad_to_weight_and_bias():
    layer = make_layer(10, 6, r=2)
    x = torch.randn(4, 10, dtype=torch.float64, requires_grad=True)
    layer(x, torch.tensor([0, 1, -1, 0])).sum().backward()
    assert layer.weight.grad is None and layer.bias.grad is None
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.lora_A.grad is not None


def test_input_without_grad_still_trains_adapters():
    layer = make_layer(10, 6, r=2)
    x = torch.randn(4, 10, dtype=torch.float64)
    layer(x, torch.tensor([0, 1, -1, 0])).sum().backward()
    assert layer.lora_B.grad.abs().sum() > 0


def test_gradcheck():
    layer = make_layer(6, 5, r=2, E=2)
    x = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    A = layer.lora_A.detach().clone().requires_grad_(True)
    B = layer.lora_B.detach().clone().requires_grad_(True)
    routes = torch.tensor([0, 1, -1, 1, 0, 0, -1])

    def f(x, A, B):
        return rl.routed_lora_linear(x, layer.weight, layer.bias, A, B, routes, layer.scaling)

    assert torch.autograd.gradcheck(f, (x, A, B))


@pytest.mark.parametrize("custom_op", [False, True])
def test_second_derivatives_raise_instead_of_being_wrong(custom_op):
    """Issue 23, item 11: the layer has no double backward. Its backward reads the h saved by the forward (not
    differentiable in A), so a graph through it would give wrong second derivatives silently (gradgradcheck
    failed with a Jacobian mismatch); instead a second backward raises, on the eager path (our message) and on
    the custom-op path (torch's: no autograd formula for routed_lora::backward), also when the loss mixes the
    layer's gradients with other terms (a gradient penalty: dropping the layer's part silently would be wrong).
    First derivatives with create_graph=True are still right."""
    from routed_lora.ops import routed_lora_apply

    layer = make_layer(6, 5, r=2, E=2)
    x = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    A = layer.lora_A.detach().clone().requires_grad_(True)
    B = layer.lora_B.detach().clone().requires_grad_(True)
    routes = torch.tensor([0, 1, -1, 1, 0, 0, -1], dtype=torch.int32)

    def f(x, A, B):
        return routed_lora_apply(x, layer.weight, layer.bias, A, B, routes, layer.scaling,
                                 use_custom_op=custom_op)[0]

    g = torch.randn(7, 5, dtype=torch.float64)
    dx, dA = torch.autograd.grad(f(x, A, B), (x, A), g, create_graph=True)
    xo, Ao, Bo = (t.detach().clone().requires_grad_(True) for t in (x, A, B))
    want = torch.autograd.grad(per_token_reference(xo, layer.weight, layer.bias, Ao, Bo, routes, layer.scaling),
                               (xo, Ao), g)
    torch.testing.assert_close(dx, want[0])
    torch.testing.assert_close(dA, want[1])
    match = "no autograd formula" if custom_op else "second derivatives through a RoutedLoRALinear"
    with pytest.raises(RuntimeError, match=match):
        torch.autograd.grad((dx * dx).sum() + (dA * dA).sum(), (x, A, B))
    dx, = torch.autograd.grad(f(x, A, B), x, g, create_graph=True)
    with pytest.raises(RuntimeError, match=match):
        torch.autograd.grad((dx * dx).sum() + (x * x).sum(), x)  # a penalty next to a plain term
    with pytest.raises(RuntimeError, match=match):
        torch.autograd.gradgradcheck(f, (x, A, B))


def test_float64_reference_option():
    layer = make_layer(9, 5, r=2, dtype=torch.float32)
    x = torch.randn(4, 9)
    routes = torch.tensor([0, 1, -1, 1], dtype=torch.int32)
    y64, h = reference_forward(
        x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, routes, layer.scaling, compute_dtype=torch.float64
    )
    assert y64.dtype == torch.float64 and h.shape == (4, 4)
    assert torch.allclose(y64.float(), layer(x, routes), atol=1e-5)


def test_init_matches_peft():
    torch.manual_seed(0)
    layer = rl.RoutedLoRALinear(64, 32, r=8)
    assert torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=sqrt(5)) with fan_in = in_features
    assert layer.lora_A.abs().max() <= bound
    assert layer.lora_A.abs().max() > 0.8 * bound
    assert layer.lora_A.shape == (2, 8, 64) and layer.lora_B.shape == (2, 32, 8)
    assert layer.scaling == 2.0
    assert rl.RoutedLoRALinear(64, 32, r=16, lora_alpha=16, use_rslora=True).scaling == pytest.approx(4.0)


def test_from_linear_shares_storage_and_keeps_dtype():
    lin = nn.Linear(12, 7, dtype=torch.float64)
    layer = rl.RoutedLoRALinear.from_linear(lin, r=3, adapters=("x", "y", "z"))
    assert layer.weight.data_ptr() == lin.weight.data_ptr()
    assert layer.bias.data_ptr() == lin.bias.data_ptr()
    assert layer.lora_A.dtype == torch.float64 and layer.lora_A.shape == (3, 3, 12)
    nobias = rl.RoutedLoRALinear.from_linear(nn.Linear(4, 3, bias=False))
    assert nobias.bias is None
    assert nobias(torch.randn(2, 4), torch.tensor([0, -1])).shape == (2, 3)


def test_state_dict_keys():
    layer = rl.RoutedLoRALinear(8, 4, r=2)
    assert set(layer.state_dict()) == {"weight", "bias", "lora_A", "lora_B"}
    lin = nn.Linear(8, 4)
    missing = lin.load_state_dict(layer.state_dict(), strict=False)
    assert not missing.missing_keys


def test_delta_weight_and_repr():
    layer = make_layer(6, 5, r=2)
    x = torch.randn(3, 6, dtype=torch.float64)
    y = layer(x, torch.ones(3, dtype=torch.long))
    want = nn.functional.linear(x, layer.weight + layer.delta_weight("a1"), layer.bias)
    assert torch.allclose(y, want)
    assert torch.equal(layer.delta_weight(1), layer.delta_weight("a1"))
    text = repr(layer)
    assert "r=2" in text and "adapters=('a0', 'a1')" in text and "scaling=2" in text
    with pytest.raises(KeyError, match="adapter"):
        layer.delta_weight("nope")


def test_set_routes_and_clear_routes():
    model = nn.Sequential(rl.RoutedLoRALinear(8, 8, r=2), nn.ReLU(), rl.RoutedLoRALinear(8, 4, r=2))
    x = torch.randn(2, 3, 8)
    with pytest.raises(RuntimeError, match="set_routes"):
        model(x)
    routes = torch.tensor([[0, 1, -1], [1, 1, 0]])
    rl.set_routes(model, routes)
    y1 = model(x)
    y2 = model[2](model[1](model[0](x, routes)), routes)
    assert torch.equal(y1, y2)
    rl.clear_routes(model)
    with pytest.raises(RuntimeError, match="no routes"):
        model(x)
    with pytest.raises(ValueError, match="adapter index"):
        rl.set_routes(model, torch.tensor([[0, 2, 0]]))
    with pytest.raises(ValueError, match="no RoutedLoRALinear"):
        rl.set_routes(nn.Linear(2, 2), routes)


def test_route_values_checked_once_per_tensor_version(monkeypatch):
    """Explicit routes: the values of one routes tensor are read once while it is unchanged (every layer of a
    model call passes the same one), and again after an in-place change, which is still refused."""
    from routed_lora import layer as L

    layer = rl.RoutedLoRALinear(8, 4, r=2)
    x = torch.randn(5, 8)
    routes = torch.tensor([0, 1, -1, 0, 1])
    reads = {"n": 0}
    real = L.validate_routes

    def counting(*a, check_values=True, **k):
        reads["n"] += bool(check_values)
        return real(*a, check_values=check_values, **k)

    monkeypatch.setattr(L, "validate_routes", counting)
    for _ in range(3):
        layer(x, routes)
    assert reads["n"] == 1
    routes[1] = 2  # in place: a new version, read again, refused
    with pytest.raises(ValueError, match="found 2"):
        layer(x, routes)
    with pytest.raises(ValueError, match="found 2"):  # a refused tensor is never remembered as checked
        layer(x, routes)
    routes[1] = 1
    layer(x, routes)
    layer(x, routes.clone())  # another tensor: read
    assert reads["n"] == 5
    rl.routed_lora_linear(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, routes, layer.scaling,
                          check_route_values=True)  # asked for: read whatever was seen
    assert reads["n"] == 6


def test_bad_inputs():
    layer = rl.RoutedLoRALinear(8, 4, r=2)
    x = torch.randn(5, 8)
    with pytest.raises(ValueError, match=r"routes: expected shape \(5,\)"):
        layer(x, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="found 2"):
        layer(x, torch.full((5,), 2))
    with pytest.raises(ValueError, match="found -2"):
        layer(x, torch.full((5,), -2))
    with pytest.raises(TypeError, match="routes: expected an integer dtype"):
        layer(x, torch.zeros(5))
    with pytest.raises(ValueError, match="in_features=8"):
        layer(torch.randn(5, 7), torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="x: expected dtype torch.float32"):
        layer(x.double(), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="r: expected an integer >= 1"):
        rl.RoutedLoRALinear(8, 4, r=0)
    with pytest.raises(ValueError, match="at least one adapter"):
        rl.RoutedLoRALinear(8, 4, adapters=())
    with pytest.raises(ValueError, match="duplicates"):
        rl.RoutedLoRALinear(8, 4, adapters=("a", "a"))
    with pytest.raises(ValueError, match="set_backend"):
        rl.set_backend("cuda")


def test_autocast_cpu_bf16():
    layer = make_layer(16, 8, r=4, dtype=torch.float32)
    x = torch.randn(6, 16, requires_grad=True)
    routes = torch.randint(-1, 2, (6,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x, routes)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32
    ref = layer(x.detach(), routes)
    assert torch.allclose(y.float(), ref, atol=0.1, rtol=0.05)


def test_fp32_adapters_on_lowp_backbone():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8, dtype=torch.bfloat16)
    layer = rl.RoutedLoRALinear.from_linear(lin, r=4)
    layer.lora_A.data = layer.lora_A.data.float()
    layer.lora_B.data = torch.randn_like(layer.lora_B, dtype=torch.float32)
    y = layer(torch.randn(5, 16, dtype=torch.bfloat16), torch.tensor([0, 1, -1, 0, 1]))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_B.grad.dtype == torch.float32


def test_zero_tokens():
    layer = make_layer(8, 4, r=2)
    x = torch.randn(0, 8, dtype=torch.float64, requires_grad=True)
    y = layer(x, torch.zeros(0, dtype=torch.long))
    assert y.shape == (0, 4)
    y.sum().backward()
    assert torch.count_nonzero(layer.lora_A.grad) == 0


def test_cached_constants_made_under_inference_mode_serve_training():
    """The route-mask constants are cached per device and dtype; one first made under inference_mode must still
    work in a training step (an inference tensor would raise there)."""
    from routed_lora import reference

    reference._CONSTANTS.clear()
    torch.manual_seed(0)
    layer = rl.RoutedLoRALinear(8, 6, r=2)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 8)
    routes = torch.tensor([0, 1, -1, 1, 0])
    with torch.inference_mode():
        y_inf = layer(x, routes)
    assert reference._CONSTANTS and not any(t.is_inference() for t in reference._CONSTANTS.values())
    x.requires_grad_(True)
    y = layer(x, routes)
    y.sum().backward()
    assert torch.equal(y.detach(), y_inf)
    assert layer.lora_A.grad is not None and torch.isfinite(layer.lora_A.grad).all()


# --- isolation under non-finite values (issue 14 item 1) -------------------------------------------------------

ISOLATION = ["recheck", "sanitize"]  # "recheck" is what CPU tensors get, "sanitize" what CUDA tensors get


@pytest.fixture
def isolation_mode(request):
    from routed_lora import reference

    old = reference.set_isolation_mode(request.param)
    yield request.param
    reference.set_isolation_mode(old)


def _grads(layer, x, routes, g):
    layer.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    layer(x, routes).backward(g)
    return x.grad, layer.lora_A.grad.clone(), layer.lora_B.grad.clone()


@pytest.mark.parametrize("isolation_mode", ISOLATION, indirect=True)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("bad_route", [-1, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nonfinite_input_never_reaches_other_adapters(isolation_mode, bad, bad_route, dtype):
    """x non-finite at one token routed -1 or to adapter 1: adapter 0's and adapter 2's (no tokens) gradients
    are those of the same batch with that token's input replaced by zeros; adapter 2's are exact zeros."""
    layer = make_layer(12, 10, r=3, E=3, dtype=dtype)
    torch.manual_seed(1)
    M = 40
    x = torch.randn(M, 12, dtype=dtype)
    routes = torch.randint(0, 2, (M,))
    routes[7] = bad_route
    g = torch.randn(M, 10, dtype=dtype)
    clean = x.clone()
    clean[7] = 0
    _, dA_ref, dB_ref = _grads(layer, clean, routes, g)
    x[7, 3] = bad
    dx, dA, dB = _grads(layer, x, routes, g)
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-10)
    for name, got, want in (("dA[0]", dA[0], dA_ref[0]), ("dB[0]", dB[0], dB_ref[0])):
        assert torch.isfinite(got).all(), f"{name}: a non-finite value at a token it does not own leaked in"
        torch.testing.assert_close(got, want, **tol, msg=lambda m: f"{name}: {m}")
    assert torch.count_nonzero(dA[2]) == 0 and torch.count_nonzero(dB[2]) == 0, "adapter 2 owns no tokens"
    assert torch.isfinite(dx[torch.arange(M) != 7]).all(), "dx is per token: only token 7's row may be non-finite"
    if bad_route == 1:  # the owner sees its token's bad value (it is not hidden)
        assert not torch.isfinite(dA[1]).all()
    else:
        assert torch.isfinite(dA[1]).all() and torch.isfinite(dB[1]).all()


@pytest.mark.parametrize("isolation_mode", ISOLATION, indirect=True)
def test_nonfinite_upstream_grad_never_reaches_other_adapters(isolation_mode):
    """The same for the upstream gradient g (dB = s g^T h sums over tokens too)."""
    layer = make_layer(9, 11, r=2, E=3, dtype=torch.float64)
    torch.manual_seed(2)
    M = 30
    x = torch.randn(M, 9, dtype=torch.float64)
    routes = torch.randint(-1, 2, (M,))
    routes[4], routes[5] = -1, 1
    g = torch.randn(M, 11, dtype=torch.float64)
    clean = g.clone()
    clean[4] = 0
    clean[5] = 0
    _, dA_ref, dB_ref = _grads(layer, x, routes, clean)
    g[4, 2] = float("nan")
    g[5, 0] = float("inf")
    _, dA, dB = _grads(layer, x, routes, g)
    torch.testing.assert_close(dA[0], dA_ref[0], atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(dB[0], dB_ref[0], atol=1e-12, rtol=1e-10)
    assert torch.count_nonzero(dA[2]) == 0 and torch.count_nonzero(dB[2]) == 0
    assert not torch.isfinite(dB[1]).all()


@pytest.mark.parametrize("isolation_mode", ISOLATION, indirect=True)
def test_nan_everywhere_outside_an_adapter_gives_it_exact_zeros(isolation_mode):
    layer = make_layer(8, 6, r=2, E=2, dtype=torch.float32)
    x = torch.full((10, 8), float("nan"))
    routes = torch.full((10,), -1)
    routes[3] = 0
    x[3] = torch.randn(8)
    _, dA, dB = _grads(layer, x, routes, torch.randn(10, 6))
    assert torch.isfinite(dA[0]).all() and torch.isfinite(dB[0]).all()
    assert torch.count_nonzero(dA[1]) == 0 and torch.count_nonzero(dB[1]) == 0


def test_plain_product_leaks_which_is_what_isolation_fixes():
    """Mode "none" (the plain product, the bench's baseline) shows the leak the other modes close."""
    from routed_lora import reference

    old = reference.set_isolation_mode("none")
    try:
        layer = make_layer(8, 6, r=2, E=2, dtype=torch.float32)
        x = torch.randn(5, 8)
        x[1, 0] = float("nan")
        _, dA, _ = _grads(layer, x, torch.tensor([0, -1, 0, 0, 0]), torch.randn(5, 6))
        assert not torch.isfinite(dA[1]).all()
    finally:
        reference.set_isolation_mode(old)
    with pytest.raises(ValueError, match="mode: expected one of"):
        reference.set_isolation_mode("fast")


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), -float("inf"), True, 0, -1.0])
def test_non_finite_or_non_positive_lora_alpha_refused(alpha):
    with pytest.raises(ValueError, match="lora_alpha: expected a finite positive number"):
        rl.RoutedLoRALinear(8, 4, r=2, lora_alpha=alpha)
    with pytest.raises(ValueError, match="lora_alpha: expected a finite positive number"):
        rl.RoutedLoRALinear.from_linear(nn.Linear(8, 4), r=2, lora_alpha=alpha)


def test_non_finite_scaling_refused_by_the_functional_form():
    x, W = torch.randn(3, 4), torch.randn(5, 4)
    A, B = torch.randn(2, 2, 4), torch.randn(2, 5, 2)
    with pytest.raises(ValueError, match="scaling: expected a finite number"):
        rl.routed_lora_linear(x, W, None, A, B, torch.zeros(3, dtype=torch.long), float("nan"))
