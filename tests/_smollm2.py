"""The real SmolLM2-135M-Instruct for the tests marked ``smollm2``: one de-quantized copy per cache folder
(``$ROUTED_LORA_CACHE`` when set, else ``runs/test-cache`` in the repository, which git ignores), loaded once per
session. The tests are skipped, with the install commands as the reason, when the package is not installed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

NAME = "smollm2-135m"
REPO = Path(__file__).resolve().parents[1]


def test_cache_root() -> Path:
    env = os.environ.get("ROUTED_LORA_CACHE")
    return Path(env) if env else REPO / "runs" / "test-cache"


test_cache_root.__test__ = False  # not a test


def skip_reason() -> str | None:
    """None when the model can be loaded here (the package's file and the loader's dependencies, or a cached
    copy), else why not."""
    from routed_lora import pretrained as pt

    if pt._cache_ok(pt.cache_dir(NAME, test_cache_root())):
        return None
    try:
        pt.find_gguf(NAME)
        pt._check_loader_deps(NAME)
    except pt.MissingPackageError as exc:
        return f"SmolLM2 not available: {exc}"
    return None


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    from routed_lora.pretrained import ensure_cached

    return ensure_cached(NAME, root=test_cache_root())


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    """(model, tokenizer), float32, eval mode, shared by the session: tests must not modify the model (patch a
    deep copy: ``copy.deepcopy(model)``)."""
    import torch

    from routed_lora.env.tokenizer import load_model

    model, tok = load_model(smollm2_dir, dtype=torch.float32)
    return model.eval(), tok
