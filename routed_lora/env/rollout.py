"""The agent loop: batched generation with the search tool, used by the SFT evaluation and by the GRPO loop.

One call, :func:`generate_rollouts`, runs up to ``max_turns`` tool calls for a batch of prompts:

1. every unfinished row feeds what is not yet in its KV cache (the prompt; after a search, the ``</search>``
   token and the ``<information>`` ids) and decodes, sampling until it emits ``</search>`` or ``</answer>``
   (or eos, or ``max_new_tokens``). One cache serves all turns (:class:`_Decoder`): the transcript is never
   encoded again; rows that stopped leave holes (masked pad ids) until the batch moves on, and finished rows
   leave the batch;
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
  ``log_softmax(logits / temperature)`` at the sampled id, from the raw logits of the decoding step (0.0 on
  information tokens). With ``do_sample=True`` the sampler draws from exactly that distribution (no top-k, no
  top-p); logits processors given in ``generation_kwargs`` change what is sampled, not the recorded log-probs.
  The cached decode sees each token at the position and with the routes a teacher-forced pass of
  ``prompt_ids + completion_ids`` gives it, so the two agree to float rounding (<= 1e-5 in float32, over
  multi-turn rollouts, tests/test_rollout_kv_cache.py). The GRPO trainer uses them only as a check (a step with
  one optimiser step uses its own forward as the old policy, others recompute the old pass teacher-forced).
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
    if hasattr(retriever, "search_rollouts"):
        # a retriever that answers per rollout (retrieval held constant, routed_lora.env.held_constant) needs to
        # know which rollout asks and how many searches it has made before
        results = retriever.search_rollouts([i for i, _ in searches], [q for _, q in searches],
                                            [rolls[i].num_tool_calls for i, _ in searches], topk=topk)
    else:
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


class _Decoder:
    """One KV cache for a batch of rows, kept across turns (the transcript is never fed twice).

    Every row owns one line of the cache. A forward call feeds each row a block of new tokens; rows with fewer
    tokens than the block (and rows that stopped while others decode) get *holes*: pad ids with attention mask 0.
    The 2-D mask over the whole cache keeps holes out of every later query's keys, position ids count real tokens
    only (``npos``), and causality is by cache index, so each real token sees exactly the tokens before it in its
    own transcript, at the positions a teacher-forced pass of ``prompt_ids + completion_ids`` gives them. A
    router attached to the model (:mod:`routed_lora.hf`) reads the same mask: holes do not change its state.
    ``meters`` counts the tokens fed: ``prefill_tokens`` (multi-token calls, holes included; their real tokens
    ``prefill_real_tokens``, their number ``prefill_calls``), ``decode_tokens`` (one-token calls, holes
    included), ``fed_tokens`` (real tokens only: each transcript token at most once), ``forward_calls`` and
    ``kv_peak_tokens`` (the largest rows x cache length, holes included)."""

    def __init__(self, model, pad_id: int, device, meters: dict | None):
        import inspect

        params = inspect.signature(model.forward).parameters
        self.model, self.pad_id, self.device = model, pad_id, device
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.keep_kw = "logits_to_keep" in params
        self.cache = None
        self.seq = torch.empty((0, 0), dtype=torch.long, device=device)  # ids in cache order (pad in holes)
        self.mask = torch.empty((0, 0), dtype=torch.long, device=device)
        self.npos = torch.empty((0,), dtype=torch.long, device=device)  # real tokens per row so far
        self.meters = meters if meters is not None else {}
        for k in ("prefill_tokens", "prefill_real_tokens", "prefill_calls", "decode_tokens", "fed_tokens",
                  "forward_calls", "kv_peak_tokens"):
            self.meters.setdefault(k, 0)

    def feed(self, block: torch.Tensor, bmask: torch.Tensor) -> torch.Tensor:
        """Append ``block`` (B, T) with mask ``bmask`` (B, T) to every row; return the logits of the last
        column (B, V): the next-token logits of each row whose last block token is real."""
        B, T = block.shape
        if self.cache is None:
            self.seq = torch.empty((B, 0), dtype=torch.long, device=self.device)
            self.mask = torch.empty((B, 0), dtype=torch.long, device=self.device)
            self.npos = torch.zeros((B,), dtype=torch.long, device=self.device)
        pos = self.npos[:, None] + bmask.cumsum(-1) - 1
        pos = torch.where(bmask.bool(), pos, torch.zeros_like(pos))
        self.seq = torch.cat([self.seq, block], 1)
        self.mask = torch.cat([self.mask, bmask], 1)
        self.npos = self.npos + bmask.sum(-1)
        kw = {self.cache_kw: self.cache, "use_cache": True}
        if self.keep_kw:
            kw["logits_to_keep"] = 1
        out = self.model(input_ids=block, attention_mask=self.mask, position_ids=pos, **kw)
        self.cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        fed = int(bmask.sum())
        self.meters["prefill_tokens" if T > 1 else "decode_tokens"] += B * T
        if T > 1:
            self.meters["prefill_real_tokens"] += fed
            self.meters["prefill_calls"] += 1
        self.meters["fed_tokens"] += fed
        self.meters["kv_peak_tokens"] = max(self.meters["kv_peak_tokens"], int(self.mask.numel()))
        self.meters["forward_calls"] += 1
        return out.logits[:, -1]

    def select(self, rows: list[int]) -> None:
        """Keep only cache rows ``rows`` (finished rows leave the batch)."""
        idx = torch.tensor(rows, dtype=torch.long, device=self.device)
        if self.cache is not None:
            self.cache.batch_select_indices(idx)
        self.seq, self.mask, self.npos = self.seq[idx], self.mask[idx], self.npos[idx]


_ALLOWED_GEN_KW = ("logits_processor",)


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
    meters: dict | None = None,
) -> list[Rollout]:
    """Run the search agent on ``prompts``; see the module docstring for the contract.

    ``max_turns``: searches allowed per rollout (a rollout asking for one more ends with ``finish_reason =
    "max_turns"``); ``max_new_tokens``: per generation turn; ``max_length``: prompt + completion cap;
    ``topk``: passages per search; ``generation_kwargs``: ``{"logits_processor": [...]}`` (HF logits
    processors, called as ``proc(ids so far, scores)`` on the raw logits before sampling; the recorded
    log-probs stay those of the raw logits at the temperature, i.e. of the policy the trainer scores);
    ``meters``: a dict that receives the token counts of :class:`_Decoder` (prefill and decode tokens).

    One KV cache serves all turns (:class:`_Decoder`): after a search, only the stop token and the
    ``<information>`` ids are fed; the transcript is not encoded again."""
    tags = _Tags(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token")
    extra = sorted(set(generation_kwargs or {}) - set(_ALLOWED_GEN_KW))
    if extra:
        raise ValueError(f"generation_kwargs: supported keys are {list(_ALLOWED_GEN_KW)}, got {extra}")
    procs = list((generation_kwargs or {}).get("logits_processor") or [])
    device = next(model.parameters()).device
    prompt_ids = _encode_prompts(tokenizer, prompts)
    rolls = [Rollout(p, [], [], logprobs=[] if return_logprobs else None) for p in prompt_ids]
    temp = float(temperature) if do_sample else 1.0
    if temp <= 0:
        raise ValueError(f"temperature: expected > 0, got {temperature}")
    stop_ids = [t for t in (tags.search_close, tags.answer_close, tags.eos) if t is not None]
    stop_t = torch.tensor(stop_ids, dtype=torch.long, device=device)

    dec = _Decoder(model, pad_id, device, meters)
    for ro in rolls:
        if len(ro.ids) >= max_length:
            ro.finish_reason = "length"  # never enters the cache
    live = [i for i, ro in enumerate(rolls) if not ro.finish_reason]  # rollout index of each cache row
    pending = [list(prompt_ids[i]) for i in live]  # per cache row: ids not yet in the cache

    for _turn in range(max_turns + 1):
        if not live:
            break
        # 1. feed what each row has not fed yet (prompt, or stop token + information block), left-padded
        B, P = len(live), max(len(x) for x in pending)
        block = torch.full((B, P), pad_id, dtype=torch.long)
        bmask = torch.zeros((B, P), dtype=torch.long)
        for r, x in enumerate(pending):
            block[r, P - len(x):] = torch.tensor(x, dtype=torch.long)
            bmask[r, P - len(x):] = 1
        logits = dec.feed(block.to(device), bmask.to(device))
        # 2. decode until every row stops (stop tag, eos) or uses its budget
        budget = torch.tensor([min(max_new_tokens, max_length - len(rolls[i].ids)) for i in live], device=device)
        steps = int(budget.max())
        new = torch.full((B, steps), pad_id, dtype=torch.long, device=device)
        new_lp = torch.zeros((B, steps), dtype=torch.float32, device=device) if return_logprobs else None
        running = torch.ones(B, dtype=torch.bool, device=device)
        n_new = torch.zeros(B, dtype=torch.long, device=device)
        text_stops = [False] * B
        for t in range(steps):
            raw = logits.float()
            scores = raw
            for proc in procs:
                scores = proc(dec.seq, scores)
            if do_sample:
                tok = torch.multinomial(torch.softmax(scores / temp, dim=-1), 1).squeeze(1)
            else:
                tok = scores.argmax(-1)
            tok = torch.where(running, tok, torch.full_like(tok, pad_id))
            new[:, t] = tok
            if return_logprobs:
                new_lp[:, t] = torch.log_softmax(raw / temp, dim=-1).gather(-1, tok[:, None]).squeeze(1)
            n_new += running.long()
            if tags.single:
                stopped = torch.isin(tok, stop_t)
            else:  # multi-token tags: stop once the decoded turn holds a stop string (or at eos)
                stopped = torch.zeros_like(running)
                for r in running.nonzero().flatten().tolist():
                    row = new[r, : t + 1].tolist()
                    if row[-1] == tags.eos or tags.cut(row)[1] in ("search", "answer"):
                        stopped[r] = True
                        text_stops[r] = True
            running = running & ~stopped & (n_new < budget)
            if not bool(running.any()):
                break
            # the sampled token of a row that stopped is not fed now: it leads the row's next block
            logits = dec.feed(torch.where(running, tok, torch.full_like(tok, pad_id))[:, None], running.long()[:, None])
        new_l, n_l = new.tolist(), n_new.tolist()
        lp_l = new_lp.tolist() if return_logprobs else None

        # 3. keep each row's turn, collect searches
        searches: list[tuple[int, str]] = []
        nxt: list[int] = []
        for r, i in enumerate(live):
            ro = rolls[i]
            turn = new_l[r][: n_l[r]]
            cut, why = tags.cut(turn)
            ro.completion_ids += turn[:cut]
            ro.info_mask += [0] * cut
            if return_logprobs:
                ro.logprobs += lp_l[r][:cut]
            if why == "search":
                if ro.num_tool_calls >= max_turns:
                    ro.finish_reason = "max_turns"
                else:
                    q = tags.query(ro.completion_ids)
                    ro.queries.append(q)
                    searches.append((i, q))
                    nxt.append(r)
            elif why in ("answer", "eos"):
                ro.finish_reason = why
            else:
                ro.finish_reason = "length"
        added = append_search_results(
            rolls, searches, retriever, tokenizer, topk=topk, max_length=max_length, info_template=info_template
        )
        keep_rows, pending = [], []
        for (i, _q), n, r in zip(searches, added, nxt):
            ro = rolls[i]
            if return_logprobs:
                ro.logprobs += [0.0] * n
            if len(ro.ids) >= max_length:
                ro.finish_reason = "length"
                continue
            keep_rows.append(r)
            # the stop token (sampled, not yet fed) and the information block
            pending.append([ro.completion_ids[-n - 1]] + (ro.completion_ids[-n:] if n else []))
        if len(keep_rows) < len(live) and keep_rows:
            dec.select(keep_rows)
        live = [live[r] for r in keep_rows]

    for ro in rolls:
        # a row still live after the last turn asked for another search: "max_turns"
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
