"""Write a constraints file from ``pip freeze`` output: exact versions, no editable or local-file lines.

    python scripts/write_constraints.py FREEZE OUT

torch's local label (``2.13.0+cpu``) is dropped so the same file serves a CUDA machine (``torch==2.13.0``).
The header of OUT (its leading comment lines) is kept.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path


def main(freeze: str, out: str) -> None:
    rows = []
    for line in Path(freeze).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "-e ")) or " @ " in line:
            continue
        rows.append(re.sub(r"^(torch==[0-9.]+)\+\w+$", r"\1", line))
    old = Path(out).read_text().splitlines() if Path(out).exists() else []
    header = [ln for ln in old[: next((i for i, ln in enumerate(old) if not ln.startswith("#")), len(old))]]
    Path(out).write_text("\n".join(header + sorted(rows, key=str.lower)) + "\n")
    print(f"constraints: {len(rows)} exact versions written to {out}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
