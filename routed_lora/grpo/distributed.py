"""Distributed helpers of the GRPO loop; each is a no-op without an initialised torch.distributed.

The rank and world size, a float sum over ranks, and gradient accumulation without communication on all but the
last micro-batch (DDP's ``no_sync`` or FSDP2's ``set_requires_gradient_sync``). Must not import the model or the
package's other GRPO modules: everything else builds on this one.
"""

from __future__ import annotations

import torch


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def world_info() -> tuple[int, int]:
    dist = _dist()
    return (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)


def all_reduce_sum(values: list[float]) -> list[float]:
    dist = _dist()
    if dist is None:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _grad_sync(ddp_model, sync: bool):
    """Gradient accumulation without communication on all but the last micro-batch: DDP's ``no_sync``, or
    FSDP2's ``set_requires_gradient_sync``."""
    if sync:
        if hasattr(ddp_model, "set_requires_gradient_sync"):
            ddp_model.set_requires_gradient_sync(True)
        return _null()
    if hasattr(ddp_model, "no_sync"):
        return ddp_model.no_sync()
    if hasattr(ddp_model, "set_requires_gradient_sync"):
        ddp_model.set_requires_gradient_sync(False)
    return _null()
