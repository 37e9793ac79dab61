"""The implementations the suite compares, built on the same frozen weights, adapters and routes.

A :class:`Problem` holds one layer-sized problem: a frozen ``nn.Linear`` (N, K), adapters A (E, r, K) and
B (E, N, r), a scaling and per-token routes (M,). Each provider turns it into a :class:`Built`: a function
``x -> y`` for 2-D ``x`` (M, K), and the parameters that receive gradients.

Providers (``PROVIDERS``):

- ``linear``: the frozen ``nn.Linear`` alone, the floor (its backward computes only the input gradient);
- ``routed_torch``: :class:`routed_lora.RoutedLoRALinear` on the PyTorch path (``set_backend("torch")``);
- ``routed_triton``: the same layer on the Triton kernels (CUDA tensors only);
- ``naive``: every adapter on every token (E full (M, N) deltas), then the owning adapter's delta is selected
  per token;
- ``peft``: real PEFT LoRA (``peft.tuners.lora.Linear``) holding two adapters, their outputs combined by a
  per-token 0/1 mask: ``base(x) + sum_e mask_e * lora_B_e(lora_A_e(x)) * scaling_e``, which is what people write
  today to route PEFT adapters per token.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn

import routed_lora as rl

__all__ = [
    "Case",
    "Problem",
    "Built",
    "PROVIDERS",
    "FLOOR",
    "make_problem",
    "make_routes",
    "provider_available",
    "build",
    "use_backend",
]

FLOOR = "linear"
PROVIDERS = ("linear", "routed_torch", "routed_triton", "naive", "peft")
ADAPTER_NAMES = ("reasoning", "tool")


@dataclass(frozen=True)
class Case:
    """One layer problem. ``tool_frac`` of the tokens go to adapter 1 (tool), ``backbone_frac`` to -1 (backbone
    only), the rest to adapter 0 (reasoning); positions are random. ``shape`` names where (K, N) comes from."""

    M: int
    K: int
    N: int
    r: int = 16
    E: int = 2
    tool_frac: float = 0.5
    backbone_frac: float = 0.0
    dtype: str = "float32"
    device: str = "cpu"
    bias: bool = True
    shape: str = ""
    seed: int = 0

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


@dataclass
class Problem:
    case: Case
    linear: nn.Linear  # frozen
    lora_A: torch.Tensor  # (E, r, K)
    lora_B: torch.Tensor  # (E, N, r)
    scaling: float
    routes: torch.Tensor  # (M,) int64

    @property
    def lora_alpha(self) -> float:
        return self.scaling * self.case.r


@dataclass
class Built:
    """``forward(x) -> y`` for x (M, K); ``params``: tensors receiving gradients (reset between repeats)."""

    forward: Callable[[torch.Tensor], torch.Tensor]
    params: list = field(default_factory=list)
    module: nn.Module | None = None


def make_routes(M: int, tool_frac: float, backbone_frac: float = 0.0, *, seed: int = 0, device="cpu"):
    """(M,) int64 routes: round(tool_frac*M) tokens on 1, round(backbone_frac*M) on -1, the rest on 0, at random
    positions (a fixed seed, so every provider sees the same routes)."""
    if not (0.0 <= tool_frac <= 1.0 and 0.0 <= backbone_frac <= 1.0 and tool_frac + backbone_frac <= 1.0 + 1e-9):
        raise ValueError(f"tool_frac, backbone_frac: expected fractions summing to <= 1, got {tool_frac}, {backbone_frac}")
    gen = torch.Generator().manual_seed(seed + 1)
    n_tool = int(round(tool_frac * M))
    n_bb = min(int(round(backbone_frac * M)), M - n_tool)
    routes = torch.zeros(M, dtype=torch.int64)
    perm = torch.randperm(M, generator=gen)
    routes[perm[:n_tool]] = 1
    routes[perm[n_tool : n_tool + n_bb]] = -1
    return routes.to(device)


def make_problem(case: Case) -> Problem:
    """Random frozen weights (nn.Linear's init), A kaiming-uniform as PEFT, B random (non-zero, so the LoRA work
    is real), scaling = 2 (lora_alpha = 2 r), routes from :func:`make_routes`."""
    dtype, device = case.torch_dtype, torch.device(case.device)
    gen = torch.Generator().manual_seed(case.seed)
    linear = nn.Linear(case.K, case.N, bias=case.bias)
    with torch.no_grad():
        bound = 1.0 / math.sqrt(case.K)
        linear.weight.copy_(torch.empty(case.N, case.K).uniform_(-bound, bound, generator=gen))
        if case.bias:
            linear.bias.copy_(torch.empty(case.N).uniform_(-bound, bound, generator=gen))
    linear = linear.to(device=device, dtype=dtype).requires_grad_(False)
    A = torch.empty(case.E, case.r, case.K).uniform_(-bound, bound, generator=gen)
    B = torch.randn(case.E, case.N, case.r, generator=gen) / math.sqrt(case.r)
    routes = make_routes(case.M, case.tool_frac, case.backbone_frac, seed=case.seed, device=device)
    return Problem(case, linear, A.to(device, dtype), B.to(device, dtype), 2.0, routes)


@contextlib.contextmanager
def use_backend(name: str):
    """Select a routed-lora backend for the duration of a block, then restore the previous one."""
    old = rl.get_backend()
    rl.set_backend(name)
    try:
        yield
    finally:
        rl.set_backend(old)


def _peft_available() -> str | None:
    try:
        import peft  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the environment
        return f"peft not importable ({type(exc).__name__}: {exc})"
    return None


def provider_available(name: str, device: str) -> tuple[bool, str]:
    """(available, reason): whether ``name`` can run on ``device`` here."""
    if name not in PROVIDERS:
        raise ValueError(f"provider: expected one of {PROVIDERS}, got {name!r}")
    if name == "routed_triton":
        if torch.device(device).type != "cuda":
            return False, "routed_triton needs CUDA tensors"
        from routed_lora import backend

        if not backend.triton_available():
            return False, f"Triton kernels not importable: {backend._triton_import_error()}"
    if name == "peft":
        err = _peft_available()
        if err:
            return False, err
    return True, ""


def build(name: str, problem: Problem) -> Built:
    """Build provider ``name`` on ``problem`` (fresh adapter parameters holding the problem's A and B)."""
    ok, why = provider_available(name, problem.case.device)
    if not ok:
        raise RuntimeError(f"provider {name!r} is not available: {why}")
    return _BUILDERS[name](problem)


def _build_linear(p: Problem) -> Built:
    return Built(p.linear, [], p.linear)


def _routed_layer(p: Problem) -> rl.RoutedLoRALinear:
    c = p.case
    names = ADAPTER_NAMES if c.E == 2 else tuple(f"adapter{e}" for e in range(c.E))
    layer = rl.RoutedLoRALinear.from_linear(p.linear, r=c.r, lora_alpha=p.lora_alpha, adapters=names)
    with torch.no_grad():
        layer.lora_A.copy_(p.lora_A)
        layer.lora_B.copy_(p.lora_B)
    return layer


def _build_routed(backend_name: str):
    def builder(p: Problem) -> Built:
        layer = _routed_layer(p)
        routes = p.routes

        def forward(x):
            with use_backend(backend_name):
                return layer(x, routes)

        return Built(forward, [layer.lora_A, layer.lora_B], layer)

    return builder


class NaiveTwoAdapter(nn.Module):
    """Every adapter on every token, then select: for each adapter e the full delta s * (x A_e^T) B_e^T (M, N) is
    computed for all tokens, and each token keeps the delta of its own adapter (none for route -1)."""

    def __init__(self, linear: nn.Linear, lora_A, lora_B, scaling: float):
        super().__init__()
        self.linear = linear
        self.lora_A = nn.Parameter(lora_A.detach().clone())
        self.lora_B = nn.Parameter(lora_B.detach().clone())
        self.scaling = scaling

    def forward(self, x, routes):
        F = nn.functional
        y = self.linear(x)
        sel = None
        for e in range(self.lora_A.shape[0]):
            delta = F.linear(F.linear(x, self.lora_A[e]), self.lora_B[e]) * self.scaling
            keep = (routes == e).unsqueeze(-1)
            sel = torch.where(keep, delta, 0.0) if sel is None else torch.where(keep, delta, sel)
        return y + sel


def _build_naive(p: Problem) -> Built:
    mod = NaiveTwoAdapter(p.linear, p.lora_A, p.lora_B, p.scaling)
    routes = p.routes
    return Built(lambda x: mod(x, routes), [mod.lora_A, mod.lora_B], mod)


def peft_lora_linear(linear: nn.Linear, r: int, lora_alpha: float, adapters=ADAPTER_NAMES):
    """A ``peft.tuners.lora.Linear`` wrapping ``linear`` with one LoRA adapter per name, all trainable."""
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLinear

    cfg = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=0.0, target_modules=["x"])
    layer = PeftLinear(linear, adapters[0], config=cfg, r=r, lora_alpha=lora_alpha)
    for name in adapters[1:]:
        layer.update_layer(name, r=r, lora_alpha=lora_alpha, config=cfg)
    layer.set_adapter(list(adapters))  # all active and trainable
    linear.requires_grad_(False)
    return layer


