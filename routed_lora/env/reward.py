"""Rewards for search-augmented QA: exact match on the last ``<answer>``, as in Search-R1 / FlashRAG.

``normalize_answer`` lowercases, removes punctuation, removes the articles a / an / the, and collapses whitespace.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable

_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lowercase, strip punctuation and the articles a / an / the, collapse whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES_RE.sub(" ", s)
    return " ".join(s.split())


def extract_answer(text: str) -> str | None:
    """The content of the last complete ``<answer>...</answer>`` in ``text``, stripped; ``None`` if there is none."""
    found = _ANSWER_RE.findall(text)
    if not found:
        return None
    return found[-1].strip()


def exact_match(pred: str | None, golds: str | Iterable[str]) -> float:
    """1.0 if the normalised prediction equals any normalised gold answer, else 0.0 (``None`` scores 0)."""
    if pred is None:
        return 0.0
    if isinstance(golds, str):
        golds = [golds]
    p = normalize_answer(pred)
    return float(any(p == normalize_answer(g) for g in golds))


_TAG_RE = re.compile(r"</?(think|search|information|answer)>")


def format_ok(text: str) -> bool:
    """True when ``text`` follows the tag protocol: tags open and close in order without nesting, every
    ``<search>`` is followed by an ``<information>`` block (except possibly a last unanswered one), and the text
    ends with exactly one ``<answer>...</answer>`` block after which nothing but whitespace follows."""
    open_tag = None
    last_closed = None
    n_answers = 0
    for m in _TAG_RE.finditer(text):
        tag = m.group(0)
        name = m.group(1)
        if tag.startswith("</"):
            if open_tag != name:
                return False
            open_tag = None
            last_closed = name
            if name == "answer":
                n_answers += 1
        else:
            if open_tag is not None:
                return False
            if name == "information" and last_closed != "search":
                return False
            if last_closed == "search" and name != "information":
                return False
            open_tag = name
    if open_tag is not None or n_answers != 1 or last_closed != "answer":
        return False
    return text[text.rindex("</answer>") + len("</answer>"):].strip() == ""


def compute_score(text: str, golds: str | Iterable[str], *, format_score: float = 0.0, score: float = 1.0) -> float:
    """``score`` for an exact match of the last answer; otherwise ``format_score`` if :func:`format_ok`, else 0.

    With ``format_score = 0`` (the default) this is plain exact match."""
    if exact_match(extract_answer(text), golds):
        return score
    if format_score and format_ok(text):
        return format_score
    return 0.0
