"""The ``routed-lora`` command line.

Each sub-system registers its own sub-commands through a ``register(subparsers)`` function in the modules
listed in ``_COMMAND_MODULES``; a module that is missing (an optional part not installed) is skipped.
"""

from __future__ import annotations

import argparse
import importlib
import sys

_COMMAND_MODULES = (
    "routed_lora.demo",
    "routed_lora.env.cli",
    "routed_lora.bench.cli",
    "routed_lora.grpo.cli",
    "routed_lora.diagnostics.cli",
    "routed_lora.study.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="routed-lora",
        description="Per-token routed LoRA adapters for DART-style agentic RL.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and (exc.name == name or name.startswith(exc.name + ".")):
                continue  # that part of the package is not present
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
