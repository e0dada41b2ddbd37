# Two commands do all set-up: `make demo` and `make test`.
# TORCH is installed only when no torch is importable, so a user's own (GPU) build is kept;
# the pinned default resolves to a local CPU build on CPU-only machines.
PYTHON ?= python3
TORCH ?= torch==2.13.0

.PHONY: install demo test lint

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "$(TORCH)"
	@$(PYTHON) -c "import lightning_prune, lightning, torchmetrics, omegaconf, jsonargparse, docstring_parser, hydra, sklearn, rich, matplotlib, tensorboard, pytest, hypothesis, ruff" 2>/dev/null \
		&& $(PYTHON) -c "import importlib.metadata as m; assert 'lightning-prune' in m.entry_points(group='console_scripts').names" 2>/dev/null \
		|| $(PYTHON) -m pip install -e ".[dev,demo]"

demo: install
	$(PYTHON) examples/digits.py

test: install
	$(PYTHON) -m pytest -q

lint: install
	$(PYTHON) -m ruff check lightning_prune tests examples benchmarks
	$(PYTHON) -m ruff format --check lightning_prune tests examples benchmarks
