"""Diagnostics from the DART paper: LEAS attribution (:mod:`.leas`), gradient conflict between reasoning and tool
tokens (:mod:`.grad_angle`), and evaluation of the six LEAS variants and the 2-Agent baseline
(:mod:`.evaluate`). The command line lives in :mod:`.cli` (``routed-lora diagnose ...``, ``routed-lora eval``)."""

from .leas import COLUMNS, DESIGN, VARIANTS, LEASResult, leas, read_rates, write_leas

__all__ = ["leas", "LEASResult", "read_rates", "write_leas", "VARIANTS", "COLUMNS", "DESIGN"]
