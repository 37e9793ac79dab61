#!/usr/bin/env bash
# Every GPU check and benchmark in one call (for a lent GPU machine with no network):
#   bash benchmarks/gpu_all.sh [OUT_DIR]
# 1. versions; 2. install this checkout (editable, so kernels/ maps to routed_lora.kernels) without dependencies (the image carries torch, triton, transformers,
# peft); 3. benchmarks/gpu_check.py (correctness at real shapes + the issue-3 timing table, gpu_check.json);
# 4. per-kernel profile (gpu_profile.txt), host overhead and steady-state times (gpu_overhead.*); 5. the GPU pytest file; 6. `routed-lora bench --quick` on cuda (results.jsonl, report.md, plot).
# Each step has its own time limit so one slow step cannot eat the others; logs go to OUT_DIR.
set -u
OUT_DIR="${1:-${OUT:-runs/gpu}}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  "$PY" -c "import peft; print('peft', peft.__version__)" || true
} 2>&1 | tee "$OUT_DIR/gpu_log.txt"
"$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | tail -3 | tee -a "$OUT_DIR/gpu_log.txt"
echo "== gpu_check" | tee -a "$OUT_DIR/gpu_log.txt"
timeout "${T_CHECK:-230}" "$PY" benchmarks/gpu_check.py --out "$OUT_DIR" --reps "${REPS:-150}" 2>&1 | tee -a "$OUT_DIR/gpu_log.txt"
echo "== gpu_profile (per-kernel time)" | tee -a "$OUT_DIR/gpu_log.txt"
timeout "${T_PROFILE:-60}" "$PY" benchmarks/gpu_profile.py --out "$OUT_DIR" > /dev/null 2>&1 || echo "gpu_profile failed" | tee -a "$OUT_DIR/gpu_log.txt"
echo "== gpu_overhead (host overhead, steady-state time)" | tee -a "$OUT_DIR/gpu_log.txt"
timeout "${T_OVERHEAD:-90}" "$PY" benchmarks/gpu_overhead.py --out "$OUT_DIR" 2>&1 | head -14 | tee -a "$OUT_DIR/gpu_log.txt"
echo "== pytest tests/test_kernels_gpu.py" | tee -a "$OUT_DIR/gpu_log.txt"
timeout "${T_PYTEST:-100}" "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels_gpu.py 2>&1 | tail -25 | tee -a "$OUT_DIR/gpu_log.txt"
echo "== routed-lora bench --quick --device cuda" | tee -a "$OUT_DIR/gpu_log.txt"
timeout "${T_BENCH:-130}" "$PY" -m routed_lora.cli bench --quick --device cuda --out "$OUT_DIR/bench" 2>&1 | tail -40 | tee -a "$OUT_DIR/gpu_log.txt"
echo "== done $(date -u)" | tee -a "$OUT_DIR/gpu_log.txt"
