"""Checks of a run folder that ``train --resume`` makes before it writes anything (issue 23).

Each raises ``ValueError`` with a message that names the file (and line), and reads without changing anything:

- :func:`check_checkpoint`: ``checkpoint.pt`` holds a training checkpoint (step, adapters, optimizer state, one
  RNG state per process) written by as many processes as will resume it, and, given a model, adapters of
  exactly the model's routed layers and shapes;
- :func:`check_metrics`: ``metrics.jsonl`` can be read back (a truncated *last* row is fine: it is dropped with a
  warning when the run resumes) and every row's ``step`` is a number.

The CLI reports these as ``routed-lora: error: --resume: ...`` (exit status 2) before it rewrites
``config.json``; :func:`routed_lora.grpo.trainer.load_checkpoint` runs :func:`check_checkpoint` before it copies
anything into the model or the optimiser.
"""

from __future__ import annotations

import warnings
from pathlib import Path

__all__ = ["check_checkpoint", "check_adapters_fit", "check_metrics", "processes"]

_KEYS = ("step", "adapters", "optimizer", "rng")


def processes(n: int) -> str:
    return "one process (no torchrun)" if n == 1 else f"{n} processes (torchrun --nproc-per-node {n})"


def check_checkpoint(state, path, *, world: int, model=None) -> None:
    """``state`` (what ``torch.load(path)`` gave) is a training checkpoint that ``world`` processes can resume,
    and fits ``model`` when given (see :func:`check_adapters_fit`)."""
    path = Path(path)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a training checkpoint (a {type(state).__name__}, not a dict)")
    missing = [k for k in _KEYS if k not in state]
    if missing:
        raise ValueError(f"{path}: not a training checkpoint of this package (no {', '.join(missing)})")
    step = state["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"{path}: not a training checkpoint (step {step!r} is not an integer >= 0)")
    for key in ("adapters", "optimizer"):
        if not isinstance(state[key], dict):
            raise ValueError(f"{path}: not a training checkpoint ({key} is a {type(state[key]).__name__})")
    opt = state["optimizer"].get("optimizer")
    if not isinstance(opt, dict) or not isinstance(opt.get("param_groups"), list) or "state" not in opt:
        raise ValueError(f"{path}: not a training checkpoint (no optimiser state_dict under optimizer)")
    for key in ("config", "extra"):
        if not isinstance(state.get(key) or {}, dict):
            raise ValueError(f"{path}: not a training checkpoint ({key} is a {type(state[key]).__name__})")
    rngs = state["rng"]
    if not isinstance(rngs, (list, tuple)) or not rngs or not all(isinstance(r, dict) for r in rngs):
        raise ValueError(f"{path}: not a training checkpoint (rng is not a list of RNG states, one per process)")
    if len(rngs) != world:
        here = f"{world} process" + ("es" if world != 1 else "")
        raise ValueError(f"{path} was written by {processes(len(rngs))}; resume it with the same number of "
                         f"processes (this run has {here}): each process continues its own random stream")
    if model is not None:
        check_adapters_fit(state["adapters"], model, path)


def check_adapters_fit(adapters: dict, model, path) -> None:
    """The checkpoint's adapter tensors (``{module.lora_A: tensor, ...}``, as ``trainer.adapter_state`` writes
    them) are exactly those of ``model``'s routed layers, with the same shapes (full shapes, also under FSDP2)."""
    expected = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "lora_A") and hasattr(mod, "adapter_names"):
            expected[f"{name}.lora_A"] = tuple(mod.lora_A.shape)
            expected[f"{name}.lora_B"] = tuple(mod.lora_B.shape)
    missing, unexpected = sorted(set(expected) - set(adapters)), sorted(set(adapters) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} {missing[:3]}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} {unexpected[:3]}")
    for key in sorted(set(expected) & set(adapters)):
        got = tuple(getattr(adapters[key], "shape", ()))
        if got != expected[key]:
            problems.append(f"{key} has shape {got}, the model's {expected[key]}")
            break
    if problems:
        raise ValueError(f"{path}: its adapters do not fit the model: {'; '.join(problems)}")


def check_metrics(path) -> None:
    """``metrics.jsonl`` of a run to resume (if it exists): every row readable (a truncated last row is
    allowed: the resumed run drops it, with a warning) and every ``step`` a number."""
    from routed_lora.state import read_jsonl_rows

    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_file():
        raise ValueError(f"{path}: not a file (the run's metrics); move it away to resume")
    try:
        with warnings.catch_warnings():  # the resumed run warns about a truncated last row when it drops it
            warnings.simplefilter("ignore")
            rows, _ = read_jsonl_rows(path)
    except OSError as exc:
        raise ValueError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise ValueError(f"{exc}; fix or delete that line (the run's metrics) to resume") from None
    for i, row in enumerate(rows):
        step = row.get("step", 0)
        if isinstance(step, bool) or not isinstance(step, (int, float)):
            line = _line_of(path, i)
            raise ValueError(f"{path}:{line}: 'step' is not a number ({step!r}); fix or delete that line (the "
                             "run's metrics) to resume")


def _line_of(path: Path, index: int) -> int:
    """1-based line number of the ``index``-th non-blank line of ``path``."""
    seen = -1
    for n, raw in enumerate(path.read_bytes().split(b"\n"), 1):
        if raw.strip():
            seen += 1
            if seen == index:
                return n
    return 0
