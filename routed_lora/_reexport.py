"""Old import paths of a module split in several: setting a re-exported name on the old module sets it where
it is read.

``kernels/launch.py``, ``grpo/trainer.py``, ``routed_lora/hf.py`` and ``diagnostics/evaluate.py`` were split by
responsibility and re-export every name they had.
Reading a re-exported name gives the same object either way; *setting* one on the old module (a test's
``monkeypatch.setattr(launch, "MAX_BLOCK_R", 16)``, ``monkeypatch.setattr(trainer, "_FORCE_OLD_PASS", True)``)
would otherwise change only the old module's copy of the binding, and the code that reads the name, now in
another module, would not see it. :func:`write_through` makes the old module pass such a setting on to each of
the given modules that holds the same binding (the same name bound to the same object), so the patch and its
undo reach every reader.

Holds no state and imports nothing of the package; it changes no reading of attributes (no ``__getattr__``),
so the hot path is unaffected.
"""

from __future__ import annotations

import sys
import types

__all__ = ["write_through"]

_MISSING = object()


class _WriteThroughModule(types.ModuleType):
    """A module whose attribute assignments also rebind the same binding in its ``_write_through_to`` modules."""

    def __setattr__(self, name: str, value) -> None:
        if not (name.startswith("__") and name.endswith("__")):
            d = self.__dict__
            old = d.get(name, _MISSING)
            if old is not _MISSING:
                for part in d.get("_write_through_to", ()):
                    if part.__dict__.get(name, _MISSING) is old:
                        setattr(part, name, value)
        super().__setattr__(name, value)


def write_through(module_name: str, parts) -> None:
    """Make ``sys.modules[module_name]`` pass assignments of names it shares with ``parts`` on to them."""
    module = sys.modules[module_name]
    module._write_through_to = tuple(parts)
    module.__class__ = _WriteThroughModule
