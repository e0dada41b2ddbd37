# Two commands do all set-up: `make demo` and `make test`.
# torch is installed only when none is installed, so a user's own (GPU) build is kept; on Linux with
# no NVIDIA GPU the CPU build comes from TORCH_INDEX when it answers within 3 s, else from pip's own
# index (tools/install_torch.py says which, and why).
PYTHON ?= python3
TORCH ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
# Extra arguments for examples/digits.py, e.g. `make demo ARGS="--epochs 5 --models mlp"`.
ARGS ?=
LINTED = lightning_prune tests examples benchmarks tools

.PHONY: install demo test test-fast lint typecheck

install:
	@$(PYTHON) tools/install_torch.py --torch "$(TORCH)" --cpu-index "$(TORCH_INDEX)"
	@$(PYTHON) -c "import lightning_prune, lightning, torchmetrics, omegaconf, jsonargparse, docstring_parser, hydra, sklearn, rich, matplotlib, tensorboard, transformers, pytest, xdist, hypothesis, ruff, mypy" 2>/dev/null \
		&& $(PYTHON) -c "import importlib.metadata as m; assert 'lightning-prune' in m.entry_points(group='console_scripts').names" 2>/dev/null \
		|| $(PYTHON) -m pip install -e ".[dev,demo]"

demo: install
	$(PYTHON) examples/digits.py $(ARGS)

# Test files are spread over up to 4 worker processes (pytest-xdist; a file's tests stay together so
# that its module-scoped DDP/FSDP runs are shared): about 7 minutes on 2 idle cores, 12 in one process.
test: install
	$(PYTHON) -m pytest -q -n auto --maxprocesses 4 --dist loadfile

# The suite without the tests marked slow, ddp, subprocess or bench (pyproject.toml): under a minute.
# It skips install's check (10 s of imports): run make test or make install once first.
test-fast:
	$(PYTHON) -m pytest -q -m "not slow and not ddp and not subprocess and not bench"

lint: install
	$(PYTHON) -m ruff check $(LINTED)
	$(PYTHON) -m ruff format --check $(LINTED)

typecheck: install
	$(PYTHON) -m mypy
