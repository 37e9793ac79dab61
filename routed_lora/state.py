"""Run state on disk that survives a kill at any moment: atomic small files, append-only metrics, stale
temporaries, and the settings a resumed run must share with its checkpoint.

- :func:`atomic_write_bytes` / :func:`atomic_write_text`: write ``NAME.tmp<pid>`` beside the target, flush and
  fsync it, ``os.replace`` it over the target, fsync the folder. A reader sees the old file or the new one,
  never a part.
- :func:`append_line`: one JSONL row appended with flush and fsync (a kill loses at most the row being written,
  and leaves at most a truncated last line).
- :func:`read_jsonl_rows`: the rows of such a file; a truncated *last* line (no newline, not valid JSON) is
  dropped with a warning, a bad line elsewhere is an error naming ``file:line``.
- :func:`swap_folder`: a complete new folder replaces an old one by rename (atomic exchange on Linux).
- :func:`remove_stale_temporaries`: deletes the ``*.tmp<pid>`` files and folders that a killed writer left (the
  pid is no longer running, or is this process).
- :func:`setting_differences`: what differs between the settings saved with a checkpoint and the new ones.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import warnings
from pathlib import Path

__all__ = ["atomic_write_bytes", "atomic_write_text", "append_line", "read_jsonl_rows", "tmp_name",
           "remove_stale_temporaries", "swap_folder", "setting_differences", "NOT_RUN_CHANGING"]

# "<name>.tmp<pid>" or "<name>.tmp<pid>-<hex>" (several temporaries of one process), as written by this package
_TMP_RE = re.compile(r"\.(?:tmp|old)(\d+)(?:-[0-9a-f]+)?$")


def tmp_name(path: Path, tag: str = "tmp", unique: str | None = None) -> Path:
    """``path`` + ``.tmp<pid>`` (+ ``-unique``): the name of a temporary beside ``path``."""
    path = Path(path)
    return path.with_name(f"{path.name}.{tag}{os.getpid()}" + (f"-{unique}" if unique else ""))


def fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    tmp = tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append ``line`` + newline with one write, then flush and fsync."""
    with open(path, "ab") as f:
        f.write((line + "\n").encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


def read_jsonl_rows(path: str | os.PathLike, *, what: str = "") -> tuple[list[dict], bool]:
    """``(rows, dropped)``: the JSON objects of ``path`` and whether a truncated last line was dropped (with a
    warning). A line that is not JSON anywhere else raises ``ValueError`` naming ``path:line`` (1-based)."""
    path = Path(path)
    data = path.read_bytes()
    lines = data.split(b"\n")
    complete = data.endswith(b"\n") or not data
    rows, dropped = [], False
    for i, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        last = i == len(lines) and not complete
        try:
            row = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            if last:  # the row a kill interrupted
                warnings.warn(f"{what}{path}:{i}: dropped a truncated last line ({len(raw)} bytes, no newline): "
                              "the run was stopped while writing it", stacklevel=2)
                dropped = True
                continue
            raise ValueError(f"{what}{path}:{i}: not a JSON row ({exc})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{what}{path}:{i}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows, dropped


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftover from an earlier failed write: no writer is using it now
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's process)
    return True


def remove_stale_temporaries(folder: str | os.PathLike, names: tuple[str, ...] | None = None) -> list[Path]:
    """Clean up after a killed writer in ``folder``: delete each ``NAME.tmp<pid>[-hex]`` whose pid is gone, and
    move each ``NAME.old<pid>[-hex]`` (a folder set aside during a swap, :func:`swap_folder`) back to ``NAME``
    when ``NAME`` is missing (a kill between the two renames), else delete it. Only entries whose ``NAME`` is in
    ``names`` are touched when ``names`` is given. Returns the entries removed or restored."""
    folder = Path(folder)
    done: list[Path] = []
    if not folder.is_dir():
        return done
    for p in sorted(folder.iterdir()):
        m = _TMP_RE.search(p.name)
        if not m or _pid_alive(int(m.group(1))):
            continue
        base = p.name[:m.start()]
        if names is not None and base not in names:
            continue
        target = p.with_name(base)
        if p.name[m.start():].startswith(".old") and not target.exists() and not target.is_symlink():
            os.rename(p, target)  # the only copy of the old set: put it back
        elif p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        done.append(p)
    return done


def _rename_exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def swap_folder(new: Path, path: Path) -> None:
    """Make the complete folder ``new`` appear at ``path``; readers see the old folder or the new one, whole.

    A new ``path`` is one rename. An existing one is exchanged with ``new`` atomically where the OS can
    (``renameat2`` on Linux), else set aside as ``path.old<pid>-hex`` and replaced by a second rename (a kill in
    between leaves the old set there, and :func:`remove_stale_temporaries` puts it back). The old set is then
    deleted."""
    new, path = Path(new), Path(path)
    if not path.exists():
        try:
            os.rename(new, path)
            fsync_dir(path.parent)
            return
        except OSError as exc:
            # another writer made ``path`` between the check and the rename (two processes saving to one
            # folder, e.g. every DDP rank): replace theirs as below, the last writer's set wins, whole
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not path.exists():
                raise
    if _rename_exchange(new, path):
        shutil.rmtree(new, ignore_errors=True)  # ``new`` now holds the old set
    else:
        import uuid

        old = tmp_name(path, "old", uuid.uuid4().hex[:8])
        os.rename(path, old)
        try:
            os.rename(new, path)
        except BaseException:
            os.rename(old, path)
            raise
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(path.parent)


# GRPOConfig fields that do not change what a resumed run computes: how long it runs, how often it saves or
# logs, and held-out evaluation (run under torch.random.fork_rng, so it leaves the training RNG alone)
NOT_RUN_CHANGING = frozenset({"steps", "save_every", "eval_every", "log_every"})


def setting_differences(saved: dict, current: dict, *, ignore=NOT_RUN_CHANGING) -> list[tuple[str, object, object]]:
    """``[(name, saved value, current value)]`` for every setting recorded in both dicts whose values differ,
    except those in ``ignore`` (a checkpoint written before a setting existed is compared on the ones it has)."""
    out = []
    for key in sorted(set(saved) & set(current) - set(ignore)):
        a, b = saved[key], current[key]
        if isinstance(a, tuple):
            a = list(a)
        if isinstance(b, tuple):
            b = list(b)
        if a != b:
            out.append((key, saved[key], current[key]))
    return out
