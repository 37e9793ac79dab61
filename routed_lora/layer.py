"""``RoutedLoRALinear``: a frozen ``nn.Linear`` plus E LoRA adapters, one chosen per token.

    y_m = W x_m + b + s * B[rho_m] A[rho_m] x_m        (no LoRA term when rho_m = -1)

``s = lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` with rsLoRA). The adapter of each token comes from an
integer ``routes`` tensor of shape ``x.shape[:-1]``: -1 for the backbone only, else an adapter index. Each
adapter's gradient is written only from the tokens routed to it (see :mod:`routed_lora.reference`).
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
from torch import nn

from . import backend as _backend
from .ops import routed_lora_apply, routed_lora_infer
from .reference import decode_route_plan, inference_forward, lora_views

__all__ = ["RoutedLoRALinear", "routed_lora_linear", "set_routes", "clear_routes", "validate_routes"]

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _is_compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - very old torch
        return False


def _any_autocast() -> bool:
    """Whether autocast is on for any device type (the decode path leaves every such call to the general one)."""
    return _ANY_AUTOCAST() if _ANY_AUTOCAST is not None else any(
        torch.is_autocast_enabled(d) for d in ("cpu", "cuda"))


_ANY_AUTOCAST = getattr(torch._C, "_is_any_autocast_enabled", None)  # one call instead of a device query


# The routes tensor whose values the last default-checked call validated (or queued the device assert for):
# (tensor, version, E). A later call on the same tensor at the same version holds the same values, so its
# check would repeat work (on CUDA five kernel launches per layer). Never kept for inference tensors (no
# version counter) or inside a CUDA-graph capture (a replay must carry its own assert).
_LAST_CHECKED: list = [None]


def _routes_checked(routes, E: int) -> bool:
    last = _LAST_CHECKED[0]
    return (
        last is not None
        and last[0] is routes
        and last[2] == E
        and not routes.is_inference()
        and last[1] == routes._version
        and not (routes.is_cuda and torch.cuda.is_current_stream_capturing())
    )


def _remember_checked(routes, E: int) -> None:
    if routes.is_inference() or (routes.is_cuda and torch.cuda.is_current_stream_capturing()):
        _LAST_CHECKED[0] = None
    else:
        _LAST_CHECKED[0] = (routes, routes._version, E)


def validate_routes(routes: torch.Tensor, num_adapters: int, expected_shape=None, *, check_values=True) -> None:
    """Raise a clear error if ``routes`` is not an integer tensor of values in [-1, num_adapters).

    ``check_values`` reads the values, which on a GPU is a host synchronisation: callers do it once, when the
    routes are set, not in every layer call.
    """
    if not isinstance(routes, torch.Tensor):
        raise TypeError(f"routes: expected an integer torch.Tensor, got {type(routes).__name__}")
    if routes.dtype not in _INT_DTYPES:
        raise TypeError(f"routes: expected an integer dtype (int32 or int64), got {routes.dtype}")
    if expected_shape is not None and tuple(routes.shape) != tuple(expected_shape):
        raise ValueError(
            f"routes: expected shape {tuple(expected_shape)} (x.shape[:-1]), got {tuple(routes.shape)}"
        )
    if check_values and routes.numel() > 0:
        lo, hi = int(routes.min()), int(routes.max())
        if lo < -1 or hi >= num_adapters:
            bad = lo if lo < -1 else hi
            raise ValueError(
                f"routes: values must be -1 (backbone only) or an adapter index in [0, {num_adapters}), "
                f"found {bad}"
            )


def routed_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    routes: torch.Tensor,
    scaling: float,
    *,
    check_route_values: bool | None = None,
) -> torch.Tensor:
    """Functional routed LoRA linear: ``x`` (..., K), ``weight`` (N, K), ``lora_A`` (E, r, K), ``lora_B``
    (E, N, r), ``routes`` of shape ``x.shape[:-1]``. Returns (..., N).

    ``routes`` may also be a Python int, the route of every token.

    ``check_route_values``: None (default) checks route values on CPU tensors here and on CUDA tensors with an
    asynchronous device assert (no host synchronisation); True checks them here on any device (a host sync on a
    GPU); False skips the value check (the caller has done it, as :func:`set_routes` does once for all layers).
    """
    if x.dim() < 1:
        raise ValueError(f"x: expected at least 1 dimension (..., in_features), got a {x.dim()}-d tensor")
    N, K = weight.shape
    if x.shape[-1] != K:
        raise ValueError(f"x: expected last dimension in_features={K}, got shape {tuple(x.shape)}")
    if lora_A.dim() != 3 or lora_A.shape[2] != K:
        raise ValueError(f"lora_A: expected shape (E, r, {K}), got {tuple(lora_A.shape)}")
    E, r, _ = lora_A.shape
    if tuple(lora_B.shape) != (E, N, r):
        raise ValueError(f"lora_B: expected shape {(E, N, r)}, got {tuple(lora_B.shape)}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"bias: expected shape ({N},), got {tuple(bias.shape)}")

    scaling = float(scaling)
    if not math.isfinite(scaling):
        raise ValueError(f"scaling: expected a finite number (lora_alpha / r), got {scaling!r}")

    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    elif x.dtype != weight.dtype:
        raise TypeError(f"x: expected dtype {weight.dtype} (the weight's), got {x.dtype}")
    # Adapters may be kept in a wider dtype than the backbone (fp32 adapters on a bf16 model): the op runs in
    # the activation dtype and autograd casts the gradients back.
    if lora_A.dtype != x.dtype:
        lora_A, lora_B = lora_A.to(x.dtype), lora_B.to(x.dtype)
    elif lora_B.dtype != x.dtype:
        lora_B = lora_B.to(x.dtype)

    lead = x.shape[:-1]
    compiling = _is_compiling()
    if isinstance(routes, int) and not isinstance(routes, bool):  # one route for every token (set_routes(m, k))
        if not -1 <= routes < E:
            raise ValueError(
                f"routes: values must be -1 (backbone only) or an adapter index in [0, {E}), found {routes}"
            )
        if routes == -1:
            return nn.functional.linear(x, weight, bias)
        routes = torch.full(lead, routes, dtype=torch.int32, device=x.device)

    # None: CPU tensors are checked here (cheap), CUDA tensors by an asynchronous device assert (no host sync).
    # False: the caller checked them already (set_routes checks once for every layer), so nothing is launched.
    # None also skips the values of a routes tensor checked by the call before (same tensor, same version, same
    # E): the layers of one model call, and repeated calls on one routes tensor, check it once.
    check = (not x.is_cuda) if check_route_values is None else check_route_values
    seen = check_route_values is None and not compiling and _routes_checked(routes, E)
    validate_routes(routes, E, lead, check_values=check and not compiling and not seen)
    if check_route_values is None and x.is_cuda and not compiling and routes.numel() > 0 and not seen:
        torch._assert_async(((routes >= -1) & (routes < E)).all(), "routes: value outside [-1, E)")
    if check_route_values is None and not compiling and not seen:
        _remember_checked(routes, E)

    x2 = x.reshape(-1, K)
    routes1 = routes.reshape(-1)
    if not compiling and not _needs_autograd(x, lora_A, lora_B):
        # decoding (no_grad / inference_mode, or nothing requires a gradient): no autograd Function, no h kept
        return routed_lora_infer(x2, weight, bias, lora_A, lora_B, routes1, scaling).reshape(*lead, N)
    if routes1.dtype != torch.int32:
        routes1 = routes1.to(torch.int32)
    y, _ = routed_lora_apply(x2, weight, bias, lora_A, lora_B, routes1, scaling)
    return y.reshape(*lead, N)


def _needs_autograd(x, lora_A, lora_B) -> bool:
    """Whether the call must record a graph: grad mode on and some input requiring a gradient."""
    return torch.is_grad_enabled() and (x.requires_grad or lora_A.requires_grad or lora_B.requires_grad)


class RoutedLoRALinear(nn.Linear):
    """A frozen ``nn.Linear`` with one LoRA adapter per ability, selected per token.

    Parameters ``lora_A`` (E, r, in_features) and ``lora_B`` (E, out_features, r) are initialised as PEFT does
    (A kaiming-uniform with a = sqrt(5), B zero), so a fresh layer equals the frozen linear. ``weight`` and
    ``bias`` keep nn.Linear's state-dict keys and never receive gradients.

    Call as ``layer(x, routes)`` with integer ``routes`` of shape ``x.shape[:-1]`` (-1 = backbone only), or set
    them once with :func:`set_routes` and call ``layer(x)``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        r: int = 8,
        lora_alpha: float = 16,
        adapters: Sequence[str] = ("reasoning", "tool"),
        use_rslora: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        names = _check_config(r, lora_alpha, adapters)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_lora(names, r, lora_alpha, use_rslora)

    def _init_lora(self, names, r, lora_alpha, use_rslora):
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.r = int(r)
        self.lora_alpha = lora_alpha
        self.use_rslora = bool(use_rslora)
        self.adapter_names = tuple(names)
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        E = len(names)
        kw = dict(device=self.weight.device, dtype=self.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(E, self.r, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.empty(E, self.out_features, self.r, **kw))
        self._routes = None
        self._views = None  # adapter views for the decode path (see _decode)
        self.reset_lora_parameters()

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        r: int = 8,
        lora_alpha: float = 16,
        adapters: Sequence[str] = ("reasoning", "tool"),
        use_rslora: bool = False,
    ) -> "RoutedLoRALinear":
        """Wrap ``linear``: its weight and bias tensors are reused (no copy) and frozen; device and dtype kept."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        names = _check_config(r, lora_alpha, adapters)
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.register_parameter("bias", linear.bias)
        self._init_lora(names, r, lora_alpha, use_rslora)
        return self

    def _apply(self, fn, recurse=True):
        self._views = None  # .to() / .half() / .cuda() replace the parameters' storage
        return super()._apply(fn, recurse)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "lora_A"):
            self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """PEFT's initialisation: each A[e] kaiming-uniform (a = sqrt(5), fan_in = in_features), B zero."""
        for e in range(self.lora_A.shape[0]):
            nn.init.kaiming_uniform_(self.lora_A[e], a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    @property
    def num_adapters(self) -> int:
        return len(self.adapter_names)

    def adapter_index(self, adapter: int | str) -> int:
        """Index of ``adapter`` given by name or index."""
        if isinstance(adapter, str):
            if adapter not in self.adapter_names:
                raise KeyError(f"adapter: expected one of {self.adapter_names}, got {adapter!r}")
            return self.adapter_names.index(adapter)
        idx = int(adapter)
        if not 0 <= idx < self.num_adapters:
            raise IndexError(f"adapter: expected an index in [0, {self.num_adapters}), got {idx}")
        return idx

    def delta_weight(self, adapter: int | str) -> torch.Tensor:
        """s * B[e] A[e], the (out_features, in_features) change adapter ``adapter`` makes to the weight."""
        e = self.adapter_index(adapter)
        return self.scaling * (self.lora_B[e] @ self.lora_A[e])

    def forward(self, x: torch.Tensor, routes: torch.Tensor | None = None) -> torch.Tensor:
        check = None
        if routes is None:
            routes = self._routes
            if routes is None:
                raise RuntimeError(
                    "RoutedLoRALinear: no routes given and none set; pass routes=... or call "
                    "routed_lora.set_routes(module, routes) (use -1 for backbone-only tokens)"
                )
            check = False  # values were checked once by set_routes
            if isinstance(routes, int):  # one route for every token (set_routes(module, k))
                if routes == -1:
                    return nn.functional.linear(x, self.weight, self.bias)
            elif routes.device != x.device:
                routes = routes.to(x.device)
            elif not torch.is_grad_enabled():
                y = self._decode(x, routes)
                if y is not None:
                    return y
        return routed_lora_linear(
            x, self.weight, self.bias, self.lora_A, self.lora_B, routes, self.scaling, check_route_values=check
        )

    def _decode(self, x: torch.Tensor, routes: torch.Tensor) -> torch.Tensor | None:
        """The decode hot path (no grad, routes from set_routes, already checked there): the PyTorch path's
        inference forward with only the checks that guard its result (shapes; dtypes; no autocast; no
        compile; the torch backend). None when any does not hold: the caller takes the general path, which
        raises the usual errors or handles the case."""
        # Parameters read from the module's dict: ``self.weight`` goes through nn.Module.__getattr__, about
        # 1 us each, and at M = 1 every us of Python is ~0.5% of the call.
        params = self._parameters
        W, A, B = params["weight"], params["lora_A"], params["lora_B"]
        lead = x.shape[:-1]
        dtype = x.dtype
        backend = _backend.get_backend()
        if (
            x.shape[-1] != self.in_features
            or routes.shape != lead
            or not (dtype is W.dtype is A.dtype is B.dtype)
            or _any_autocast()
            or _is_compiling()
            # "auto" on CPU tensors is the PyTorch path without asking (each device query costs us here)
            or (backend != "torch" and (backend == "triton" or x.device.type != "cpu")
                and _backend.resolve(x.device) != "torch")
        ):
            return None
        views = self._views
        # Made once and reused while they alias the parameters: in-place updates (optimizer steps,
        # load_state_dict) show through them; a replaced storage (``.data = ...``, ``.to()``, a deepcopy) moves
        # the parameter's data_ptr away from the view's (which keeps its own storage alive), and a replaced
        # parameter is another object, so they are redone.
        if (
            views is None
            or views[2] is not A
            or views[3] is not B
            or views[0].data_ptr() != A.data_ptr()
            or views[1][0].data_ptr() != B.data_ptr()
            or views[4] != A.shape
            or views[5] != B.shape
        ):
            views = self._views = (*lora_views(A, B), A, B, A.shape, B.shape)
        two_d = x.dim() == 2
        x2 = x if two_d else x.reshape(-1, self.in_features)
        r1 = routes if routes.dim() == 1 else routes.reshape(-1)
        E = A.shape[0]
        plan = decode_route_plan(routes, r1, x2, E)  # keyed on the set_routes tensor: shared by all layers
        used = plan[0]
        if used is not None and len(used) == 1 and used[0] >= 0:
            # one adapter e owns every token (M = 1 decoding): inference_forward's three ops, inlined (at M = 1
            # each Python call is ~1% of the layer); the same ops on the same operands, so the same bits
            e, r = used[0], A.shape[1]
            y = nn.functional.linear(x2, W, params["bias"])
            h = x2 @ views[0]
            y.addmm_(h if E == 1 else h[:, e * r:(e + 1) * r], views[1][e], alpha=float(self.scaling))
        else:
            y = inference_forward(x2, W, params["bias"], A, B, r1, self.scaling, views=views[:2], plan=plan)
        return y if two_d else y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, "
            f"adapters={self.adapter_names}" + (", use_rslora=True" if self.use_rslora else "")
        )


