# Set-up is two commands: `make demo` and `make test`. Each makes .venv when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test unit integration sim proto lint bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# constraints.txt pins torch to the local CPU build; unpinned, pip pulls a multi-GB CUDA one.
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

# Serial by default (12.5 min on 2 cores). TEST_WORKERS=4 runs 4 pytest workers: 7.5 min,
# since integration tests mostly wait on real agents, but the doubled load still surfaces
# timing races in tests (four found and fixed in six parallel runs), so it is opt-in.
TEST_WORKERS ?= 0
test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --durations=15 tests

unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

integration: $(STAMP)
	$(BIN)/python -m pytest -q tests/integration

SEEDS ?= 500
sim: $(STAMP)
	LEPTON_SIM_SEEDS=$(SEEDS) $(BIN)/python -m pytest -q tests/sim

proto: $(STAMP)
	PYTHON=$(BIN)/python scripts/gen_proto.sh

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
