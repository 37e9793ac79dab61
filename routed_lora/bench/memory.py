"""Memory accounting: bytes saved for backward, and extra peak memory of a forward + backward.

Saved for backward (:func:`saved_for_backward`): the forward runs under
``torch.autograd.graph.saved_tensors_hooks``; every tensor autograd keeps is seen by the pack hook. Bytes are
counted per unique storage (a view and its base count once), and storages of parameters (or of any tensor given
in ``exclude``) are left out: they exist anyway. Deterministic and comparable across machines.

Extra peak memory (:func:`extra_peak_bytes`): the most memory allocated, above what was allocated before, while a
callable runs. On CUDA from the caching allocator's statistics; on CPU from the profiler's allocation events
(``profile_memory=True``), which see every allocation, including those inside custom ops.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

__all__ = ["SavedReport", "saved_for_backward", "extra_peak_bytes", "storage_key"]


def storage_key(t: torch.Tensor):
    st = t.untyped_storage()
    return (str(t.device), st.data_ptr(), st.nbytes())


@dataclass
class SavedReport:
    """``bytes``: unique non-excluded storages saved; ``tensors``: (shape, dtype, storage bytes, is_input) of each
    counted storage, largest first (``is_input``: it is one of the ``inputs`` given to
    :func:`saved_for_backward`); ``excluded_bytes``: storages skipped as parameters/excluded."""

    bytes: int
    tensors: list = field(default_factory=list)
    excluded_bytes: int = 0
    count: int = 0

    def largest_numel(self, *, inputs: bool = True) -> int:
        """Elements of the largest saved storage (a view counts as its whole storage; ``inputs=False``: among
        tensors that are not inputs)."""
        return max((b // _itemsize(d) for _, d, b, inp in self.tensors if inputs or not inp), default=0)

    def has_shape(self, shape) -> bool:
        return any(tuple(s) == tuple(shape) for s, _, _, _ in self.tensors)

    def as_dict(self) -> dict:
        return {
            "saved_bytes": self.bytes,
            "saved_excluded_bytes": self.excluded_bytes,
            "saved_tensors": [[list(s), d, b, inp] for s, d, b, inp in self.tensors],
        }


def _itemsize(dtype_name: str) -> int:
    return torch.empty((), dtype=getattr(torch, dtype_name)).element_size()


def saved_for_backward(
    fn: Callable[[], object],
    *,
    params: Iterable[torch.Tensor] = (),
    exclude_parameters_of=None,
    inputs: Iterable[torch.Tensor] = (),
) -> tuple[object, SavedReport]:
    """Run ``fn()`` (a forward) and account for what autograd saves for its backward.

    ``params``: tensors whose storages are not counted (the layer's parameters, frozen or not);
    ``exclude_parameters_of``: a module (or list of modules) whose parameters and buffers are excluded too;
    ``inputs``: tensors (e.g. x) counted but labelled as inputs, so a check for activation-sized saves can tell
    them from new tensors.
    Returns ``(fn's output, SavedReport)``; the output keeps the graph, so a backward can follow.
    """
    excluded = {storage_key(p) for p in params}
    mods = exclude_parameters_of
    if mods is not None:
        mods = mods if isinstance(mods, (list, tuple)) else [mods]
        for m in mods:
            for t in list(m.parameters()) + list(m.buffers()):
                excluded.add(storage_key(t))
    input_keys = {storage_key(t) for t in inputs}
    seen: dict = {}
    skipped: dict = {}
    count = 0

    def pack(t):
        nonlocal count
        count += 1
        key = storage_key(t)
        if key in excluded or isinstance(t, torch.nn.Parameter):
            skipped[key] = key[2]
        elif key not in seen:
            seen[key] = (tuple(t.shape), str(t.dtype).replace("torch.", ""), key[2], key in input_keys)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    tensors = sorted(seen.values(), key=lambda v: -v[2])
    rep = SavedReport(
        bytes=sum(v[2] for v in tensors), tensors=tensors, excluded_bytes=sum(skipped.values()), count=count
    )
    return out, rep


def _cpu_peak_from_profiler(prof) -> int:
    from torch._C._profiler import _EventType

    events = []

    def walk(nodes):
        for n in nodes:
            if n.tag == _EventType.Allocation:
                f = n.extra_fields
                if str(f.device).startswith("cpu"):
                    events.append((n.start_time_ns, f.alloc_size))
            walk(n.children)

    walk(prof.profiler.kineto_results.experimental_event_tree())
    events.sort()
    cur = peak = 0
    for _, size in events:
        cur += size
        peak = max(peak, cur)
    return peak


def extra_peak_bytes(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Peak bytes allocated while ``fn()`` runs, above what was allocated when it started (its outputs and any
    gradients it leaves count while they are alive)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
        with _native_stderr_silenced():  # torch >= 2.13's kineto prints "USDT: ... profiler_start" per run
            prof.start()
        try:
            fn()
        finally:
            with _native_stderr_silenced():
                prof.stop()
    return int(_cpu_peak_from_profiler(prof))


@contextlib.contextmanager
def _native_stderr_silenced():
    """Send file descriptor 2 to /dev/null for the duration (C++ code writes there directly, past sys.stderr).

    Only the profiler's start and stop run inside it, never the measured function, so no error is hidden."""
    try:
        saved = os.dup(2)
    except OSError:  # no usable fd 2 (embedded interpreters): nothing to silence
        yield
        return
    try:
        sys.stderr.flush()
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)
