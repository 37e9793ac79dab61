"""Question-answer data in the Search-R1 / FlashRAG format: JSONL or parquet rows with ``question`` and
``golden_answers`` (a list of strings; a single string is accepted and wrapped).

veRL-style rows (Search-R1's parquet files, ``nq_search.py``) are read too: answers from
``reward_model.ground_truth.target`` when there is no ``golden_answers``, and, when there is no ``question``,
the question from the first user message of ``prompt`` (``[{"role": "user", "content": ...}]``); a message
built with Search-R1's instruction prompt (:data:`SEARCH_R1_PROMPT`) gives back the bare question, so
``--prompt search-r1`` rebuilds the row's prompt exactly. Other columns are kept as they are.

Errors name the file and the row as editors count: ``train.jsonl:5`` is the fifth line of the file, blank lines
included; a parquet row is ``file.parquet: row 5`` (1-based).
"""

from __future__ import annotations

import json
from pathlib import Path

TINY_PROMPT = "question : {question}\n"
"""The prompt of the built-in world (every word is in the word-level vocabulary)."""

SEARCH_R1_PROMPT = (
    "Answer the given question. You must conduct reasoning inside <think> and </think> first every time you get "
    "new information. After reasoning, if you find you lack some knowledge, you can call a search engine by "
    "<search> query </search> and it will return the top searched results between <information> and "
    "</information>. You can search as many times as your want. If you find no further external knowledge "
    "needed, you can directly provide the answer inside <answer> and </answer>, without detailed illustrations. "
    "For example, <answer> Beijing </answer>. Question: {question}\n"
)
"""Search-R1's instruction prompt, for real instruction-tuned models."""


class DataError(ValueError):
    """A data file is missing, unreadable, or lacks the required fields."""


def _rows_from_parquet(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:  # pragma: no cover - pyarrow is a test dependency
        raise DataError(f"{path}: reading parquet needs pyarrow (pip install 'routed-lora[parquet]')") from exc
    try:
        return pq.read_table(path).to_pylist()
    except Exception as exc:
        raise DataError(f"{path}: not a readable parquet file: {exc}") from exc


def read_jsonl_objects(path: Path, *, error: type[Exception] | None = None, what: str = "") -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file; a line that is not a JSON object raises
    ``error`` (default :class:`DataError`) naming ``what`` (e.g. "corpus "), the file and the line."""
    error = error or DataError
    rows = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):  # 1-based, blank lines counted: the numbers editors show
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a BOM is not data
            except UnicodeDecodeError as exc:
                raise error(f"{what}{path}:{lineno}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise error(f"{what}{path}:{lineno}: invalid JSON: {exc}") from exc
            if not isinstance(row, dict):
                raise error(f"{what}{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append((lineno, row))
    return rows


def _question(row: dict) -> str | None:
    """``question``, else the first user message of a veRL-style ``prompt`` (its Search-R1 instruction removed)."""
    q = row.get("question")
    if q is not None:
        return q if isinstance(q, str) else None
    msgs = row.get("prompt")
    if isinstance(msgs, dict):  # one message
        msgs = [msgs]
    if not isinstance(msgs, (list, tuple)):
        return None
    for m in msgs:
        if isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), str):
            return strip_template(m["content"], SEARCH_R1_PROMPT)
    return None


def strip_template(text: str, template: str) -> str:
    """The ``{question}`` of ``template`` when ``text`` is ``template`` filled in, else ``text`` unchanged."""
    head, sep, tail = template.partition("{question}")
    if sep and text.startswith(head) and text.endswith(tail) and len(text) >= len(head) + len(tail):
        return text[len(head):len(text) - len(tail)]
    return text


def _golds(row: dict) -> list[str] | None:
    g = row.get("golden_answers")
    if g is None:
        rm = row.get("reward_model")
        if isinstance(rm, dict):
            gt = rm.get("ground_truth")
            g = gt.get("target") if isinstance(gt, dict) else gt
    if g is None:
        return None
    if isinstance(g, str):
        return [g]
    try:
        return [str(x) for x in g]
    except TypeError:
        return None


def load_qa(path: str | Path, limit: int | None = None) -> list[dict]:
    """Load QA rows from ``.jsonl`` / ``.json`` (one object per line) or ``.parquet``.

    Every returned row has ``question`` (str) and ``golden_answers`` (list[str]); other fields are kept. Raises
    :class:`DataError` naming the file and row when something is missing."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path}: is a directory; pass a .jsonl or .parquet file")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        rows = [(f"{path}: row {i}", row) for i, row in enumerate(_rows_from_parquet(path), 1)]
    elif suffix in (".jsonl", ".json"):
        rows = [(f"{path}:{lineno}", row) for lineno, row in read_jsonl_objects(path)]
    else:
        raise DataError(f"{path}: unknown format {suffix!r}; expected .jsonl or .parquet")
    out = []
    for where, row in rows:
        q = _question(row)
        if not isinstance(q, str) or not q.strip():
            raise DataError(f"{where}: no 'question' string, nor a user message in 'prompt' (keys: {sorted(row)})")
        golds = _golds(row)
        if not golds:
            raise DataError(f"{where}: no 'golden_answers' (list of strings), nor reward_model.ground_truth.target "
                            f"(keys: {sorted(row)})")
        out.append({**row, "question": q.strip(), "golden_answers": golds})
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise DataError(f"{path}: no rows")
    return out


def make_prompt(question: str, template: str = TINY_PROMPT) -> str:
    """Fill ``template`` (with a ``{question}`` field) for one question."""
    return template.format(question=question)
