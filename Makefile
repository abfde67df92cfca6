# ds4: `make run` (the main job on the embedded defaults), `make test` (the suite), `make lint` (ruff).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUN_DIR := .ds4/run

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: test run lint clean gpu-check

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

test: $(VENV)/.installed
	PATH="$(CURDIR)/.venv/bin:$$PATH" $(PY) -m pytest -q  # tests that run `python -m pytest` in example repos get the venv

# On a GPU machine (no install needed there; see .ci/gpu-check): kernels and engine on the card, timings.
GPU_OUT ?= .ds4/gpu-check
gpu-check:
	.ci/gpu-check $(GPU_OUT)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check engine kernels agent lsp tests
	$(VENV)/bin/ruff format --check engine kernels agent lsp tests

# The main job: `ds4-agent fix` on an example repository with the embedded defaults (the engine in this
# process on a tiny random checkpoint written on first use, the SQLite index). A tiny random model
# cannot fix the bug; the run shows the whole pipeline and where to point ds4 for real results.
EXAMPLE ?= pricing-py
run: $(VENV)/.installed
	test -f $(RUN_DIR)/tiny-v3/config.json || $(VENV)/bin/ds4-agent model init --family deepseek_v3 --preset tiny --out $(RUN_DIR)/tiny-v3 --seed 0
	rm -rf $(RUN_DIR)/$(EXAMPLE) && cp -r examples/$(EXAMPLE) $(RUN_DIR)/$(EXAMPLE)
	cd $(RUN_DIR)/$(EXAMPLE) && git init -q && git add -A && git -c user.email=ds4@localhost -c user.name=ds4 commit -qm "$(EXAMPLE) as shipped"
	PATH="$(CURDIR)/.venv/bin:$$PATH" $(VENV)/bin/ds4-agent fix $(RUN_DIR)/$(EXAMPLE)/ISSUE.md --repo $(RUN_DIR)/$(EXAMPLE) --model $(RUN_DIR)/tiny-v3 \
		--rounds 2 --budget 1200 --max-tokens 96; status=$$?; \
	echo; \
	echo "The model here is a tiny random checkpoint: it cannot be expected to fix the bug."; \
	echo "For real fixes: --model DIR with DeepSeek weights (see README), or --endpoint URL of an"; \
	echo "OpenAI-compatible server (ds4's own, vLLM or SGLang serving DeepSeek, or a hosted API)."; \
	test $$status -le 1

clean:
	rm -rf $(VENV) $(RUN_DIR)
