"""The search environment: a generated world, retrieval backends, rewards, a tiny model and tokenizer, the
agent rollout loop, and a short SFT warm start.

Modules (import them directly; this package imports nothing heavy at import time):

- :mod:`routed_lora.env.world`        generated world, corpus, 1-hop / 2-hop questions, train / held-out split
- :mod:`routed_lora.env.data`         JSONL / parquet QA loading (Search-R1 / FlashRAG format)
- :mod:`routed_lora.env.retriever`    BM25 in process, Search-R1 HTTP client and server, passage formatting
- :mod:`routed_lora.env.reward`       answer normalisation, extraction, exact match, format reward
- :mod:`routed_lora.env.tokenizer`    word-level tokenizer with single-token tags, tiny Qwen2 builder
- :mod:`routed_lora.env.trajectories` scripted expert trajectories with the information mask
- :mod:`routed_lora.env.rollout`      batched agent loop (HF generate + KV cache, tool calls spliced as ids)
- :mod:`routed_lora.env.sft`          warm start on expert trajectories and held-out EM evaluation
"""

TAGS = (
    "<think>", "</think>",
    "<search>", "</search>",
    "<information>", "</information>",
    "<answer>", "</answer>",
)
