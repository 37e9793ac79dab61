"""The agent loop: batched generation with the search tool, used by the SFT evaluation and by the GRPO loop.

One call, :func:`generate_rollouts`, runs up to ``max_turns`` tool calls for a batch of prompts:

1. all unfinished rows are left-padded into one batch and ``model.generate`` (KV cache) samples until each row
   emits ``</search>`` or ``</answer>`` (or eos, or ``max_new_tokens``); each row is cut at its first stop token;
2. a row that stopped at ``</search>`` has its query (the text between its last ``<search>`` and ``</search>``)
   sent to the retriever, all rows in one ``retriever.search`` call;
3. the passages are appended as token ids, ``<information> ... </information>``, built by
   :func:`information_ids` (only the passages are tokenised; the sampled ids are kept as they are, the transcript
   is never re-tokenised), and marked in ``info_mask``;
4. repeat until every row has answered, or used ``max_turns`` searches and asked for another, or hit a limit.

Contract for the GRPO loop (the signature and these fields are stable):

- ``prompts`` is a list of strings (encoded with ``tokenizer(p)``) or of token-id lists (e.g. from a chat
  template). For G samples per prompt, repeat each prompt G times; the group id is the caller's business.
- Each :class:`Rollout` holds ``prompt_ids``, ``completion_ids`` (sampled tokens and spliced information blocks,
  in order), ``info_mask`` (1 on spliced tokens, same length as ``completion_ids``), ``num_tool_calls``,
  ``text`` (decoded completion with the tags kept, :func:`completion_text`; the reward input), ``finish_reason`` and the ``queries`` sent.
- ``return_logprobs=True`` fills ``Rollout.logprobs``: for each sampled completion token,
  ``log_softmax(logits / temperature)`` at the sampled id, from the raw logits of the generation step
  (``output_logits``; 0.0 on information tokens). With ``do_sample=True`` the sampler draws from exactly that
  distribution (``top_k=0``, ``top_p=1.0`` unless overridden). These come from the KV-cache path, so they can
  differ from a teacher-forced forward by float rounding; for a ratio of exactly 1 on the first update, recompute
  old log-probs with the same teacher-forced forward used for training (:func:`collate` gives the tensors).
- Routing: a model whose router is attached (``routed_lora.hf``) routes itself during ``generate``; nothing here
  needs to know. ``route_fn(ids) -> routes`` (optional) is called on each finished ``prompt_ids +
  completion_ids`` and its result stored in ``Rollout.routes`` (one int per token), so rollout and training can
  be checked to use the same routes.
- :func:`collate` turns rollouts into right-padded tensors for a teacher-forced pass: ``input_ids``,
  ``attention_mask``, ``loss_mask`` (1 on sampled completion tokens only: not prompt, not information, not
  padding), ``info_mask``, ``old_logprobs`` and ``routes`` (-1 on padding), all ``(B, T)`` and aligned with
  ``input_ids`` (the log-prob of token t is predicted by the logits at t - 1).

The model is used as it is (``model.training`` is not changed; call ``model.eval()`` first if it has dropout).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .retriever import format_passages

INFO_TEMPLATE = "<information>{}</information>"


@dataclass
class Rollout:
    prompt_ids: list[int]
    completion_ids: list[int]
    info_mask: list[int]
    num_tool_calls: int = 0
    text: str = ""
    finish_reason: str = ""  # "answer" | "eos" | "max_turns" | "length"
    queries: list[str] = field(default_factory=list)
    logprobs: list[float] | None = None
    routes: list[int] | None = None

    @property
    def ids(self) -> list[int]:
        return self.prompt_ids + self.completion_ids

    @property
    def loss_mask(self) -> list[int]:
        """1 on sampled completion tokens, 0 on spliced information tokens (same length as completion_ids)."""
        return [1 - m for m in self.info_mask]


def information_ids(tokenizer, docs: Sequence[dict], template: str = INFO_TEMPLATE) -> list[int]:
    """Token ids of one information block: ``template`` filled with :func:`format_passages` of ``docs``."""
    return tokenizer.encode(template.format(format_passages(docs)), add_special_tokens=False)


def append_search_results(
    rolls, searches, retriever, tokenizer, *, topk: int, max_length: int, info_template: str = INFO_TEMPLATE
) -> list[int]:
    """Run ``searches`` ([(rollout index, query)]) as one retriever batch and append each result, as token ids of
    an ``<information>`` block, to its rollout's completion: masked out of the loss (``info_mask`` 1), cut so the
    sequence stays within ``max_length``, and counted as a tool call. Returns the tokens appended per search."""
    if not searches:
        return []
    results = retriever.search([q for _, q in searches], topk=topk)
    added = []
    for (i, _q), docs in zip(searches, results):
        ro = rolls[i]
        info = information_ids(tokenizer, docs, info_template)[: max(0, max_length - len(ro.ids))]
        ro.completion_ids += info
        ro.info_mask += [1] * len(info)
        ro.num_tool_calls += 1
        added.append(len(info))
    return added


_TAG_TEXTS = ("<think>", "</think>", "<search>", "</search>", "<information>", "</information>", "<answer>",
              "</answer>")


def completion_text(tokenizer, ids: Sequence[int]) -> str:
    """The text the reward reads: ``ids`` decoded with every tag kept.

    ``decode(skip_special_tokens=True)`` deletes tags that were added to the vocabulary as special tokens (as
    the public DART code does), and every reward would be 0. So only the special tokens that are not tags (eos,
    pad, bos, chat markers) are dropped, by id, and the rest is decoded with ``skip_special_tokens=False``."""
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    if special:
        keep = {i for i in special if tokenizer.convert_ids_to_tokens(int(i)) in _TAG_TEXTS}
        drop = special - keep
        ids = [t for t in ids if t not in drop]
    return tokenizer.decode(list(ids), skip_special_tokens=False)


def _single_id(tokenizer, text: str) -> int | None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


_SEARCH_RE = re.compile(r"<search>(.*?)</search>", re.DOTALL)


class _Tags:
    """Stop handling: single-token tags (fast path: ids) or multi-token tags (decoded text)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.search_open = _single_id(tokenizer, "<search>")
        self.search_close = _single_id(tokenizer, "</search>")
        self.answer_close = _single_id(tokenizer, "</answer>")
        self.eos = tokenizer.eos_token_id
        self.single = None not in (self.search_open, self.search_close, self.answer_close)

    def generate_kwargs(self) -> dict:
        if self.single:
            ids = [self.search_close, self.answer_close] + ([self.eos] if self.eos is not None else [])
            return {"eos_token_id": ids}
        kw = {"stop_strings": ["</search>", "</answer>"], "tokenizer": self.tok}
        if self.eos is not None:
            kw["eos_token_id"] = self.eos
        return kw

    def cut(self, new: list[int]) -> tuple[int, str]:
        """Length to keep of the new tokens of one turn and why it stopped ("search", "answer", "eos", "length")."""
        if self.single:
            for i, t in enumerate(new):
                if t == self.search_close:
                    return i + 1, "search"
                if t == self.answer_close:
                    return i + 1, "answer"
                if t == self.eos:
                    return i + 1, "eos"
            return len(new), "length"
        for i, t in enumerate(new):
            if t == self.eos:
                return i + 1, "eos"
            text = self.tok.decode(new[: i + 1])
            if "</search>" in text:
                return i + 1, "search"
            if "</answer>" in text:
                return i + 1, "answer"
        return len(new), "length"

    def query(self, completion: list[int]) -> str:
        if self.single:
            start = max(i for i, t in enumerate(completion) if t == self.search_open) \
                if self.search_open in completion else -1
            end = len(completion) - 1  # the </search> just generated
            return self.tok.decode(completion[start + 1: end], skip_special_tokens=True).strip()
        found = _SEARCH_RE.findall(completion_text(self.tok, completion))
        return found[-1].strip() if found else ""


