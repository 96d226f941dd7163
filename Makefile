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
	$(PY) -m pip install -q --disable-pip-version-check -e '.[train,plot,tensorboard,test]'
	touch $(STAMP)

demo: $(STAMP)
	rm -rf $(OUT)/demo $(OUT)/profile.json $(OUT)/train-entrain $(OUT)/train-sequential
	$(VENV)/bin/entrain demo-data -o $(OUT)/demo --n 128
	@echo "== how uneven are the microbatches of this data (tiny model, 1 replica, 4 microbatches)"
	$(VENV)/bin/entrain analyze $(OUT)/demo/manifest.jsonl --model tiny --dp 1 --microbatches 4 --global-batch 16
	@echo "== measuring the real modules on this machine (3 processes, as in training)"
	$(VENV)/bin/entrain profile --data $(OUT)/demo/manifest.jsonl --nproc 3 -o $(OUT)/profile.json
	@echo "== training for real: 3 CPU processes (vision encoder, audio encoder, LLM), gloo"
	$(VENV)/bin/entrain train examples/recipes/demo.yaml data.path=$(OUT)/demo/manifest.jsonl schedule.profile=$(OUT)/profile.json run.out=$(OUT)/train-entrain run.trace=true --nproc 3
	$(VENV)/bin/entrain train examples/recipes/demo.yaml data.path=$(OUT)/demo/manifest.jsonl schedule.profile=$(OUT)/profile.json schedule.policy=sequential run.out=$(OUT)/train-sequential --nproc 3
	@echo "== measured, and the simulator's replay of the same steps with the profile"
	$(VENV)/bin/entrain runs $(OUT)/train-sequential $(OUT)/train-entrain --simulate
	$(VENV)/bin/entrain report $(OUT)/train-entrain -o $(OUT)/report.html
	@echo "== the same runtime at cluster shape: 16 emulated H100 ranks, omni-7b, no model built"
	@echo "   (dp 2 x [vision, audio, 6 LLM stages], 1 sample per microbatch; each compute sleeps"
	@echo "   the simulator's time for it x4, messages and everything else are the real runtime's)"
	rm -rf $(OUT)/omni $(OUT)/em16-sequential $(OUT)/em16-llm-balanced $(OUT)/em16-entrain
	$(VENV)/bin/entrain trace generate --kind omni --n 256 -o $(OUT)/omni/manifest.jsonl
	for p in sequential llm-balanced entrain; do \
		$(VENV)/bin/entrain train --data $(OUT)/omni/manifest.jsonl --model omni-7b \
			--device emulate --nproc 16 --dp 2 --pp 6 --global-batch 64 --microbatches 32 \
			--lookahead 1 --steps 4 --policy $$p --out $(OUT)/em16-$$p || exit 1; done
	$(VENV)/bin/entrain runs $(OUT)/em16-sequential $(OUT)/em16-llm-balanced $(OUT)/em16-entrain --simulate --warmup 1

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	@# every benchmark runs (each writes its section of docs/results.md); a budget missed
	@# fails the target at the end, after the others have run
	@status=0; for b in bench_scheduler bench_sim regimes sim_eval regime_map sim_vs_real \
		bench_load; do echo "== benchmarks/$$b.py"; $(PY) benchmarks/$$b.py || status=1; done; \
		exit $$status

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache .hypothesis
