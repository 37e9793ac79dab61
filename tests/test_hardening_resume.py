"""Issue 23, defects 1 and 2: every error on the ``train --resume`` path is a user error (one line
``routed-lora: error: --resume: ...``, exit status 2, no traceback) found *before* anything in ``--out`` is
written: a checkpoint written by another number of processes, a malformed ``metrics.jsonl`` row, a checkpoint that
is not one of ours or whose adapters do not fit the model. Each case runs on a copy of one finished run and checks
that every file of the copy is byte-identical afterwards."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("bm25s")


def _argv(world: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(world / "model"), "--data", str(world / "train.jsonl"), "--retriever",
            f"bm25:{world / 'corpus.jsonl'}", "--out", str(out), "--no-progress", "--target-modules", "q_proj",
            "--prompts-per-step", "2", "-G", "2", "--max-turns", "1", "--max-new-tokens", "4",
            "--max-total-tokens", "24", "--lr", "1e-3", "--save-every", "1", "--threads", "1", *extra]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny world and a finished 1-step run in it (checkpoint.pt, config.json, metrics.jsonl, adapters/)."""
    from routed_lora.cli import main
    from routed_lora.testing import tiny_world

    root = tmp_path_factory.mktemp("resume")
    world = tiny_world(root / "world", layers=2)
    out = root / "run"
    assert main(_argv(world, out, "--steps", "1", "--no-eval-before")) == 0
    # a metrics file with several rows, as a longer run leaves (the malformed row goes in the middle)
    rows = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join(rows * 4) + "\n")
    return world, out


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _resume_fails(world: Path, out: Path, capsys, *pieces: str, extra=()) -> str:
    """Resume ``out`` (3 steps): exit status 2, one line naming every piece, and no file of ``out`` changed."""
    from routed_lora.cli import main

    before = _files(out)
    capsys.readouterr()
    assert main(_argv(world, out, "--steps", "3", "--resume", "--no-eval-before", *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("routed-lora: error: --resume: "), err
    for piece in pieces:
        assert piece in err[0], (piece, err[0])
    after = _files(out)
    assert after.keys() == before.keys(), sorted(set(after) ^ set(before))
    changed = [k for k in before if after[k] != before[k]]
    assert not changed, f"written before the error: {changed}"
    return err[0]


def _copy(run, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run[1], out)
    return out


def _edit_checkpoint(out: Path, edit) -> None:
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    state = edit(state)
    torch.save(state, out / "checkpoint.pt")


def test_checkpoint_of_two_ranks_resumed_by_one_process(run, tmp_path, capsys):
    """Defect 1: a checkpoint written by 2 DDP ranks (one RNG state per rank) resumed in one process."""
    out = _copy(run, tmp_path)

    def two_ranks(state):
        state["rng"] = [state["rng"][0], state["rng"][0]]
        return state

    _edit_checkpoint(out, two_ranks)
    _resume_fails(run[0], out, capsys, "written by 2 processes", "this run has 1", "torchrun --nproc-per-node 2")


def test_malformed_metrics_row_in_the_middle(run, tmp_path, capsys):
    """Defect 2: a row that is not JSON in the middle of metrics.jsonl (a truncated *last* row is dropped with a
    warning instead: test_hardening_cli)."""
    out = _copy(run, tmp_path)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][: len(lines[1]) // 2]
    (out / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    _resume_fails(run[0], out, capsys, "metrics.jsonl:2: not a JSON row")


@pytest.mark.parametrize("row,piece", [('[1, 2]', "metrics.jsonl:3: expected a JSON object"),
                                       ('{"step": "two"}', "metrics.jsonl:3: 'step' is not a number")])
def test_metrics_rows_that_are_not_metrics(run, tmp_path, capsys, row, piece):
    out = _copy(run, tmp_path)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    lines[2] = row
    (out / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    _resume_fails(run[0], out, capsys, piece)


def test_metrics_path_is_a_folder(run, tmp_path, capsys):
    out = _copy(run, tmp_path)
    (out / "metrics.jsonl").unlink()
    (out / "metrics.jsonl").mkdir()
    _resume_fails(run[0], out, capsys, "metrics.jsonl")


@pytest.mark.parametrize("kind", ["not_a_dict", "no_rng", "no_adapters", "no_optimizer", "no_step"])
def test_checkpoint_that_is_not_a_training_checkpoint(run, tmp_path, capsys, kind):
    out = _copy(run, tmp_path)

    def edit(state):
        if kind == "not_a_dict":
            return torch.zeros(3)
        state.pop(kind[3:])
        return state

    _edit_checkpoint(out, edit)
    _resume_fails(run[0], out, capsys, "checkpoint.pt", "not a training checkpoint")


def test_checkpoint_adapters_that_do_not_fit_the_model(run, tmp_path, capsys):
    """Adapters of other modules or another shape than the model the run builds (a checkpoint edited or
    copied from another run whose config says the same)."""
    out = _copy(run, tmp_path)

    def rename(state):
        k = sorted(state["adapters"])[0]
        state["adapters"][k.replace("q_proj", "k_proj")] = state["adapters"].pop(k)
        return state

    _edit_checkpoint(out, rename)
    _resume_fails(run[0], out, capsys, "adapters do not fit the model", "k_proj")

    out2 = tmp_path / "run2"
    shutil.copytree(run[1], out2)

    def reshape(state):
        k = sorted(state["adapters"])[0]
        state["adapters"][k] = state["adapters"][k][..., :-1]
        return state

    _edit_checkpoint(out2, reshape)
    _resume_fails(run[0], out2, capsys, "adapters do not fit the model", "shape")


def test_a_good_checkpoint_still_resumes(run, tmp_path, capsys):
    """The checks refuse nothing a real run left: resuming the unchanged copy continues to step 3."""
    from routed_lora.cli import main

    out = _copy(run, tmp_path)
    assert main(_argv(run[0], out, "--steps", "3", "--resume", "--no-eval-before")) == 0
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 3
