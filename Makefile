# One entry point for everything: `make demo`, `make test`, `make bench`.
# The venv is built once (the stamp file remembers); torch==2.13.0 is installed first so the
# package's `torch>=2.4` is already met by the local CPU build and nothing pulls a CUDA wheel.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
OUT := out

.PHONY: demo test bench lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[train,plot,test]'
	touch $(STAMP)

demo: $(STAMP)
	mkdir -p $(OUT)
	$(VENV)/bin/entrain trace generate --kind omni --n 4096 --seed 0 -o $(OUT)/omni.jsonl
	@echo "== wide microbatches (about 16 samples each)"
	$(VENV)/bin/entrain analyze $(OUT)/omni.jsonl --model omni-7b --dp 4 --microbatches 8 --global-batch 512 --iterations 8
	@echo "== narrow microbatches (2 samples each)"
	$(VENV)/bin/entrain analyze $(OUT)/omni.jsonl --model omni-7b --dp 8 --microbatches 32 --global-batch 512 --iterations 8

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) benchmarks/bench_scheduler.py
	$(PY) benchmarks/bench_sim.py
	$(PY) benchmarks/regimes.py
	$(PY) benchmarks/sim_eval.py

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache .hypothesis
