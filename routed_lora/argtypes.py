"""``type=`` functions for argparse that refuse bad values with a message naming the expected and actual value.

argparse reports them as ``argument --steps: expected an integer >= 1, got '0'``; ``routed_lora.cli`` prints that
as ``routed-lora: error: train: argument --steps: ...`` and exits 2.
"""

from __future__ import annotations

import argparse
import math
import string

__all__ = ["int_at_least", "int_in", "finite_float", "check_template"]


def _err(msg: str) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(msg)


def int_at_least(low: int):
    """An integer >= ``low``."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise _err(f"expected an integer >= {low}, got {text!r}") from None
        if v < low:
            raise _err(f"expected an integer >= {low}, got {text!r}")
        return v

    parse.__name__ = f"int>={low}"
    return parse


def int_in(low: int, high: int):
    """An integer in [low, high]."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise _err(f"expected an integer in [{low}, {high}], got {text!r}") from None
        if not low <= v <= high:
            raise _err(f"expected an integer in [{low}, {high}], got {text!r}")
        return v

    parse.__name__ = f"int[{low},{high}]"
    return parse


def finite_float(low: float | None = None, high: float | None = None, *, low_open: bool = False,
                 high_open: bool = False):
    """A finite float (no nan, no inf) within the given bounds (closed unless ``*_open``)."""
    lo = "" if low is None else (f"> {low:g}" if low_open else f">= {low:g}")
    hi = "" if high is None else (f"< {high:g}" if high_open else f"<= {high:g}")
    want = "a finite number" + (f" {lo}" if lo else "") + (" and" if lo and hi else "") + (f" {hi}" if hi else "")

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise _err(f"expected {want}, got {text!r}") from None
        ok = math.isfinite(v)
        if ok and low is not None:
            ok = v > low if low_open else v >= low
        if ok and high is not None:
            ok = v < high if high_open else v <= high
        if not ok:
            raise _err(f"expected {want}, got {text!r}")
        return v

    parse.__name__ = "float"
    return parse


def check_template(template: str, *, fields: tuple[str, ...] = ("question",), flag: str | None = None) -> str:
    """Refuse a ``str.format`` template that lacks ``{question}``, uses another field (``{foo}``), a positional
    field (``{}``) or has unbalanced braces; literal braces are written ``{{`` and ``}}``. Returns ``template``.
    Raises ``ValueError`` (prefixed by ``flag`` when given)."""
    pre = f"{flag}: " if flag else ""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise ValueError(f"{pre}not a valid template ({exc}); write literal braces as {{{{ and }}}}") from None
    bad = sorted({n for n in names if n not in fields})  # {foo}, {}, {0}, {question.upper}: all refused
    if bad:
        shown = ", ".join("{" + n + "}" for n in bad)
        raise ValueError(f"{pre}unknown field {shown} in the template; it may only use "
                         + ", ".join("{" + f + "}" for f in fields) + " (literal braces: {{ and }})")
    missing = [f for f in fields if f not in names]
    if missing:
        raise ValueError(f"{pre}the template has no " + ", ".join("{" + f + "}" for f in missing)
                         + f" field, so every prompt would be the same text: {template[:60]!r}")
    return template
