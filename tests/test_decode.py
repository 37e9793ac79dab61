"""The no-grad (decoding) path of RoutedLoRALinear: no autograd machinery, the fewest ops, and outputs
bit-identical to the training path (so GRPO's old and new log-probs agree exactly)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import routed_lora as rl
from routed_lora import ops


def make_layer(K=40, N=24, r=4, E=2, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    layer = rl.RoutedLoRALinear(K, N, r=r, adapters=tuple(f"a{e}" for e in range(E)), dtype=dtype)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.5)
    return layer


ROUTE_MIXES = ["all_minus1", "all_0", "all_last", "mixed", "mixed_no_minus1"]


def make_routes(kind, M, E, gen):
    if kind == "all_minus1":
        return torch.full((M,), -1)
    if kind == "all_0":
        return torch.zeros(M, dtype=torch.long)
    if kind == "all_last":
        return torch.full((M,), E - 1)
    lo = -1 if kind == "mixed" else 0
    return torch.randint(lo, E, (M,), generator=gen)


class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("M", [1, 2, 7, 64, 65, 300])
@pytest.mark.parametrize("kind", ROUTE_MIXES)
@pytest.mark.parametrize("E", [1, 3])
def test_no_grad_output_bit_identical_to_training_output(dtype, M, kind, E):
    layer = make_layer(E=E, dtype=dtype)
    gen = torch.Generator().manual_seed(M)
    x = torch.randn(M, 40, generator=gen).to(dtype)
    routes = make_routes(kind, M, E, gen)
    y_train = layer(x, routes)
    assert y_train.grad_fn is not None  # the training path ran
    with torch.no_grad():
        y_nograd = layer(x, routes)
    with torch.inference_mode():
        y_inf = layer(x, routes)
    assert y_nograd.grad_fn is None
    assert torch.equal(y_nograd, y_train.detach()), f"max diff {(y_nograd - y_train).abs().max():.3g}"
    assert torch.equal(y_inf, y_train.detach())
    rl.set_routes(layer, routes)  # the decode hot path (RoutedLoRALinear._decode): routes set once, as in generate
    with torch.no_grad():
        y_set = layer(x)
    assert torch.equal(y_set, y_train.detach()), f"set_routes: max diff {(y_set - y_train).abs().max():.3g}"
    if kind == "all_minus1":
        assert torch.equal(y_nograd, nn.functional.linear(x, layer.weight, layer.bias))


def test_no_grad_matches_float64_oracle():
    """Not only self-consistent: the decode output is the layer's maths (float64 per-token check)."""
    layer = make_layer(E=3)
    x = torch.randn(9, 40)
    routes = torch.tensor([0, 1, 2, -1, 0, 0, 2, -1, 1])
    with torch.no_grad():
        y = layer(x, routes).double()
    W, b, A, B = (t.detach().double() for t in (layer.weight, layer.bias, layer.lora_A, layer.lora_B))
    for m, e in enumerate(routes.tolist()):
        want = W @ x[m].double() + b
        if e >= 0:
            want = want + layer.scaling * (B[e] @ (A[e] @ x[m].double()))
        torch.testing.assert_close(y[m], want, atol=1e-5, rtol=1e-5)


def test_no_grad_skips_the_autograd_function(monkeypatch):
    layer = make_layer()
    x = torch.randn(3, 40)
    routes = torch.tensor([0, 1, -1])

    def boom(*a, **k):
        raise AssertionError("the autograd Function ran under no_grad")

    monkeypatch.setattr(ops._RoutedLoRAFunction, "apply", boom)
    with torch.no_grad():
        layer(x, routes)
    with torch.inference_mode():
        layer(x, routes)
    frozen = make_layer().requires_grad_(False)  # grad mode on, nothing requires a gradient: no graph either
    frozen(x, routes)
    with pytest.raises(AssertionError, match="autograd Function ran"):
        layer(x, routes)  # grad mode and trainable adapters: the training path


