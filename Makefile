# `make demo` and `make test` each do their whole set-up (virtual environment, torch, the package) first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.routed-lora-installed
OUT ?= runs/demo

.PHONY: setup test demo study bench bench-quick gpu-check clean

$(STAMP): pyproject.toml setup.py scripts/setup_env.sh
	bash scripts/setup_env.sh $(VENV)
	touch $(STAMP)

setup: $(STAMP)

test: setup
	$(PY) -m pytest -q -p no:cacheprovider

demo: setup
	$(PY) -m routed_lora.cli demo --out $(OUT)

# the DART study (docs/study.md); STUDY_ARGS=--quick for the short one; rerun to resume
study: setup
	$(PY) -m routed_lora.cli study --out runs/study $(STUDY_ARGS)

bench-quick: setup
	$(PY) -m routed_lora.cli bench --quick --out runs/bench

clean:
	rm -rf $(VENV) runs .pytest_cache
