"""User errors of the command line: one line, ``routed-lora: error: ...``, exit status 2.

:class:`UsageError` is the one exception the CLI turns into that line (``routed_lora.cli.main`` catches it once,
so every sub-command gets the behaviour without code of its own). Library errors that describe bad *input*
(a data file, a corpus, an adapter folder, a retriever) are listed by :func:`user_error_types` and reported the
same way; anything else is a bug and keeps its traceback. ``--debug`` shows the traceback of user errors too.

:func:`for_flag` wraps a block that reads one flag's input and prefixes its errors with the flag's name::

    with for_flag("--data"):
        rows = load_qa(args.data)      # DataError "train.jsonl:5: ..." -> "--data: train.jsonl:5: ..."
"""

from __future__ import annotations

import contextlib
import importlib

__all__ = ["UsageError", "user_error_types", "for_flag", "one_line"]


class UsageError(Exception):
    """A bad flag value or input file, reported by the CLI as one line (exit status 2)."""


# (module, class name) of library exceptions that mean "your input is wrong"; looked up lazily so this module
# imports nothing heavy and a missing optional part is simply skipped
_USER_ERRORS = (
    ("routed_lora.env.data", "DataError"),
    ("routed_lora.env.retriever", "RetrieverError"),
    ("routed_lora.adapter_io", "AdapterLoadError"),
    ("routed_lora.grpo.config", "ConfigError"),
)


def user_error_types() -> tuple[type[BaseException], ...]:
    out: list[type[BaseException]] = [UsageError]
    for mod, name in _USER_ERRORS:
        try:
            out.append(getattr(importlib.import_module(mod), name))
        except (ImportError, AttributeError):
            continue
    return tuple(out)


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (newlines inside a message become ``; ``)."""
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, KeyError) and len(exc.args) == 1:  # str(KeyError) adds quotes
        text = str(exc.args[0])
    return "; ".join(part.strip() for part in text.splitlines() if part.strip())


@contextlib.contextmanager
def for_flag(flag: str, *extra: type[BaseException]):
    """Turn the user errors raised inside the block (see :func:`user_error_types`, plus missing files, ``ValueError``
    and ``extra``) into :class:`UsageError` prefixed by ``flag``. Keep the block narrow: it should only read the
    flag's input, so that a ``ValueError`` there can only mean bad input."""
    kinds = user_error_types()[1:] + (OSError, ValueError) + extra
    try:
        yield
    except UsageError:
        raise
    except kinds as exc:
        raise UsageError(f"{flag}: {one_line(exc)}") from exc
