"""The adapters as the GRPO loop sees them: the routed layers, per-adapter state and gradient norms, and the
optimiser with one learning rate per adapter.

Per-adapter learning rates: one layer keeps all adapters in one tensor (``lora_A`` (E, r, K)), so the optimiser
runs at the base learning rate and each adapter's slice of the update is then scaled by ``lr_e / lr``. For
Adam/AdamW (and SGD) the update, weight decay included, is linear in the learning rate, so this is exactly an
optimiser with one learning rate per adapter.

Must not run forward passes or hold the loop's state; the collectives it makes (gradient norms over ranks, the
FSDP2 all-gathers of full tensors, rank 0's adapters broadcast) are those of :mod:`.distributed` and
:mod:`routed_lora.fsdp`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .distributed import _dist, all_reduce_sum


# ----------------------------------------------------------------------------------------------------------------
# adapters: per-adapter views, learning rates, gradient norms


def routed_layers(model: nn.Module) -> list:
    from routed_lora.layer import RoutedLoRALinear

    return [m for m in model.modules() if isinstance(m, RoutedLoRALinear)]


def adapter_names(model: nn.Module) -> tuple[str, ...]:
    layers = routed_layers(model)
    if not layers:
        raise ValueError("model: no RoutedLoRALinear layers (apply routed_lora.apply_routed_lora first)")
    return layers[0].adapter_names


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every trainable LoRA tensor (lora_A and lora_B of each routed layer), in module order."""
    out = []
    for layer in routed_layers(model):
        out += [layer.lora_A, layer.lora_B]
    return out


def adapter_grad_norms(model: nn.Module) -> dict[str, float]:
    """L2 norm of each adapter's gradient over all layers (slices e of lora_A and lora_B)."""
    from routed_lora.fsdp import is_dtensor, local_part

    names = adapter_names(model)
    sq = [0.0] * len(names)
    sharded = False
    for layer in routed_layers(model):
        for p in (layer.lora_A, layer.lora_B):
            if p.grad is None:
                continue
            sharded = sharded or is_dtensor(p.grad)
            g, offset = local_part(p.grad.detach())  # FSDP2: this rank's adapter rows, summed over ranks below
            g = g.double()
            for i in range(g.shape[0]):
                sq[offset[0] + i] += float((g[i] * g[i]).sum())
    if sharded:
        sq = all_reduce_sum(sq)
    return {n: math.sqrt(s) for n, s in zip(names, sq)}


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA tensors by module name (exact copies; for checkpoints and tests)."""
    from routed_lora.fsdp import full_tensor

    out = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "lora_A") and hasattr(mod, "adapter_names"):
            # FSDP2: the full tensors (an all-gather; every rank calls this)
            out[f"{name}.lora_A"] = full_tensor(mod.lora_A.detach()).clone()
            out[f"{name}.lora_B"] = full_tensor(mod.lora_B.detach()).clone()
    return out


@torch.no_grad()
def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    from routed_lora.fsdp import copy_full_into

    mods = dict(model.named_modules())
    for key, value in state.items():
        name, attr = key.rsplit(".", 1)
        copy_full_into(getattr(mods[name], attr), value)  # plain, or this rank's FSDP2 shard


class AdapterOptimizer:
    """AdamW over the LoRA tensors with one learning rate per adapter: ``routed_lora.trainable_parameters`` and
    ``routed_lora.set_adapter_lr`` (the optimiser runs at the largest rate and each adapter's slice of the
    update is scaled by ``lr_e / lr_max``; exact for AdamW, see the module doc)."""

    def __init__(self, model: nn.Module, lrs: dict[str, float], *, weight_decay: float = 0.0,
                 betas=(0.9, 0.999), eps: float = 1e-8):
        import routed_lora as rl

        self.names = adapter_names(model)
        missing = [n for n in self.names if n not in lrs]
        if missing:
            raise ValueError(f"lrs: no learning rate for adapters {missing} (have {sorted(lrs)})")
        groups = rl.trainable_parameters(model)
        self.params = [p for g in groups for p in g["params"]]
        self.base_lr = max(lrs[n] for n in self.names)
        if self.base_lr <= 0:
            raise ValueError(f"lrs: at least one adapter needs a learning rate > 0, got {lrs}")
        self.optimizer = torch.optim.AdamW(groups, lr=self.base_lr, betas=betas, eps=eps,
                                           weight_decay=weight_decay)
        rl.set_adapter_lr(self.optimizer, {n: lrs[n] for n in self.names})

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        self.optimizer.step()

    def state_dict(self) -> dict:
        """The optimiser state with full tensors: under FSDP2 each sharded state tensor (exp_avg, ...) is
        gathered (every rank calls this), so a checkpoint has one format whatever the strategy and number of
        processes."""
        from routed_lora.fsdp import full_tensor, is_dtensor

        sd = self.optimizer.state_dict()
        sd["state"] = {i: {k: full_tensor(v) if is_dtensor(v) else v for k, v in st.items()}
                       for i, st in sd["state"].items()}
        return {"optimizer": sd}

    def load_state_dict(self, state: dict) -> None:
        """Inverse of :meth:`state_dict`: full state tensors are cut to this rank's shard of their parameter."""
        from routed_lora.fsdp import is_dtensor, local_slice

        sd = dict(state["optimizer"])
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if any(is_dtensor(p) for p in params):
            from torch.distributed.tensor import DTensor

            local = {}
            for i, st in sd["state"].items():
                p = params[int(i)]
                local[i] = {}
                for k, v in st.items():
                    if is_dtensor(p) and isinstance(v, torch.Tensor) and tuple(v.shape) == tuple(p.shape):
                        v = DTensor.from_local(local_slice(v, p).to(p.device).clone(), p.device_mesh, p.placements,
                                               shape=p.shape, stride=p.stride(), run_check=False)
                    local[i][k] = v
            sd["state"] = local
        self.optimizer.load_state_dict(sd)


def _broadcast_adapters(model: nn.Module) -> None:
    """Copy rank 0's adapter tensors to every rank (before sharding)."""
    dist = _dist()
    if dist is None:
        return
    with torch.no_grad():
        for p in lora_parameters(model):
            dist.broadcast(p.data, src=0)
