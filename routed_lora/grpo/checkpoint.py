"""What the GRPO loop writes to its run folder: checkpoints (adapters, optimiser, RNG states, step, config) and
the metrics rows, each written so that a kill leaves the previous state readable.

Must not decide when to save or what a step computes (the loop does): writing and reading only.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import torch

from .adapters import AdapterOptimizer, adapter_state, load_adapter_state
from .config import GRPOConfig
from .distributed import _dist, world_info


# ----------------------------------------------------------------------------------------------------------------
# checkpoints and metrics


def _atomic_torch_save(obj, path: Path) -> None:
    from routed_lora.state import fsync_dir, tmp_name

    tmp = tmp_name(path)  # checkpoint.pt.tmp<pid>: removed at the next start if a kill leaves it
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def rng_state() -> dict:
    import numpy as np

    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_state(state: dict) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def save_checkpoint(out: Path, *, model, optimizer: AdapterOptimizer, step: int, cfg: GRPOConfig,
                    extra: dict | None = None) -> Path:
    """Write ``out/checkpoint.pt`` atomically (temp file, fsync, rename): adapters, optimizer, RNG states
    (this rank's), step and config. Under DDP only rank 0 writes (adapters are identical on every rank); every
    rank's RNG state is stored."""
    rank, world = world_info()
    rng = rng_state()
    dist = _dist()
    if dist is not None:
        gathered = [None] * world
        dist.all_gather_object(gathered, rng)
        rngs = gathered
    else:
        rngs = [rng]
    path = Path(out) / "checkpoint.pt"
    adapters, opt_state = adapter_state(model), optimizer.state_dict()  # collectives under FSDP2: every rank
    if rank == 0:
        state = {
            "step": step,
            "adapters": adapters,
            "optimizer": opt_state,
            "rng": rngs,
            "config": cfg.to_dict(),
            "extra": extra or {},
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_torch_save(state, path)
    if dist is not None:
        dist.barrier()
    return path


def load_checkpoint(path: Path, *, model, optimizer: AdapterOptimizer) -> dict:
    """Restore adapters, optimizer and this rank's RNG state; returns the checkpoint dict (``step`` ...)."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    state = torch.load(path, map_location="cpu", weights_only=False)
    rank, world = world_info()
    from .resume import check_checkpoint

    check_checkpoint(state, path, world=world, model=model)  # all checked before anything is copied
    load_adapter_state(model, state["adapters"])
    optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"][rank])
    return state


class MetricsWriter:
    """Append JSON rows to ``metrics.jsonl`` (rank 0 only), each with flush and fsync (:func:`routed_lora.state.
    append_line`): a kill loses at most the row being written. On resume, rows after the resumed step are dropped
    and so is a truncated last line (with a warning), and the kept rows are rewritten atomically; a fresh run
    (``resume_step=None``) starts a new file."""

    def __init__(self, path: Path, *, resume_step: int | None = None, enabled: bool = True):
        from routed_lora.state import atomic_write_text, read_jsonl_rows

        self.path = Path(path)
        self.enabled = enabled
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            rows, dropped = read_jsonl_rows(self.path)
            keep = [r for r in rows if r.get("step", 0) <= resume_step]
            torn = not self.path.read_bytes().endswith(b"\n")  # a last row without its newline
            if dropped or torn or len(keep) != len(rows):
                atomic_write_text(self.path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in keep))
        elif resume_step is None and self.path.exists():
            self.path.unlink()

    def write(self, row: dict) -> None:
        from routed_lora.state import append_line

        if not self.enabled:
            return
        append_line(self.path, json.dumps(row, sort_keys=True))