def _encode_prompts(tokenizer, prompts) -> list[list[int]]:
    out = []
    for p in prompts:
        if isinstance(p, str):
            out.append(list(tokenizer(p)["input_ids"]))
        else:
            out.append([int(t) for t in p])
        if not out[-1]:
            raise ValueError("empty prompt")
    return out


@torch.no_grad()
def generate_rollouts(
    model,
    tokenizer,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    retriever,
    *,
    max_turns: int = 4,
    max_new_tokens: int = 64,
    max_length: int = 1024,
    topk: int = 3,
    do_sample: bool = True,
    temperature: float = 1.0,
    return_logprobs: bool = False,
    route_fn: Callable[[list[int]], list[int]] | None = None,
    generation_kwargs: dict | None = None,
    info_template: str = INFO_TEMPLATE,
) -> list[Rollout]:
    """Run the search agent on ``prompts``; see the module docstring for the contract.

    ``max_turns``: searches allowed per rollout (a rollout asking for one more ends with ``finish_reason =
    "max_turns"``); ``max_new_tokens``: per generation turn; ``max_length``: prompt + completion cap;
    ``topk``: passages per search; ``generation_kwargs``: passed on to ``model.generate`` (override anything)."""
    tags = _Tags(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token")
    device = next(model.parameters()).device
    prompt_ids = _encode_prompts(tokenizer, prompts)
    rolls = [Rollout(p, [], [], logprobs=[] if return_logprobs else None) for p in prompt_ids]
    done = [False] * len(rolls)
    temp = float(temperature) if do_sample else 1.0

    gen_kw = dict(do_sample=do_sample, pad_token_id=pad_id, return_dict_in_generate=True,
                  output_logits=return_logprobs, use_cache=True)
    if do_sample:
        gen_kw.update(temperature=temp, top_k=0, top_p=1.0)
    gen_kw.update(tags.generate_kwargs())
    gen_kw.update(generation_kwargs or {})

    for _turn in range(max_turns + 1):
        for i, d in enumerate(done):
            if not d and len(rolls[i].ids) >= max_length:
                done[i], rolls[i].finish_reason = True, "length"
        active = [i for i, d in enumerate(done) if not d]
        if not active:
            break
        seqs = [rolls[i].ids for i in active]
        longest = max(len(s) for s in seqs)
        budget = min(max_new_tokens, max_length - longest)  # >= 1: every active row is shorter than max_length
        input_ids = torch.full((len(seqs), longest), pad_id, dtype=torch.long)
        attn = torch.zeros((len(seqs), longest), dtype=torch.long)
        for r, s in enumerate(seqs):
            input_ids[r, longest - len(s):] = torch.tensor(s)
            attn[r, longest - len(s):] = 1
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attn.to(device),
                             max_new_tokens=budget, **gen_kw)
        new = out.sequences[:, longest:].tolist()
        if return_logprobs:
            steps = torch.stack(out.logits, dim=1).float()  # (rows, steps, vocab)
            lp = torch.log_softmax(steps / temp, dim=-1)
            chosen = torch.tensor([row + [pad_id] * (lp.shape[1] - len(row)) for row in new], device=lp.device)
            tok_lp = lp.gather(-1, chosen[:, : lp.shape[1], None]).squeeze(-1).tolist()

        searches: list[tuple[int, str]] = []
        for r, i in enumerate(active):
            ro = rolls[i]
            cut, why = tags.cut(new[r])
            keep = min(cut, max_length - len(ro.ids))
            if keep < cut:
                why = "length"
            ro.completion_ids += new[r][:keep]
            ro.info_mask += [0] * keep
            if return_logprobs:
                ro.logprobs += tok_lp[r][:keep]
            if why == "search":
                if ro.num_tool_calls >= max_turns:
                    done[i], ro.finish_reason = True, "max_turns"
                else:
                    q = tags.query(ro.completion_ids)
                    ro.queries.append(q)
                    searches.append((i, q))
            elif why in ("answer", "eos"):
                done[i], ro.finish_reason = True, why
            else:
                done[i], ro.finish_reason = True, "length"

        added = append_search_results(
            rolls, searches, retriever, tokenizer, topk=topk, max_length=max_length, info_template=info_template
        )
        for (i, _q), n in zip(searches, added):
            ro = rolls[i]
            if return_logprobs:
                ro.logprobs += [0.0] * n
            if len(ro.ids) >= max_length:
                done[i], ro.finish_reason = True, "length"

    for i, ro in enumerate(rolls):
        if not done[i]:  # asked for another search after the last allowed turn's generation
            ro.finish_reason = ro.finish_reason or "max_turns"
        ro.text = completion_text(tokenizer, ro.completion_ids)
        if route_fn is not None:
            ro.routes = [int(x) for x in route_fn(ro.ids)]
            if len(ro.routes) != len(ro.ids):
                raise ValueError(f"route_fn returned {len(ro.routes)} routes for {len(ro.ids)} tokens")
    return rolls


