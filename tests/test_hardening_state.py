"""Issue 14, item 2: nothing lost, nothing mixed. Metrics rows are fsync'd and a torn last row is dropped on
resume; small files are replaced atomically; temporaries of a killed writer are cleaned up (an old adapter set
set aside mid-swap is put back); ``save_adapters`` into an existing folder swaps the whole set, so a failure at
any point leaves the old set loading with its old tensors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from routed_lora import state

DEAD_PID = 99999999  # above Linux's pid_max (2**22): never a running process


def _dead_pid() -> int:
    """A pid that was real and has exited (more honest than an impossible one)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ------------------------------------------------------------------------------------------------ metrics rows


def test_metrics_rows_are_fsynced(tmp_path, monkeypatch):
    from routed_lora.grpo.trainer import MetricsWriter

    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    w = MetricsWriter(tmp_path / "metrics.jsonl")
    for step in (1, 2, 3):
        w.write({"step": step, "x": 0.5})
    assert len(synced) >= 3, "each metrics row must be fsync'd"
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


@pytest.mark.parametrize("tail", [b'{"step": 3, "reward_mean": 0.', b'{"st', b"\xe2\x82"])
def test_resume_drops_a_torn_last_row_with_a_warning(tmp_path, tail):
    from routed_lora.grpo.trainer import MetricsWriter

    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1}\n\n{"eval": "before", "step": 1}\n{"step": 2}\n' + tail)
    with pytest.warns(UserWarning, match=r"metrics.jsonl:5: dropped a truncated last line"):
        w = MetricsWriter(path, resume_step=2)
    w.write({"step": 3})
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 1, 2, 3]
    # rows after the resumed step go too (a kill after the row, before the checkpoint)
    MetricsWriter(path, resume_step=1)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 1]


def test_a_bad_row_elsewhere_is_an_error_naming_the_line(tmp_path):
    from routed_lora.grpo.trainer import MetricsWriter

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n\n{"step": oops}\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:3: not a JSON row"):
        MetricsWriter(path, resume_step=2)
    # a complete last row without its newline is kept
    path.write_text('{"step": 1}\n{"step": 2}')
    MetricsWriter(path, resume_step=5).write({"step": 3})
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3]


# ------------------------------------------------------------------------------------------------ atomic files


