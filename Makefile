# The two quick-start commands:
#   make demo   - the refund-agent demo on the embedded backend (no server needed)
#   make test   - lint, type-check, start Kafka + PostgreSQL, run the whole test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck unit infra-up infra-down faults fault-seeds bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/terranoha demo

lint: $(STAMP)
	$(BIN)/ruff check engine projections tests bench
	$(BIN)/ruff format --check engine projections tests bench

typecheck: $(STAMP)
	$(BIN)/mypy engine projections

infra-up:
	bash deploy/local/infra.sh up

infra-down:
	bash deploy/local/infra.sh down

unit: $(STAMP)
	$(BIN)/python -m pytest -m "not kafka and not postgres" -q

test: $(STAMP) lint typecheck infra-up
	$(BIN)/python -m pytest -q

# Fault injection against a private broker and PostgreSQL cluster (own ports, own data dir;
# the shared instance on 29092/25432 is not touched). The Kafka jars come from infra-up.
#   make faults                        short profile (CI): a few seconds of faults per scenario
#   make faults SECONDS=120 SEED=42    long, repeatable profile
SECONDS ?= 4
SEED ?=
faults: $(STAMP)
	@test -f .local/kafka/lib/.version || bash deploy/local/infra.sh up
	$(BIN)/python -m pytest tests/faults -m faults -s -q \
		--seconds $(SECONDS) $(if $(SEED),--seed $(SEED))

# The fault scenarios across many seeds against one broker and PostgreSQL (the long
# profile): make fault-seeds SECONDS=20 SEEDS=1-20 K="broker_killed or zombie"
SEEDS ?= 1-20
K ?=
fault-seeds: $(STAMP)
	@test -f .local/kafka/lib/.version || bash deploy/local/infra.sh up
	$(BIN)/python -m pytest tests/faults -m faults -s -q -p no:cacheprovider \
		--seconds $(SECONDS) --seeds "$(SEEDS)" $(if $(K),-k "$(K)")

# Every benchmark in one run (starts Kafka and PostgreSQL, installs the peers into
# .local/bench-peers): a table, and bench/results/latest.json.
bench: $(STAMP)
	$(BIN)/python -m bench all $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
