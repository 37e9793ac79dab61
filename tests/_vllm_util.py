"""Shared set-up of the vLLM tests (tests/test_vllm*.py): vLLM's CPU settings, a tiny routed model saved as a
model folder plus a save_adapters folder, the HF teacher-forced reference, and engine shutdown (one LLM per
pytest process at a time)."""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path

import torch

CPU_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "0-1",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # engine core in this process: faster start, one process
}


def set_cpu_env(trace: Path | None = None) -> None:
    for k, v in CPU_ENV.items():
        os.environ.setdefault(k, v)
    if trace is not None:
        os.environ["ROUTED_LORA_VLLM_TRACE"] = str(trace)


def randomize_adapters(model, seed: int, scale: float = 0.15) -> None:
    """Non-zero A and B for every adapter, so each adapter changes the logits (a fresh LoRA has B = 0)."""
    from routed_lora.hf import routed_layers

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in routed_layers(model):
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * scale)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * scale)


def build_tiny(out: Path, *, seed: int = 0):
    """A tiny Qwen2 (hidden 64, head_dim 32: vLLM's CPU attention wants head sizes it has kernels for) with the
    tiny tokenizer (Search-R1 tags as single tokens) in ``out/model``; routed adapters (reasoning, tool) with
    random weights on it, saved to ``out/adapters``. Returns (model, tokenizer, router)."""
    import routed_lora as rl
    from routed_lora.testing import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_model("qwen2", vocab_size=len(tok), hidden=64, layers=2, seed=seed, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=32)
    model.save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    router = rl.TagRouter(tok, default="reasoning")
    rl.apply_routed_lora(model, r=8, lora_alpha=16, router=router)
    randomize_adapters(model, seed + 1)
    rl.save_adapters(model, out / "adapters")
    return model, tok, router


def hf_logprobs(model, ids: list[int], routes: list[int]) -> torch.Tensor:
    """Teacher-forced log_softmax(logits)[next token] of every position but the last, with the given routes."""
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = model(input_ids=x, routes=torch.tensor([routes])).logits.float()
    return torch.log_softmax(logits[0, :-1], -1).gather(-1, x[0, 1:, None])[:, 0]


def read_trace(path: Path) -> dict[str, dict[int, int]]:
    """Worker trace -> {request id: {position: route}} (later steps overwrite, e.g. after a preemption)."""
    out: dict[str, dict[int, int]] = {}
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        for row in json.loads(line)["rows"]:
            d = out.setdefault(row["req"], {})
            for k, r in enumerate(row["routes"]):
                d[row["start"] + k] = r
    return out


def shutdown(llm) -> None:
    """Stop an in-process engine so the next test module can build another one."""
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # noqa: BLE001
        pass
    del llm
    gc.collect()
    try:
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        destroy_model_parallel()
        destroy_distributed_environment()
    except Exception:  # noqa: BLE001
        pass
