# `make demo` and `make test` each do their whole set-up (virtual environment, torch, the package) first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.routed-lora-installed
OUT ?= runs/demo

.PHONY: setup test demo bench bench-quick gpu-check clean

$(STAMP): pyproject.toml setup.py scripts/setup_env.sh
	bash scripts/setup_env.sh $(VENV)
	touch $(STAMP)

setup: $(STAMP)

test: setup
	$(PY) -m pytest -q -p no:cacheprovider

demo: setup
	$(PY) -m routed_lora.cli demo --out $(OUT)

bench-quick: setup
	$(PY) -m routed_lora.cli bench --quick --out runs/bench

clean:
	rm -rf $(VENV) runs .pytest_cache
