"""Where the trainer assembles the loss mask (``Trainer.collect``), with rollouts that really search (issue 23,
item 7): the tiny untrained model never emits ``<search>``, so a scripted logits processor makes it write
``<search> question </search>``, the real agent loop splices the retrieved ``<information>`` block in, then it
writes ``<answer> word </answer>``. The expected mask is computed from the token ids alone (independently of
``collate`` and of the rollout's ``info_mask``): every completion token is sampled except the spliced block,
``<information>`` ... ``</information>`` inclusive, and that block carries no loss weight."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("bm25s")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from routed_lora.testing import tiny_world

    return tiny_world(tmp_path_factory.mktemp("world"), layers=2)


class Script:
    """Forces, per row, from the ids seen so far: ``<search>`` + the question's words + ``</search>``; after the
    ``</information>`` the loop spliced in, ``<answer>`` + the question's last word + ``</answer>``."""

    def __init__(self, tok):
        ids = tok.convert_tokens_to_ids
        self.pad = tok.pad_token_id
        self.colon = ids(":")
        self.s, self.se, self.ie = ids("<search>"), ids("</search>"), ids("</information>")
        self.a, self.ae = ids("<answer>"), ids("</answer>")
        self.calls = 0

    def next_id(self, seq: list[int]) -> int:
        question = seq[seq.index(self.colon) + 1:]
        if self.s in seq:
            question = question[:question.index(self.s)]
        if self.ie in seq:  # the search is done: answer
            after = seq[len(seq) - seq[::-1].index(self.ie):]
            return [self.a, question[-2], self.ae][len(after)]
        if self.s not in seq:
            return self.s
        query = seq[seq.index(self.s) + 1:]
        return question[len(query)] if len(query) < len(question) else self.se

    def __call__(self, ids, scores):
        self.calls += 1
        forced = torch.full_like(scores, float("-inf"))
        for b in range(ids.shape[0]):
            seq = [t for t in ids[b].tolist() if t != self.pad]
            forced[b, self.next_id(seq)] = 0.0
        return forced


def _trainer(world, out, **kw):
    from routed_lora.env.data import load_qa
    from routed_lora.env.retriever import BM25Retriever
    from routed_lora.grpo.trainer import GRPOConfig, Trainer, build_policy, load_model_and_tokenizer

    cfg = GRPOConfig(**{**dict(steps=1, prompts_per_step=2, group_size=2, max_turns=2, max_new_tokens=24,
                                max_total_tokens=160, topk=2, lr=1e-3, beta=0.01, mini_batches=1,
                                micro_batch_size=8, target_modules=("q_proj", "v_proj")), **kw}).check()
    torch.manual_seed(0)
    model, tok = load_model_and_tokenizer(world / "model")
    model, router = build_policy(model, tok, cfg)
    rows = load_qa(world / "train.jsonl")
    return Trainer(cfg, model, tok, router, BM25Retriever(world / "corpus.jsonl"), rows, out=out,
                   progress=False), rows


def _expected_mask(tok, ids, att, prompt_lens) -> torch.Tensor:
    """(B, L-1): target t+1 was sampled by the policy: after the prompt, real, outside <information>...</...>."""
    open_, close = tok.convert_tokens_to_ids("<information>"), tok.convert_tokens_to_ids("</information>")
    B, L = ids.shape
    want = torch.zeros(B, L, dtype=torch.bool)
    for b in range(B):
        inside = False
        for t in range(int(prompt_lens[b]), int(att[b].sum())):
            tid = int(ids[b, t])
            if tid == open_:
                inside = True
            want[b, t] = not inside
            if tid == close:
                inside = False
    return want[:, 1:]


@pytest.mark.parametrize("loss_on", ["all", "tool"])
def test_collect_gives_information_tokens_no_loss_weight(world, tmp_path, monkeypatch, loss_on):
    from routed_lora.env import rollout
    from routed_lora.env.data import make_prompt
    from routed_lora.grpo.trainer import grpo_update

    tr, rows = _trainer(world, tmp_path, loss_on=loss_on)
    script = Script(tr.tok)
    real = rollout.generate_rollouts

    def scripted(*a, **k):
        return real(*a, **{**k, "generation_kwargs": {"logits_processor": [script]}})

    monkeypatch.setattr(rollout, "generate_rollouts", scripted)  # Trainer.collect imports it at call time
    batch, routes, info = tr.collect(rows[:2])
    assert script.calls > 0
    ids, att = batch.input_ids, batch.attention_mask
    # the rollouts really searched and got passages back
    assert batch.tool_calls.tolist() == [1.0] * 4 and info["finish_answer"] == 1.0
    info_open = tr.tok.convert_tokens_to_ids("<information>")
    info_close = tr.tok.convert_tokens_to_ids("</information>")
    for b in range(len(batch)):
        row = ids[b].tolist()
        assert row.count(info_open) == 1 and row.index(info_close) - row.index(info_open) > 3, batch.texts[b]
    prompt_lens = [len(tr.tok(make_prompt(r["question"], tr.template))["input_ids"]) for r in rows[:2]
                   for _ in range(tr.cfg.group_size)]
    want = _expected_mask(tr.tok, ids, att, prompt_lens)
    n_info = int((att[:, 1:].bool() & ~want).sum()) - sum(p - 1 for p in prompt_lens)
    assert n_info >= 4 * 5  # the spliced blocks are in the batch, unmasked by nothing else
    if loss_on == "tool":  # only the tokens written inside <search> ... </search>: the query and </search>
        from routed_lora.grpo.trainer import role_mask

        want = want & role_mask(tr.tok, ids, att, "tool")
    got = batch.loss_mask
    wrong = (got != want).nonzero().tolist()
    assert not wrong, f"loss mask differs at (row, target) {wrong[:6]}: {batch.texts[wrong[0][0]]!r}"
    # what the update weighs: its token counts are exactly the sampled tokens, none of the spliced block
    tr.model.train()
    m = grpo_update(tr.model, tr.ddp_model, tr.optimizer, batch, routes, tr.cfg)
    counted = m["tokens/reasoning"] + m["tokens/tool"] + m["tokens/backbone"]
    assert counted == float(want.sum()), (counted, float(want.sum()))
    assert m["ratio_mean"] == pytest.approx(1.0) and m["rollouts"] == 4
