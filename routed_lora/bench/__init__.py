"""The throughput suite of routed-lora: layer and end-to-end benchmarks, memory accounting, reports.

Modules (small and independent):

- :mod:`.providers`: the implementations compared on the same weights and routes (frozen ``nn.Linear`` as the
  floor, routed-lora's PyTorch path and Triton kernels, a naive every-adapter-then-select layer, PEFT LoRA with
  two adapters combined by a per-token mask);
- :mod:`.timing`: interleaved timing with warm-up, cache flushing, CUDA events, median and p20/p80;
- :mod:`.memory`: bytes saved for backward (``saved_tensors_hooks``) and extra peak memory;
- :mod:`.flops`: explicit FLOP counts;
- :mod:`.suite`: the sweeps (shapes, tokens, ranks, tool fractions) writing JSONL records;
- :mod:`.e2e`: one training step of a small Hugging Face model, routed-lora against PEFT;
- :mod:`.report`: JSONL records to a markdown table and a plot;
- :mod:`.cli`: ``routed-lora bench`` and ``routed-lora bench compile-report``.
"""
