"""Process groups for the multi-process CPU tests: gloo over a file store in the test's tmp_path, so that no
TCP port is picked and then raced for (a free port found by binding port 0 can be taken by another process
before rank 0 listens on it)."""

from __future__ import annotations

from pathlib import Path


def store_path(tmp_path) -> str:
    """A fresh file-store path for one process group (the file must not exist before the group starts)."""
    path = Path(tmp_path) / "gloo_store"
    path.unlink(missing_ok=True)
    return str(path)


def init_gloo(rank: int, world: int, store: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
