"""Question-answer data in the Search-R1 / FlashRAG format: JSONL or parquet rows with ``question`` and
``golden_answers`` (a list of strings; a single string is accepted and wrapped).

Search-R1's parquet files keep the answers under ``reward_model.ground_truth.target`` and the question also
under ``question``; both layouts are read. Other columns are kept as they are.
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
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
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


def _rows_from_jsonl(path: Path) -> list[dict]:
    return [row for _, row in read_jsonl_objects(path)]


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
        rows = _rows_from_parquet(path)
    elif suffix in (".jsonl", ".json"):
        rows = _rows_from_jsonl(path)
    else:
        raise DataError(f"{path}: unknown format {suffix!r}; expected .jsonl or .parquet")
    out = []
    for i, row in enumerate(rows):
        q = row.get("question")
        if not isinstance(q, str) or not q.strip():
            raise DataError(f"{path}: row {i} has no 'question' string (keys: {sorted(row)})")
        golds = _golds(row)
        if not golds:
            raise DataError(f"{path}: row {i} has no 'golden_answers' (list of strings) (keys: {sorted(row)})")
        out.append({**row, "question": q.strip(), "golden_answers": golds})
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise DataError(f"{path}: no rows")
    return out


def make_prompt(question: str, template: str = TINY_PROMPT) -> str:
    """Fill ``template`` (with a ``{question}`` field) for one question."""
    return template.format(question=question)
