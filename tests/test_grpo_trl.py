"""routed-lora as the backend of TRL's GRPOTrainer: a tiny routed Qwen2 with its router attached (so it routes by
itself in generate and in TRL's log-prob passes) trains one step on the CPU with a toy reward."""

from __future__ import annotations

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

import routed_lora as rl  # noqa: E402
from routed_lora.testing import tiny_model, tiny_tokenizer  # noqa: E402


def toy_reward(completions, **kwargs):
    """Any random model gets some of these: the number of distinct words, odd or even."""
    return [float(len(set(c.split())) % 2) for c in completions]


@pytest.mark.slow
def test_trl_grpo_trainer_trains_a_routed_model(tmp_path):
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    model = tiny_model("qwen2", vocab_size=len(tok), hidden=32, layers=2)
    router = rl.TagRouter(tok, spans={"tool": ("<search>", "</search>")}, default="reasoning")
    rl.apply_routed_lora(model, target_modules=("q_proj", "v_proj", "up_proj", "down_proj"), r=4, lora_alpha=8,
                         router=router)
    calls = {"n": 0}
    stream = router.stream

    def counting_stream(*a, **k):
        calls["n"] += 1
        return stream(*a, **k)

    router.stream = counting_stream
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    ds = datasets.Dataset.from_list([{"prompt": p} for p in ["who was born in paris ?", "where is rome ?",
                                                               "what is the capital of france ?",
                                                               "who founded the company ?"]] * 2)
    args = trl.GRPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_completion_length=8,
        max_steps=1, learning_rate=1e-2, use_cpu=True, report_to="none", logging_steps=1, save_strategy="no",
        gradient_checkpointing=False, bf16=False, beta=0.0, temperature=1.0, seed=0,
    )
    trainer = trl.GRPOTrainer(model=model, reward_funcs=toy_reward, args=args, train_dataset=ds,
                              processing_class=tok)
    trainer.train()

    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed, "TRL's step changed nothing"
    assert all("lora_" in n for n in changed), f"non-LoRA parameters changed: {sorted(changed)[:5]}"
    assert any(n.endswith("lora_B") for n in changed)
    assert calls["n"] > 0, "the router was never used: the model did not route itself inside TRL"
