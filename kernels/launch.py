"""Plain launchers of the routed-LoRA kernels: ``forward`` and ``backward`` (no autograd here).

The contract with :mod:`routed_lora.ops` (same semantics as :mod:`routed_lora.reference`):

    forward(x, weight, bias, lora_A, lora_B, routes, scaling) -> (y, h_masked)
    backward(grad_y, x, weight, lora_A, lora_B, routes, h_masked, scaling, compute_dx) -> (dx | None, dA, dB)

``h_masked`` (M, E*r) in x.dtype has exactly the reference's format, so a backward on one backend accepts the
h of the other.

Variants (``set_variant``):
  * ``"fused"``: the backbone GEMM runs in Triton with the LoRA expand as its epilogue: y (and dx) written once.
  * ``"cublas"``: the backbone GEMM stays in cuBLAS: one Triton kernel writes b + s * h_masked B_cat^T (resp.
    s * G A_cat) and ``out.addmm_(x, W^T)`` (resp. ``dx.addmm_(g, W)``) accumulates the GEMM into it with
    beta = 1, so the LoRA term is read in cuBLAS's epilogue instead of a separate read-modify-write pass.
  * ``"auto"`` (default): on CUDA, the first call of each shape times ``fused``, ``cublas`` and the PyTorch path
    and caches the fastest per (device, dtype, bucketed M, K, N, r, E, bias, dx) -- so ``auto`` is never slower
    than the PyTorch path by more than the timing noise. A variant that raises while being measured is ruled out
    for that shape (``VARIANT_ERRORS``); the PyTorch path is always a candidate. Under the Triton interpreter (CPU
    tensors, ``TRITON_INTERPRET=1``) ``auto`` means ``fused``. Inside CUDA-graph capture an unmeasured shape uses
    ``cublas``. The shrink, G/dB and dA kernels are Triton in both Triton variants.

Determinism (``set_deterministic``, env ``ROUTED_LORA_DETERMINISTIC``): **on by default**. The dB and dA
reductions over tokens are written as fp32 partials per block of tokens and summed by ``torch.sum`` in a
fixed order, so two identical backward calls give bit-identical gradients (needed for reproducible RL runs
and for the "adapter 0's gradient is bit-for-bit unchanged when adapter 1's tokens change" property). The cost
is one extra memory pass over a (blocks, E, N, r) / (splits, E, r, K) fp32 workspace, a few percent of the
backward at most. ``set_deterministic(False)`` uses ``tl.atomic_add`` into an fp32 buffer instead.

fp32 inputs: ``tl.dot`` runs as tf32 when ``torch.backends.cuda.matmul.allow_tf32`` is True (PyTorch's own
switch for its fp32 matmuls) and as exact ``ieee`` fp32 otherwise (PyTorch's default). fp16 / bf16 always
accumulate in fp32.

Autotuning: each kernel is autotuned on its sizes (K, N, r, E) and the token count bucketed to a power of
two (``M_BUCKET``). ``pin_configs(True)`` (env ``ROUTED_LORA_PIN_CONFIGS=1``) turns autotuning off and uses
one fixed config per kernel (small 16-wide tiles under the interpreter, the first shipped config on a GPU);
``pin_configs({"linear": {...}})`` pins given ones. ``CALLS`` counts every launcher and kernel launch, so
tests can prove the kernels ran.
"""

from __future__ import annotations

import collections
import functools
import os
import statistics

import torch
import triton
from triton.runtime.errors import OutOfResources

from . import fused_lora

__all__ = [
    "CALLS",
    "forward",
    "backward",
    "set_variant",
    "get_variant",
    "set_deterministic",
    "get_deterministic",
    "pin_configs",
    "shipped_configs",
    "VARIANT_CACHE",
    "VARIANT_ERRORS",
]

CALLS: collections.Counter = collections.Counter()

_VARIANTS = ("auto", "fused", "cublas", "torch")
_state = {
    "variant": os.environ.get("ROUTED_LORA_VARIANT", "auto"),
    "deterministic": os.environ.get("ROUTED_LORA_DETERMINISTIC", "1") not in ("0", "", "false", "False"),
    "pinned": None,
    "interpreter_autotune": False,
}