def test_atomic_write_keeps_the_old_file_on_a_failure(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    state.atomic_write_text(path, '{"lr": 0.001}\n')

    def boom(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        state.atomic_write_text(path, '{"lr": 0.002, "long": "' + "x" * 10000 + '"}\n')
    assert path.read_text() == '{"lr": 0.001}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_stale_temporaries_are_removed_and_a_set_aside_folder_restored(tmp_path):
    dead = _dead_pid()
    (tmp_path / f"checkpoint.pt.tmp{dead}").write_bytes(b"partial")
    (tmp_path / f"config.json.tmp{DEAD_PID}").write_text("{")
    (tmp_path / f"adapters.tmp{dead}-0a1b2c3d").mkdir()
    (tmp_path / f"adapters.tmp{dead}-0a1b2c3d" / "x").write_text("half")
    kept_alive = tmp_path / f"checkpoint.pt.tmp{os.getppid()}"  # a live writer's temporary stays
    kept_alive.write_bytes(b"in use")
    mine = tmp_path / "notes.tmp1"  # not one of the run's names: never touched
    mine.write_text("user file")
    old = tmp_path / f"adapters.old{dead}-deadbeef"  # a kill between the two renames of a swap
    old.mkdir()
    (old / "routed_lora.json").write_text("{}")
    removed = state.remove_stale_temporaries(
        tmp_path, names=("checkpoint.pt", "config.json", "metrics.jsonl", "adapters"))
    assert len(removed) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["adapters", kept_alive.name, mine.name])
    assert (tmp_path / "adapters" / "routed_lora.json").read_text() == "{}"


def test_trainer_start_removes_stale_checkpoint_temporaries(tmp_path):
    """Trainer.train cleans its --out before doing anything (the CLI resume test covers a real run)."""
    from routed_lora.grpo import trainer as T

    stale = tmp_path / f"checkpoint.pt.tmp{DEAD_PID}"
    stale.write_bytes(b"partial")

    class Stop(Exception):
        pass

    tr = T.Trainer.__new__(T.Trainer)  # only the start of train() runs: it stops at the first resume check
    tr.cfg, tr.rank, tr.out = T.GRPOConfig(), 0, tmp_path
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        tr.train(resume=True)
    assert not stale.exists()


# ------------------------------------------------------------------------------------------------ adapter sets


@pytest.fixture
def two_sets():
    pytest.importorskip("transformers")
    from test_adapter_io import _patched

    return _patched(lora_seed=1), _patched(lora_seed=2)


def _lora(model):
    from routed_lora.hf import routed_layers

    return {n: (l.lora_A.detach().clone(), l.lora_B.detach().clone()) for n, l in routed_layers(model)}


def _loaded(path):
    import routed_lora as rl
    from test_adapter_io import _patched

    m = _patched(lora_seed=9)
    rl.load_adapters(m, path)
    return _lora(m)


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(x, y) for k in a for x, y in zip(a[k], b[k]))


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_save_over_an_existing_set_is_all_or_nothing(tmp_path, monkeypatch, two_sets, exchange):
    """A failure injected at each rename the save makes in turn (each file of the new set, then the swap): the
    folder then loads with the OLD tensors exactly, never a mix; with no failure left, with the new ones."""
    import routed_lora as rl

    old_model, new_model = two_sets
    want_old, want_new = _lora(old_model), _lora(new_model)
    assert not _equal(want_old, want_new)
    real_replace, real_rename, real_exchange = os.replace, os.rename, state._rename_exchange
    n_fail = 0
    for k in range(1, 40):
        path = tmp_path / f"set{k}" / "adapters"
        rl.save_adapters(old_model, path)
        calls = [0]

        def step():
            calls[0] += 1
            if calls[0] == k:
                raise OSError(f"injected failure at rename {k}")

        with monkeypatch.context() as m:
            m.setattr(os, "replace", lambda a, b: (step(), real_replace(a, b))[1])
            m.setattr(os, "rename", lambda a, b: (step(), real_rename(a, b))[1])
            m.setattr(state, "_rename_exchange",
                      (lambda a, b: (step(), real_exchange(a, b))[1]) if exchange else (lambda a, b: False))
            try:
                rl.save_adapters(new_model, path)
                failed = False
            except OSError as exc:
                assert "injected" in str(exc)
                failed = True
        got = _loaded(path)
        if not failed:
            assert _equal(got, want_new), f"no failure (k={k}) but the new set was not saved"
            break
        n_fail += 1
        assert _equal(got, want_old), f"failure at rename {k}: the folder no longer holds the old set"
        assert sorted(p.name for p in path.parent.iterdir()) == ["adapters"], "temporaries left behind"
    assert n_fail >= 5, f"the save made only {n_fail} renames"


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_two_writers_racing_for_a_new_folder_both_finish(tmp_path, monkeypatch, two_sets, exchange):
    """Another process saves to the same new folder between this save's existence check and its rename (every
    DDP rank saving to one path): the rename fails with ENOTEMPTY and the save replaces their set as over an
    existing one; the folder then holds one whole set, the last writer's."""
    import routed_lora as rl

    old_model, new_model = two_sets
    path = tmp_path / "sets" / "adapters"
    rl.save_adapters(old_model, tmp_path / "theirs")  # the other process's finished set
    real_rename = os.rename
    raced = []

    def rename(a, b):
        if str(b) == str(path) and not raced:  # the other writer's rename lands first
            raced.append(1)
            real_rename(tmp_path / "theirs", path)
        return real_rename(a, b)

    with monkeypatch.context() as m:
        m.setattr(os, "rename", rename)
        if not exchange:
            m.setattr(state, "_rename_exchange", lambda a, b: False)
        rl.save_adapters(new_model, path)
    assert raced
    assert _equal(_loaded(path), _lora(new_model))
    assert sorted(p.name for p in path.parent.iterdir()) == ["adapters"], "temporaries left behind"


def test_killed_save_leaves_the_old_set_loading(tmp_path, monkeypatch, two_sets):
    """A kill (no clean-up runs) while the new set is written: the old set loads unchanged, and the next save
    clears the leftover temporary."""
    import routed_lora as rl
    from routed_lora import adapter_io

    old_model, new_model = two_sets
    path = tmp_path / "adapters"
    rl.save_adapters(old_model, path)
    real = adapter_io._atomic_write_bytes
    n = [0]

    def killed(p, data):
        n[0] += 1
        if n[0] == 3:
            raise KeyboardInterrupt  # stands for SIGKILL: no exception handler of ours may rescue the state
        real(p, data)

    monkeypatch.setattr(adapter_io, "_atomic_write_bytes", killed)
    monkeypatch.setattr(adapter_io.shutil, "rmtree", lambda *a, **k: None)  # a killed process cleans nothing
    with pytest.raises(KeyboardInterrupt):
        rl.save_adapters(new_model, path)
    monkeypatch.undo()
    assert any(".tmp" in p.name for p in tmp_path.iterdir()), "the simulated kill left no temporary"
    assert _equal(_loaded(path), _lora(old_model))
    rl.save_adapters(new_model, path)
    assert _equal(_loaded(path), _lora(new_model))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapters"]


def test_save_refuses_a_folder_with_other_files(tmp_path, two_sets):
    import routed_lora as rl

    old_model, _ = two_sets
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(FileExistsError, match="other files than an adapter set"):
        rl.save_adapters(old_model, tmp_path)
    assert (tmp_path / "metrics.jsonl").read_text() == "{}\n"