def peft_masked_forward(layer, x: torch.Tensor, masks: dict) -> torch.Tensor:
    """``base(x) + sum_e masks[e] * lora_B_e(lora_A_e(dropout_e(x))) * scaling_e`` for a PEFT LoRA Linear;
    ``masks[name]`` broadcasts against the output ((..., 1) 0/1 in the activation dtype)."""
    result = layer.base_layer(x)
    for name, mask in masks.items():
        lora_A, lora_B = layer.lora_A[name], layer.lora_B[name]
        delta = lora_B(lora_A(layer.lora_dropout[name](x))) * layer.scaling[name]
        result = result + mask * delta
    return result


def _build_peft(p: Problem) -> Built:
    c = p.case
    names = ADAPTER_NAMES if c.E == 2 else tuple(f"adapter{e}" for e in range(c.E))
    layer = peft_lora_linear(p.linear, c.r, p.lora_alpha, names)
    layer.to(device=p.linear.weight.device, dtype=p.linear.weight.dtype)
    with torch.no_grad():
        for e, name in enumerate(names):
            layer.lora_A[name].weight.copy_(p.lora_A[e])
            layer.lora_B[name].weight.copy_(p.lora_B[e])
    dtype = p.linear.weight.dtype
    masks = {name: (p.routes == e).to(dtype).unsqueeze(-1) for e, name in enumerate(names)}
    params = [t for n, t in layer.named_parameters() if "lora_" in n]
    return Built(lambda x: peft_masked_forward(layer, x, masks), params, layer)


_BUILDERS = {
    "linear": _build_linear,
    "routed_torch": _build_routed("torch"),
    "routed_triton": _build_routed("triton"),
    "naive": _build_naive,
    "peft": _build_peft,
}