# --------------------------------------------------------------------------------------------------------------
# Shipped configurations (every one is compiled for sm_80 and sm_90 by the compile test: no spills, tensor cores).

LINEAR_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
]
# The cuBLAS variant's LoRA term b + s L U (BACKBONE=False): no K loop, so fewer configs.
LINEAR_LORA_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=2),
]
SHRINK_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    # (8 warps here make ptxas use an 8-byte stack frame on sm_80; 4 warps do not)
    triton.Config({"BLOCK_M": 128, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_K": 128}, num_warps=4, num_stages=3),
]
# G + dB: BLOCK_M sets the number of dB partials (the workspace), so it is the same in every config.
SHRINK_DB_BLOCK_M = 128
SHRINK_DB_CONFIGS = [
    triton.Config({"BLOCK_M": SHRINK_DB_BLOCK_M, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": SHRINK_DB_BLOCK_M, "BLOCK_K": 128}, num_warps=8, num_stages=3),
]
GRAD_A_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_K": 128}, num_warps=8, num_stages=3),
]
# Largest adapter-column tile: E*r above it is looped (linear) or split over the grid (shrink, dA).
MAX_BLOCK_R = 128
# The shrink kernels split their reduction (K, or N for G) in chunks of a multiple of this many columns when
# the row blocks alone would leave SMs idle; under the interpreter in chunks of SHRINK_SPLIT_INTERPRETER.
SHRINK_SPLIT_MULTIPLE = 256
SHRINK_SPLIT_INTERPRETER = 32
# dA splits the token reduction in chunks of a multiple of this many rows.
GRAD_A_SPLIT_ROWS = 256

# Pinned configs under the interpreter: 16-wide tiles, so tiny test shapes cover several tiles and tails.
INTERPRETER_CONFIGS = {
    "linear": {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2, "num_warps": 4, "num_stages": 1},
    "linear_lora": {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2, "num_warps": 4, "num_stages": 1},
    "shrink": {"BLOCK_M": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 1},
    "shrink_db": {"BLOCK_M": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 1},
    "grad_a": {"BLOCK_M": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 1},
}

# Tests only (``autotune_in_interpreter(True)``): autotuning among these under the interpreter, timed by the
# wall clock, exercises the autotuning path (keys, pruning, reset / restore hooks) without a GPU.
INTERPRETER_AUTOTUNE_CONFIGS = {
    "linear": [
        triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}, num_warps=4, num_stages=1),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 1}, num_warps=4, num_stages=1),
    ],
    "linear_lora": [
        triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}, num_warps=4, num_stages=1),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 1}, num_warps=4, num_stages=1),
    ],
    "shrink": [
        triton.Config({"BLOCK_M": 16, "BLOCK_K": 16}, num_warps=4, num_stages=1),
        triton.Config({"BLOCK_M": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1),
    ],
    "shrink_db": [
        triton.Config({"BLOCK_M": SHRINK_DB_BLOCK_M, "BLOCK_K": 16}, num_warps=4, num_stages=1),
        triton.Config({"BLOCK_M": SHRINK_DB_BLOCK_M, "BLOCK_K": 32}, num_warps=4, num_stages=1),
    ],
    "grad_a": [
        triton.Config({"BLOCK_M": 16, "BLOCK_K": 16}, num_warps=4, num_stages=1),
        triton.Config({"BLOCK_M": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1),
    ],
}

_CONFIG_LISTS = {
    "linear": LINEAR_CONFIGS,
    "linear_lora": LINEAR_LORA_CONFIGS,
    "shrink": SHRINK_CONFIGS,
    "shrink_db": SHRINK_DB_CONFIGS,
    "grad_a": GRAD_A_CONFIGS,
}
_KERNELS = {
    "linear": fused_lora.routed_linear_kernel,
    "linear_lora": fused_lora.routed_linear_kernel,
    "shrink": fused_lora.routed_shrink_kernel,
    "shrink_db": fused_lora.routed_shrink_kernel,
    "grad_a": fused_lora.routed_grad_a_kernel,
}
_KEYS = {
    "linear": ["M_BUCKET", "N", "K", "R", "E"],
    "linear_lora": ["M_BUCKET", "N", "K", "R", "E"],
    "shrink": ["M_BUCKET", "K", "R", "E"],
    "shrink_db": ["M_BUCKET", "K", "R", "E"],
    "grad_a": ["M_BUCKET", "K", "R", "E"],
}


def shipped_configs() -> dict[str, list]:
    """Every shipped autotuning config per kernel name (what the compile test and report cover)."""
    return {name: list(cfgs) for name, cfgs in _CONFIG_LISTS.items()}


# --------------------------------------------------------------------------------------------------------------
# Switches.


def set_variant(name: str) -> None:
    """``"auto"`` (default), ``"fused"``, ``"cublas"`` or ``"torch"`` (the PyTorch path, for comparisons)."""
    if name not in _VARIANTS:
        raise ValueError(f"set_variant: expected one of {_VARIANTS}, got {name!r}")
    _state["variant"] = name


def get_variant() -> str:
    return _state["variant"]


def set_deterministic(flag: bool) -> None:
    """True (default): fixed-order fp32 reductions for dA / dB. False: ``tl.atomic_add``."""
    _state["deterministic"] = bool(flag)


def get_deterministic() -> bool:
    return _state["deterministic"]


def pin_configs(pinned=True) -> None:
    """Turn autotuning off. ``True``: one default config per kernel; a dict ``{kernel: {meta...}}`` pins those
    (kernels: linear, linear_lora, shrink, shrink_db, grad_a; keys as in the configs plus num_warps / num_stages);
    ``False`` / ``None``: autotune again."""
    if pinned is True:
        _state["pinned"] = {}
    elif not pinned:
        _state["pinned"] = None
    else:
        unknown = set(pinned) - set(_KERNELS)
        if unknown:
            raise ValueError(f"pin_configs: unknown kernels {sorted(unknown)}; expected some of {sorted(_KERNELS)}")
        _state["pinned"] = dict(pinned)


def autotune_in_interpreter(flag: bool) -> None:
    """Tests only: under the interpreter, autotune among ``INTERPRETER_AUTOTUNE_CONFIGS`` (wall-clock timer)
    instead of the fixed 16-wide tiles, unless configs are pinned."""
    _state["interpreter_autotune"] = bool(flag)


if os.environ.get("ROUTED_LORA_PIN_CONFIGS", "0") not in ("0", ""):
    pin_configs(True)


def _interpreting(t: torch.Tensor) -> bool:
    if t.device.type == "cuda":
        return False
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise RuntimeError(
            f"routed_lora.kernels: {t.device.type} tensors need the Triton interpreter (TRITON_INTERPRET=1) or CUDA"
        )
    return True


# --------------------------------------------------------------------------------------------------------------
# Kernel runners: interpreter, pinned config, or autotuned.

_RUNNERS: dict = {}


def _config_dict(cfg: "triton.Config") -> dict:
    return {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def _pinned_meta(name: str, interpret: bool) -> dict | None:
    if interpret and _state["pinned"] is None and _state["interpreter_autotune"]:
        return None
    if interpret:
        base = dict(INTERPRETER_CONFIGS[name])
        pinned = _state["pinned"] or {}
        base.update(pinned.get(name, {}))
        return base
    if _state["pinned"] is None:
        return None
    return {**_config_dict(_CONFIG_LISTS[name][0]), **_state["pinned"].get(name, {})}


def _prune_linear(configs, named_args, **kwargs):
    # The launchers pass every argument by keyword, so M_BUCKET arrives in kwargs (named_args holds positionals).
    m = named_args.get("M_BUCKET", kwargs.get("M_BUCKET", 1 << 16))
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(64, m)]
    return kept or configs[-1:]


def _wall_clock_bench(kernel_call, quantiles=(0.5, 0.2, 0.8)):
    """Autotuner timer for the interpreter (no GPU): the wall-clock time of one call, as three quantiles."""
    import time

    t0 = time.perf_counter()
    kernel_call()
    ms = (time.perf_counter() - t0) * 1e3
    return [ms for _ in quantiles]


def _runner(name: str, interpret: bool, autotune: bool, restore=(), reset=()):
    key = (name, interpret, autotune, tuple(restore), tuple(reset))
    if key not in _RUNNERS:
        fn = _KERNELS[name]
        if interpret:
            from triton.runtime.interpreter import InterpretedFunction

            fn = InterpretedFunction(getattr(fn, "fn", fn))
        if not autotune:
            _RUNNERS[key] = fn
        else:
            extra = {"do_bench": _wall_clock_bench} if interpret else {}
            _RUNNERS[key] = triton.autotune(
                configs=INTERPRETER_AUTOTUNE_CONFIGS[name] if interpret else _CONFIG_LISTS[name],
                key=_KEYS[name],
                restore_value=list(restore),
                reset_to_zero=list(reset),
                prune_configs_by={"early_config_prune": _prune_linear} if name.startswith("linear") else None,
                **extra,
            )(fn)
    return _RUNNERS[key]


# (kernel, dtype, BLOCK_R) -> the config used because the chosen / autotuned ones need more shared memory than
# the GPU has (fp32 operands with a 128-wide adapter tile): found once, then reused.
_FALLBACK_META: dict = {}


def _fallback_metas(name: str, first: dict | None) -> list[dict]:
    """Configs to try in order when ``first`` does not fit: the shipped ones, each with fewer pipeline stages.

    Shared memory grows with num_stages (the K loop's staged tiles) and halves with 16-bit operands, so fp32 at
    BLOCK_R = 128 needs fewer stages than the bf16 configs were tuned with. Fewer stages change neither the tile
    shapes nor the register budget the compile test checks."""
    out = []
    for cfg in ([first] if first else []) + [_config_dict(c) for c in _CONFIG_LISTS[name]]:
        for stages in range(cfg["num_stages"], 0, -1):
            meta = {**cfg, "num_stages": stages}
            if meta not in out:
                out.append(meta)
    return out


def _launch(name: str, device_tensor: torch.Tensor, grid, args: dict, restore=(), reset=()) -> None:
    """Run kernel ``name`` with keyword ``args``; ``grid(meta)`` gives the launch grid.

    A launch that the GPU refuses for lack of shared memory (raised before the kernel runs, so nothing has been
    written) is retried with the configs of :func:`_fallback_metas`; the first that fits is cached."""
    interpret = _interpreting(device_tensor)
    meta = _pinned_meta(name, interpret)
    CALLS[name] += 1
    fkey = (name, device_tensor.dtype, args.get("BLOCK_R"))
    if not interpret and fkey in _FALLBACK_META:
        meta = _FALLBACK_META[fkey]
    try:
        if meta is None:
            _runner(name, interpret, True, restore, reset)[grid](**args)
        else:
            _runner(name, interpret, False)[grid(meta)](**args, **meta)
        return
    except OutOfResources as exc:
        error = exc
    for alt in _fallback_metas(name, meta):
        try:
            _runner(name, interpret, False)[grid(alt)](**args, **alt)
        except OutOfResources:
            continue
        _FALLBACK_META[fkey] = alt
        CALLS["shared_memory_fallback"] += 1
        return
    raise error


@functools.lru_cache(maxsize=None)
def _sm_count(index) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _device_name(index) -> str:
    return torch.cuda.get_device_name(index)


def _m_bucket(M: int) -> int:
    return min(max(16, triton.next_power_of_2(max(M, 1))), 1 << 16)


def _block_r(ER: int) -> int:
    return min(max(16, triton.next_power_of_2(ER)), MAX_BLOCK_R)


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


# --------------------------------------------------------------------------------------------------------------
# One launcher per kernel.


def _reduction_splits(t: torch.Tensor, M: int, K: int, block_m: int, r_blocks: int) -> tuple[int, int]:
    """(K_PER_SPLIT, splits) for the shrink kernels: split the reduction when the row blocks alone leave SMs idle.

    Under the interpreter the split is small (32) so that tiny test shapes exercise the fp32 partial sums."""
    if t.device.type != "cuda":
        per = SHRINK_SPLIT_INTERPRETER
    else:
        programs = triton.cdiv(M, block_m) * r_blocks
        want = max(1, min(triton.cdiv(2 * _sm_count(t.device.index), programs), triton.cdiv(K, 1024)))
        per = triton.cdiv(triton.cdiv(K, want), SHRINK_SPLIT_MULTIPLE) * SHRINK_SPLIT_MULTIPLE
    per = max(per, 1)
    return per, max(1, triton.cdiv(K, per))


def _shrink_out(M: int, ER: int, splits: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, int]:
    """The shrink kernel's output: the result itself (one split) or fp32 partials (splits, M, E*r)."""
    if splits == 1:
        return torch.empty((M, ER), device=device, dtype=dtype), 0
    buf = torch.empty((splits, M, ER), device=device, dtype=torch.float32)
    return buf, buf.stride(0)


def shrink(x: torch.Tensor, lora_A: torch.Tensor, routes: torch.Tensor) -> torch.Tensor:
    """h_masked = (x A_cat^T) * mask, (M, E*r) in x.dtype."""
    M, K = x.shape
    E, R, _ = lora_A.shape
    BLOCK_R = _block_r(E * R)
    r_blocks = triton.cdiv(E * R, BLOCK_R)
    per, splits = _reduction_splits(x, M, K, 64, r_blocks)
    out, stride_os = _shrink_out(M, E * R, splits, x.dtype, x.device)
    args = dict(
        x_ptr=x, l_ptr=lora_A, routes_ptr=routes, out_ptr=out, h_ptr=out, db_ptr=out,
        M=M, K=K, R=R, E=E, K_PER_SPLIT=per, M_BUCKET=_m_bucket(M),
        stride_xm=x.stride(0), stride_xk=x.stride(1),
        stride_le=lora_A.stride(0), stride_lr=lora_A.stride(1), stride_lk=lora_A.stride(2),
        stride_os=stride_os, stride_om=out.stride(-2), stride_oc=out.stride(-1),
        stride_hm=0, stride_hc=0, stride_dbp=0, stride_dbe=0, stride_dbk=0, stride_dbr=0,
        scaling=1.0, BLOCK_R=BLOCK_R, FUSE_DB=False, DETERMINISTIC=True, DOT_PRECISION=_dot_precision(x.dtype),
    )  # fmt: skip
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), r_blocks, splits)  # noqa: E731
    _launch("shrink", x, grid, args)
    return out if splits == 1 else out.sum(0).to(x.dtype)