def _check_config(r, lora_alpha, adapters) -> tuple[str, ...]:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r: expected an integer >= 1, got {r!r}")
    if (
        isinstance(lora_alpha, bool)
        or not isinstance(lora_alpha, (int, float))
        or not math.isfinite(lora_alpha)
        or lora_alpha <= 0
    ):
        # nan passes `<= 0` and inf gives an infinite scaling: either turns every output row into NaN
        raise ValueError(f"lora_alpha: expected a finite positive number, got {lora_alpha!r}")
    if isinstance(adapters, str):
        raise TypeError(f"adapters: expected a sequence of names, got the string {adapters!r}")
    names = tuple(adapters)
    if not names:
        raise ValueError("adapters: expected at least one adapter name, got none")
    for n in names:
        if not isinstance(n, str) or not n:
            raise ValueError(f"adapters: names must be non-empty strings, got {n!r}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"adapters: names must be unique, got duplicates {dup} in {names}")
    return names


def _routed_layers(module: nn.Module) -> Iterable[RoutedLoRALinear]:
    if isinstance(module, RoutedLoRALinear):
        return [module]
    return [m for m in module.modules() if isinstance(m, RoutedLoRALinear)]


def set_routes(module: nn.Module, routes: torch.Tensor | int) -> None:
    """Set the routes used by every :class:`RoutedLoRALinear` in ``module`` until replaced or cleared.

    ``routes``: integer tensor shaped like the inputs' leading dims ((batch, seq) for a model), or a Python int
    used for every token of every input (-1: backbone only, computed as a plain ``F.linear``). Values are
    checked here, once (a host synchronisation on a GPU), not in every layer call.
    """
    layers = _routed_layers(module)
    if not layers:
        raise ValueError(f"module: no RoutedLoRALinear found in {type(module).__name__}")
    if isinstance(routes, int) and not isinstance(routes, bool):
        E = min(layer.num_adapters for layer in layers)
        if not -1 <= routes < E:
            raise ValueError(
                f"routes: values must be -1 (backbone only) or an adapter index in [0, {E}), found {routes}"
            )
        for layer in layers:
            layer._routes = int(routes)
        return
    validate_routes(routes, min(layer.num_adapters for layer in layers))
    routes = routes.to(torch.int32)
    per_device = {}
    for layer in layers:
        dev = layer.weight.device
        if dev not in per_device:
            per_device[dev] = routes.to(dev)
        layer._routes = per_device[dev]


def clear_routes(module: nn.Module) -> None:
    """Forget the routes set with :func:`set_routes` for every RoutedLoRALinear in ``module``."""
    for layer in _routed_layers(module):
        layer._routes = None
