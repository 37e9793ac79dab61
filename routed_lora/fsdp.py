"""FSDP2 (``torch.distributed.fsdp.fully_shard``) support: the adapters as DTensor shards.

After ``fully_shard`` every parameter of a sharded module is a ``DTensor`` holding this rank's shard along
dim 0. For ``lora_A`` (E, r, K) and ``lora_B`` (E, N, r) dim 0 is the adapter dimension, so with E = 2
adapters on 3 ranks rank 0 holds adapter 0, rank 1 adapter 1 and rank 2 an empty (0, r, K) shard. The helpers
here let the public functions work on such parameters:

- :func:`local_part`: this rank's shard as a plain tensor and its offset in the global tensor, from DTensor's
  own placement rule (``compute_local_shape_and_global_offset``), so uneven shards are handled;
- :func:`full_tensor`: the whole tensor on every rank (an all-gather: every rank must call it);
- :func:`copy_full_into`: write a whole tensor into a parameter (each rank copies its own slice, no
  communication);
- :func:`is_sharded`, :func:`check_not_sharded`: detection, and the clear error for helpers that cannot work
  on a sharded model (patching, unpatching, conversion: do them before ``fully_shard``);
- :func:`full_params`: a context in which every FSDP module keeps its parameters unsharded, so generation
  (whose number of forward calls differs between ranks) runs without collectives;
- :func:`shard_model`: the sharding the trainer's ``--strategy fsdp2`` applies (each decoder layer, then the
  root).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

__all__ = ["is_dtensor", "is_sharded", "check_not_sharded", "local_part", "full_tensor", "copy_full_into",
           "full_params", "shard_model", "fsdp_modules"]


def is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(t, DTensor)


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """Every module of ``model`` that ``fully_shard`` was applied to (outermost first)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_sharded(model: nn.Module) -> bool:
    """True if ``fully_shard`` was applied to ``model`` or any of its modules, or a parameter is a DTensor."""
    return bool(fsdp_modules(model)) or any(is_dtensor(p) for p in model.parameters())


def check_not_sharded(model: nn.Module, what: str) -> None:
    """Raise a clear error if ``model`` is sharded: ``what`` must run before ``fully_shard``."""
    if is_sharded(model):
        raise ValueError(
            f"model: {type(model).__name__} is already sharded with fully_shard (FSDP2); {what} changes which "
            "parameters the model has, so it must run before fully_shard: call it on the unsharded model, "
            "then shard"
        )


def local_part(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """``(local tensor, global offset of its first element per dim)``; a plain tensor is its own local part.
    The local tensor shares storage with the parameter (in-place writes update it)."""
    if not is_dtensor(t):
        return t, (0,) * t.dim()
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    local = t.to_local()
    if tuple(local.shape) != tuple(shape):  # pragma: no cover - a placement this code does not know
        raise RuntimeError(f"DTensor local shape {tuple(local.shape)} != computed {tuple(shape)}")
    return local, tuple(int(o) for o in offset)


def local_slice(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The part of ``full`` (global shape of ``like``) that ``like``'s local shard holds."""
    local, offset = local_part(like)
    index = tuple(slice(o, o + s) for o, s in zip(offset, local.shape))
    return full[index]


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a DTensor is all-gathered: a collective, every rank must call it)."""
    return t.full_tensor() if is_dtensor(t) else t


@torch.no_grad()
def copy_full_into(param: torch.Tensor, full: torch.Tensor) -> None:
    """``param[...] = full`` for a plain or sharded parameter (each rank writes its own slice)."""
    if tuple(full.shape) != tuple(param.shape):
        raise ValueError(f"expected a tensor of shape {tuple(param.shape)}, got {tuple(full.shape)}")
    local, _ = local_part(param)
    local.copy_(local_slice(full.to(local.device), param))


@contextlib.contextmanager
def full_params(model: nn.Module) -> Iterator[nn.Module]:
    """Keep every FSDP module of ``model`` unsharded inside the block (one all-gather per module on entry, a
    reshard on exit). Forward calls inside then need no collective, so ranks may run different numbers of
    them (generation, evaluation). No-op for an unsharded model. Costs the unsharded parameters' memory."""
    mods = fsdp_modules(model)
    if not mods:
        yield model
        return
    for m in mods:
        m.set_reshard_after_forward(False)
        m.unshard()
    try:
        yield model
    finally:
        for m in mods:
            m.reshard()
            m.set_reshard_after_forward(True)


def shard_model(model: nn.Module, *, mesh=None) -> nn.Module:
    """``fully_shard`` each transformer block (the innermost modules with a ``gradient_checkpointing`` flag,
    i.e. transformers' ``GradientCheckpointingLayer``, or the entries of ``model.model.layers``), then the root.
    Call after :func:`routed_lora.apply_routed_lora` and any adapter loading, before building the optimizer."""
    from torch.distributed.fsdp import fully_shard

    check_not_sharded(model, "shard_model")
    flagged = [m for m in model.modules() if m is not model and hasattr(m, "gradient_checkpointing")]
    # the innermost flagged modules: the decoder layers (the inner base model has the flag too)
    blocks = [m for m in flagged if not any(o is not m and hasattr(o, "gradient_checkpointing")
                                            for o in m.modules())]
    if not blocks:
        layers = getattr(getattr(model, "model", None), "layers", None)
        blocks = list(layers) if isinstance(layers, nn.ModuleList) else []
    kw = {} if mesh is None else {"mesh": mesh}
    for b in blocks:
        fully_shard(b, **kw)
    fully_shard(model, **kw)
    return model


@torch.no_grad()
def copy_row_into(param: torch.Tensor, row: int, value: torch.Tensor) -> None:
    """``param[row] = value`` for a plain or sharded parameter: each rank writes the part of row ``row`` it
    holds (nothing when its shard does not hold that row); no communication."""
    if tuple(value.shape) != tuple(param.shape[1:]):
        raise ValueError(f"expected a row of shape {tuple(param.shape[1:])}, got {tuple(value.shape)}")
    local, offset = local_part(param)
    start = offset[0]
    if not start <= row < start + local.shape[0]:
        return
    index = tuple(slice(o, o + s) for o, s in zip(offset[1:], local.shape[1:]))
    local[row - start].copy_(value[index].to(local.device))