def shrink_grad_b(
    grad_y: torch.Tensor, lora_B: torch.Tensor, routes: torch.Tensor, h_masked: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over g: G = (g B_cat) * mask (M, E*r) in g.dtype and dB = s g^T h_masked as (E, N, r)."""
    M, N = grad_y.shape
    E, _, R = lora_B.shape
    BLOCK_R = _block_r(E * R)
    r_blocks = triton.cdiv(E * R, BLOCK_R)
    interpret = _interpreting(grad_y)
    meta = _pinned_meta("shrink_db", interpret)
    block_m = meta["BLOCK_M"] if meta is not None else SHRINK_DB_BLOCK_M
    per, splits = _reduction_splits(grad_y, M, N, block_m, r_blocks)
    G, stride_os = _shrink_out(M, E * R, splits, grad_y.dtype, grad_y.device)
    deterministic = _state["deterministic"]
    if deterministic:
        ws = torch.empty((triton.cdiv(M, block_m), E, N, R), device=grad_y.device, dtype=torch.float32)
        stride_dbp = ws.stride(0)
    else:
        ws = torch.zeros((E, N, R), device=grad_y.device, dtype=torch.float32)
        stride_dbp = 0
    off = 1 if deterministic else 0
    args = dict(
        x_ptr=grad_y, l_ptr=lora_B, routes_ptr=routes, out_ptr=G, h_ptr=h_masked, db_ptr=ws,
        M=M, K=N, R=R, E=E, K_PER_SPLIT=per, M_BUCKET=_m_bucket(M),
        stride_xm=grad_y.stride(0), stride_xk=grad_y.stride(1),
        stride_le=lora_B.stride(0), stride_lr=lora_B.stride(2), stride_lk=lora_B.stride(1),
        stride_os=stride_os, stride_om=G.stride(-2), stride_oc=G.stride(-1),
        stride_hm=h_masked.stride(0), stride_hc=h_masked.stride(1),
        stride_dbp=stride_dbp, stride_dbe=ws.stride(off), stride_dbk=ws.stride(off + 1),
        stride_dbr=ws.stride(off + 2),
        scaling=float(scaling), BLOCK_R=BLOCK_R, FUSE_DB=True, DETERMINISTIC=deterministic,
        DOT_PRECISION=_dot_precision(grad_y.dtype),
    )  # fmt: skip
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), r_blocks, splits)  # noqa: E731
    _launch("shrink_db", grad_y, grid, args, reset=() if deterministic else ("db_ptr",))
    dB = ws.sum(0) if deterministic else ws
    if splits > 1:
        G = G.sum(0).to(grad_y.dtype)
    return G, dB.to(grad_y.dtype)


def grad_a(G: torch.Tensor, x: torch.Tensor, R: int, E: int, scaling: float) -> torch.Tensor:
    """dA = s * G^T x as (E, r, K) in x.dtype; G (M, E*r) already masked."""
    M, K = x.shape
    BLOCK_R = _block_r(E * R)
    deterministic = _state["deterministic"]
    if x.device.type == "cuda":
        sms = _sm_count(x.device.index)
        tiles = triton.cdiv(K, 64) * triton.cdiv(E * R, BLOCK_R)
        splits = max(1, min(triton.cdiv(2 * sms, tiles), triton.cdiv(M, GRAD_A_SPLIT_ROWS)))
        rows = triton.cdiv(triton.cdiv(M, splits), GRAD_A_SPLIT_ROWS) * GRAD_A_SPLIT_ROWS
    else:  # interpreter: exercise the split reduction on small shapes
        rows = 64
    splits = max(1, triton.cdiv(M, rows))
    if deterministic:
        ws = torch.empty((splits, E, R, K), device=x.device, dtype=torch.float32)
        stride_op = ws.stride(0)
    else:
        ws = torch.zeros((E, R, K), device=x.device, dtype=torch.float32)
        stride_op = 0
    off = 1 if deterministic else 0
    args = dict(
        g_ptr=G, x_ptr=x, out_ptr=ws,
        M=M, K=K, R=R, E=E, M_PER_SPLIT=rows, M_BUCKET=_m_bucket(M),
        stride_gm=G.stride(0), stride_gc=G.stride(1), stride_xm=x.stride(0), stride_xk=x.stride(1),
        stride_op=stride_op, stride_oe=ws.stride(off), stride_or=ws.stride(off + 1), stride_ok=ws.stride(off + 2),
        scaling=float(scaling), BLOCK_R=BLOCK_R, DETERMINISTIC=deterministic,
        DOT_PRECISION=_dot_precision(x.dtype),
    )  # fmt: skip
    grid = lambda meta: (triton.cdiv(K, meta["BLOCK_K"]), triton.cdiv(E * R, BLOCK_R), splits)  # noqa: E731
    _launch("grad_a", x, grid, args, reset=() if deterministic else ("out_ptr",))
    dA = ws.sum(0) if deterministic else ws
    return dA.to(x.dtype)


def linear(
    a: torch.Tensor,
    weight: torch.Tensor,
    transpose_weight: bool,
    bias: torch.Tensor | None,
    L: torch.Tensor,
    adapter: torch.Tensor,
    adapter_is_B: bool,
    scaling: float,
    backbone: bool = True,
) -> torch.Tensor:
    """out = a Wt + b + s L U (``backbone=False``: out = b + s L U), one write of out.

    ``transpose_weight``: Wt = W^T (forward, a = x) or W (dx, a = g). ``adapter_is_B``: U[c, n] = B[c//r, n, c%r]
    (forward) or U[c, k] = A[c//r, c%r, k] (dx). ``backbone=False`` is the cuBLAS variant's half: the caller then
    runs ``out.addmm_(a, Wt)``.
    """
    M = a.shape[0]
    if transpose_weight:  # a (M, K) @ W^T -> (M, N)
        N, K = weight.shape
        stride_wk, stride_wn = weight.stride(1), weight.stride(0)
    else:  # a (M, N_w) @ W -> (M, K_w)
        K, N = weight.shape
        stride_wk, stride_wn = weight.stride(0), weight.stride(1)
    if adapter_is_B:
        E, _, R = adapter.shape
        stride_ue, stride_ur, stride_un = adapter.stride(0), adapter.stride(2), adapter.stride(1)
    else:
        E, R, _ = adapter.shape
        stride_ue, stride_ur, stride_un = adapter.stride(0), adapter.stride(1), adapter.stride(2)
    out = torch.empty((M, N), device=a.device, dtype=a.dtype)
    args = dict(
        a_ptr=a, w_ptr=weight, bias_ptr=bias if bias is not None else out, l_ptr=L, u_ptr=adapter, out_ptr=out,
        M=M, N=N, K=K, R=R, E=E, M_BUCKET=_m_bucket(M),
        stride_am=a.stride(0), stride_ak=a.stride(1), stride_wk=stride_wk, stride_wn=stride_wn,
        stride_lm=L.stride(0), stride_lc=L.stride(1),
        stride_ue=stride_ue, stride_ur=stride_ur, stride_un=stride_un,
        stride_om=out.stride(0), stride_on=out.stride(1),
        scaling=float(scaling), BLOCK_R=_block_r(E * R), BACKBONE=backbone, HAS_BIAS=bias is not None,
        DOT_PRECISION=_dot_precision(a.dtype),
    )  # fmt: skip
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _launch("linear" if backbone else "linear_lora", a, grid, args)
    return out


# --------------------------------------------------------------------------------------------------------------
# The contract: forward / backward with per-shape variant choice.

VARIANT_CACHE: dict = {}
VARIANT_ERRORS: dict = {}  # (shape key..., variant) -> the error that ruled the variant out while measuring


def _forward_variant(variant, x, weight, bias, lora_A, lora_B, routes, scaling):
    if variant == "torch":
        from routed_lora.reference import reference_forward

        return reference_forward(x, weight, bias, lora_A, lora_B, routes, scaling)
    h = shrink(x, lora_A, routes)
    if variant == "fused":
        y = linear(x, weight, True, bias, h, lora_B, True, scaling)
    else:
        y = linear(x, weight, True, bias, h, lora_B, True, scaling, backbone=False)
        y.addmm_(x, weight.t())  # cuBLAS, beta = 1: the LoRA term is read in the GEMM's epilogue
    return y, h


def _backward_variant(variant, grad_y, x, weight, lora_A, lora_B, routes, h_masked, scaling, compute_dx):
    if variant == "torch":
        from routed_lora.reference import reference_backward

        return reference_backward(grad_y, x, weight, lora_A, lora_B, routes, h_masked, scaling, compute_dx)
    E, R, _ = lora_A.shape
    G, dB = shrink_grad_b(grad_y, lora_B, routes, h_masked, scaling)
    dA = grad_a(G, x, R, E, scaling)
    dx = None
    if compute_dx:
        if variant == "fused":
            dx = linear(grad_y, weight, False, None, G, lora_A, False, scaling)
        else:
            dx = linear(grad_y, weight, False, None, G, lora_A, False, scaling, backbone=False)
            dx.addmm_(grad_y, weight)
    return dx, dA, dB


def _time_ms(fn, calls: int = 8, rounds: int = 3) -> float:
    """Steady-state GPU time of one call: median over ``rounds`` of ``calls`` back-to-back calls between two events.

    Back-to-back, as in training, where the host runs ahead of the GPU: timing single calls between events would
    count the host's launch latency before the first kernel, which penalises the variants with more (Triton)
    launches by tens of microseconds although a training step hides it."""
    fn()  # warm-up (and autotuning)
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def _choose(kind: str, key: tuple, candidates: dict) -> str:
    """The variant for this call: forced, interpreter ("fused"), cached, or measured now and cached."""
    variant = _state["variant"]
    if variant != "auto":
        return variant
    if key[0] == "cpu":
        return "fused"
    if key in VARIANT_CACHE:
        return VARIANT_CACHE[key]
    if torch.cuda.is_current_stream_capturing():
        return "cublas"
    timings = {}
    for name, fn in candidates.items():
        try:
            timings[name] = _time_ms(fn)
        except Exception as exc:  # e.g. a kernel that does not fit this GPU: never chosen, reported
            VARIANT_ERRORS[key + (name,)] = f"{type(exc).__name__}: {exc}"
    best = min(timings, key=timings.get)
    VARIANT_CACHE[key] = best
    CALLS[f"measured_{kind}"] += 1
    return best


def _shape_key(kind, x, weight, lora_A, *extra):
    E, R, _ = lora_A.shape
    dev = "cpu" if x.device.type != "cuda" else f"cuda:{x.device.index}:{_device_name(x.device.index)}"
    return (dev, kind, x.dtype, _m_bucket(x.shape[0]), weight.shape[1], weight.shape[0], R, E, *extra)


def _prepare(x, routes, lora_A, lora_B, *others):
    dtype = x.dtype
    lora_A = lora_A if lora_A.dtype == dtype else lora_A.to(dtype)
    lora_B = lora_B if lora_B.dtype == dtype else lora_B.to(dtype)
    routes = routes.reshape(-1)
    if routes.dtype != torch.int32 or not routes.is_contiguous():
        routes = routes.to(torch.int32).contiguous()
    return lora_A, lora_B, routes


def forward(x, weight, bias, lora_A, lora_B, routes, scaling):
    """(y, h_masked) for x (M, K); see the module docstring."""
    lora_A, lora_B, routes = _prepare(x, routes, lora_A, lora_B)
    M = x.shape[0]
    E, R, _ = lora_A.shape
    CALLS["forward"] += 1
    if M == 0 or weight.shape[0] == 0:
        CALLS["forward_empty"] += 1
        return torch.nn.functional.linear(x, weight, bias), x.new_zeros((M, E * R))
    args = (x, weight, bias, lora_A, lora_B, routes, scaling)
    key = _shape_key("forward", x, weight, lora_A, bias is not None)
    candidates = {v: (lambda v=v: _forward_variant(v, *args)) for v in ("fused", "cublas", "torch")}
    variant = _choose("forward", key, candidates)
    CALLS[f"forward_{variant}"] += 1
    return _forward_variant(variant, *args)


def backward(grad_y, x, weight, lora_A, lora_B, routes, h_masked, scaling, compute_dx):
    """(dx or None, dA (E, r, K), dB (E, N, r)); see the module docstring."""
    lora_A, lora_B, routes = _prepare(x, routes, lora_A, lora_B)
    if h_masked.dtype != x.dtype:
        h_masked = h_masked.to(x.dtype)
    M = x.shape[0]
    CALLS["backward"] += 1
    if M == 0 or weight.shape[0] == 0 or x.shape[1] == 0:
        CALLS["backward_empty"] += 1
        dx = torch.zeros_like(x) if compute_dx else None
        return dx, torch.zeros_like(lora_A), torch.zeros_like(lora_B)
    args = (grad_y, x, weight, lora_A, lora_B, routes, h_masked, scaling, bool(compute_dx))
    key = _shape_key("backward", x, weight, lora_A, bool(compute_dx))
    candidates = {v: (lambda v=v: _backward_variant(v, *args)) for v in ("fused", "cublas", "torch")}
    variant = _choose("backward", key, candidates)
    CALLS[f"backward_{variant}"] += 1
    return _backward_variant(variant, *args)