def collate(rollouts: Sequence[Rollout], pad_id: int, device=None) -> dict[str, torch.Tensor]:
    """Right-padded ``(B, T)`` tensors of prompt + completion for a teacher-forced pass (see module docstring).

    Keys: ``input_ids``, ``attention_mask``, ``loss_mask``, ``info_mask``, ``prompt_lens`` (B,), and
    ``old_logprobs`` / ``routes`` when every rollout has them."""
    B = len(rollouts)
    T = max(len(r.ids) for r in rollouts)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    loss = torch.zeros((B, T), dtype=torch.float32)
    info = torch.zeros((B, T), dtype=torch.float32)
    out = {}
    has_lp = all(r.logprobs is not None for r in rollouts)
    has_rt = all(r.routes is not None for r in rollouts)
    old_lp = torch.zeros((B, T), dtype=torch.float32) if has_lp else None
    routes = torch.full((B, T), -1, dtype=torch.long) if has_rt else None
    for b, r in enumerate(rollouts):
        P, C = len(r.prompt_ids), len(r.completion_ids)
        input_ids[b, : P + C] = torch.tensor(r.ids)
        attn[b, : P + C] = 1
        loss[b, P: P + C] = torch.tensor(r.loss_mask, dtype=torch.float32)
        info[b, P: P + C] = torch.tensor(r.info_mask, dtype=torch.float32)
        if has_lp:
            old_lp[b, P: P + C] = torch.tensor(r.logprobs, dtype=torch.float32)
        if has_rt:
            routes[b, : P + C] = torch.tensor(r.routes)
    out.update(input_ids=input_ids, attention_mask=attn, loss_mask=loss, info_mask=info,
               prompt_lens=torch.tensor([len(r.prompt_ids) for r in rollouts]))
    if has_lp:
        out["old_logprobs"] = old_lp
    if has_rt:
        out["routes"] = routes
    if device is not None:
        out = {k: v.to(device) for k, v in out.items()}
    return out