def test_set_routes_int_under_no_grad():
    layer = make_layer(E=2)
    x = torch.randn(2, 5, 40)
    for k in (-1, 0, 1):
        rl.set_routes(layer, k)
        with torch.no_grad():
            y = layer(x)
        want = layer(x, torch.full((2, 5), k))
        assert torch.equal(y, want.detach())


VIEWS = {"view", "t", "slice", "select", "unsqueeze", "_unsafe_view", "reshape", "expand", "alias"}


@pytest.mark.parametrize("routes,want", [
    ([0], ["addmm", "mm", "addmm_"]),  # F.linear, the shrink, one expand: no mask, no copy
    ([-1], ["addmm"]),  # F.linear alone
    ([1, 1, 1, 1], ["addmm", "mm", "addmm_"]),
    ([0, 1, -1, 0], ["ne", "addmm", "mm", "masked_fill_", "addmm_", "addmm_"]),  # + the mask, an expand each
])
def test_decode_op_count(routes, want):
    """The fewest ops at decode sizes, counted: every aten op that is not a view."""
    layer = make_layer(E=2)
    x = torch.randn(len(routes), 40)
    rl.set_routes(layer, torch.tensor(routes))
    layer(x)  # the cached route-mask constants are made on a first call
    with torch.no_grad(), OpLog() as log:
        layer(x)
    compute = [o.split(".")[0] for o in log.ops if o.split(".")[0] not in VIEWS]
    assert compute == want, log.ops


def test_decode_views_follow_updates_and_replaced_storage():
    """The decode path reuses adapter views between calls: an optimizer step (in place), a replaced storage, a
    dtype change and a deepcopy must all be seen."""
    import copy

    layer = make_layer(E=2)
    x = torch.randn(3, 40)
    rl.set_routes(layer, torch.tensor([0, 1, 1]))

    def check():
        with torch.no_grad():
            got = layer(x)
        want = layer(x.to(layer.weight.dtype), torch.tensor([0, 1, 1]))
        assert torch.equal(got, want.detach())

    check()
    opt = torch.optim.SGD([layer.lora_A, layer.lora_B], lr=0.5)
    layer(x, torch.tensor([0, 1, 1])).sum().backward()
    opt.step()
    check()
    layer.lora_B.data = torch.randn_like(layer.lora_B)
    check()
    layer.lora_A = nn.Parameter(torch.randn_like(layer.lora_A))  # a new parameter object: new views
    check()
    with torch.no_grad():  # a resized storage at the same address: the shapes are part of the key
        layer.lora_A.data = layer.lora_A.data[:, :-1]  # r - 1 rows
        layer.lora_B.data = layer.lora_B.data[:, :, :-1].contiguous()
    check()
    layer.double()
    x = x.double()
    check()
    twin = copy.deepcopy(layer)
    with torch.no_grad():
        twin.lora_B.mul_(3)
        y_twin = twin(x)
    assert not torch.equal(y_twin, layer(x).detach())
    assert torch.equal(y_twin, twin(x, torch.tensor([0, 1, 1])).detach())


def test_layers_sharing_routes_share_the_route_plan():
    """set_routes gives every layer the same routes tensor: the first decode layer makes the route mask, the
    others reuse it; new routes (or the same tensor changed in place) make a new one."""
    a, b = make_layer(E=2, seed=1), make_layer(E=2, seed=2)
    model = nn.Sequential(a, nn.Linear(24, 40), b)
    routes = torch.tensor([[0, 1, -1, 1]])
    rl.set_routes(model, routes)
    x = torch.randn(1, 4, 40)
    with torch.no_grad():
        model(x)  # the plan of these routes is made
        with OpLog() as log:
            model(x)
        assert "ne" not in [o.split(".")[0] for o in log.ops]
        y = model(x)
        a._routes[0, 0] = 1  # in place: the version counter moves, the plan is redone
        with OpLog() as log:
            y2 = model(x)
        assert [o.split(".")[0] for o in log.ops].count("ne") == 1
    want = b(nn.functional.linear(a(x, a._routes), model[1].weight, model[1].bias), a._routes)
    assert torch.equal(y2, want.detach()) and not torch.equal(y, y2)
