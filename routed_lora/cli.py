"""The ``routed-lora`` command line.

Each sub-system registers its own sub-commands through a ``register(subparsers)`` function in the modules
listed in ``_COMMAND_MODULES``; a module that is missing (an optional part not installed) is skipped.

User errors (bad flag values, unreadable input files; :mod:`routed_lora.errors`) are caught once, in
:func:`main`, for every sub-command: one line ``routed-lora: error: ...`` on stderr and exit status 2, no
traceback unless ``--debug`` is given (anywhere on the command line) or ``ROUTED_LORA_DEBUG=1`` is set.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .errors import UsageError, one_line, user_error_types

_COMMAND_MODULES = (
    "routed_lora.demo",
    "routed_lora.env.cli",
    "routed_lora.bench.cli",
    "routed_lora.grpo.cli",
    "routed_lora.diagnostics.cli",
    "routed_lora.study.cli",
)


class _Parser(argparse.ArgumentParser):
    """argparse's errors (bad values, missing flags, unknown choices) raised as :class:`UsageError` instead of
    printing the usage and exiting, so they come out as one line like every other user error. Sub-parsers are
    built with the parent's class, so every sub-command inherits this."""

    def error(self, message):
        where = self.prog.split(" ", 1)[1] + ": " if " " in self.prog else ""
        raise UsageError(f"{where}{message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="routed-lora",
        description="Per-token routed LoRA adapters for DART-style agentic RL.",
    )
    parser.add_argument("--debug", action="store_true",
                        help="show the Python traceback of user errors (accepted anywhere on the command line)")
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


def _pop_debug(argv: list[str]) -> tuple[list[str], bool]:
    """``--debug`` removed from wherever it is (before ``--``), so sub-commands need not declare it."""
    end = argv.index("--") if "--" in argv else len(argv)
    debug = "--debug" in argv[:end]
    return [a for i, a in enumerate(argv) if not (i < end and a == "--debug")], debug


def main(argv: list[str] | None = None) -> int:
    argv, debug = _pop_debug(list(sys.argv[1:] if argv is None else argv))
    debug = debug or os.environ.get("ROUTED_LORA_DEBUG", "") not in ("", "0")
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        if getattr(args, "model", None):  # a registered pretrained name (smollm2-135m) -> its cached folder
            from .pretrained import resolve_model

            args.model = resolve_model(args.model)
        return int(args.func(args) or 0)
    except user_error_types() as exc:
        if debug:
            raise
        print(f"routed-lora: error: {one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
