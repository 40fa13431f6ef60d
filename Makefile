# Set-up is two commands: `make demo` and `make test`. Each makes .venv when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# The tests start hundreds of agent and lepton-ctl processes: under PYTHONDONTWRITEBYTECODE
# (set on some CI images) each compiled the project's sources again, and pytest rewrote every
# test module on every run. Cached bytecode (ignored by git) is compiled once.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: demo test unit integration sim proto lint bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# constraints.txt pins torch to the local CPU build; unpinned, pip pulls a multi-GB CUDA one.
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

# 4 pytest workers (pytest-xdist) by default: integration tests mostly wait on real agents,
# so on 2 cores 4 workers took 449-522 s where a serial run took 732-755 s (clean clone).
# TEST_WORKERS=0 runs serially. --dist loadgroup runs each xdist_group's tests on one worker,
# so a module sharing one cluster or one trained model starts it once (with pytest 9 that
# takes the hook in tests/integration/conftest.py).
TEST_WORKERS ?= 4
PYTEST_XDIST = -n $(TEST_WORKERS) --dist loadgroup
test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_XDIST) --durations=30 tests

unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

integration: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_XDIST) tests/integration

SEEDS ?= 500
sim: $(STAMP)
	LEPTON_SIM_SEEDS=$(SEEDS) $(BIN)/python -m pytest -q tests/sim

proto: $(STAMP)
	PYTHON=$(BIN)/python scripts/gen_proto.sh

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
