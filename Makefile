# tkpbench: `make demo` runs the whole chain on generated data; `make test` runs the tests.
PY      ?= python3
VENV    ?= .venv
BIN      = $(VENV)/bin
STAMP    = $(VENV)/.installed

.PHONY: install test test-paper test-fast demo bench gpu-check report reproduce-voc reproduce-coco ablation sweep clean-demo

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

# The default test run: lint, then everything, the slow end-to-end tests included (fits CI's budget).
test: install
	$(BIN)/ruff check tkpbench tests
	$(BIN)/ruff format --check tkpbench tests
	$(BIN)/python -m pytest -q -p no:cacheprovider

# only the paper's shapes end to end (reproduce.sh voc on the real VOC sample; part of make test)
test-paper: install
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_paper_config.py

test-fast: install
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow"

demo: install
	./reproduce.sh demo

bench: install
	$(BIN)/python bench/stages.py

# The first hour on a GPU machine: every CUDA path in at most 8 minutes on one GPU (10 on two), one
# table and a JSON record in bench/. Installs nothing: the venv's python when there is one, else python3.
gpu-check:
	$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PY)) bench/gpu_check.py

report: install
	$(BIN)/python -m tkpbench.report results

reproduce-voc: install
	./reproduce.sh voc

reproduce-coco: install
	./reproduce.sh coco

ablation: install
	./reproduce.sh ablation

sweep: install
	./reproduce.sh sweep

clean-demo:
	rm -rf runs/demo* data/demo results/demo* results/fig5_demo* results/fig_seeds.png
