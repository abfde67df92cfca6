# ds4: `make run` (the main job on the embedded defaults), `make test` (the suite).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUN_DIR := .ds4/run

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: test run lint clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check engine kernels agent lsp tests

# For now the main job writes a tiny checkpoint and generates from it; the fix-loop issue makes it `fix`.
run: $(VENV)/.installed
	$(VENV)/bin/ds4-agent model init --family deepseek_v3 --preset tiny --out $(RUN_DIR)/tiny-v3 --seed 0
	$(VENV)/bin/ds4-agent generate --model $(RUN_DIR)/tiny-v3 --max-tokens 24 "def fibonacci(n):"

clean:
	rm -rf $(VENV) $(RUN_DIR)
