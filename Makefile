# Set-up and entry points. `make demo` and `make test` work from a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
ARGS   ?=
# The library needs none of these; the agent, POPGym, Ray, the tuner and the test tools do (pyproject.toml).
EXTRAS := agent,popgym,dist,tune,test,dev

.PHONY: venv demo test test-slow article lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m agents.cartpole $(ARGS)

article: $(STAMP)
	$(BIN)/python -m agents.article

# --durations=15: the slowest tests close the report (the suite should stay under ~10 minutes).
test: $(STAMP)
	$(BIN)/python -m pytest --durations=15 $(ARGS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check burnin agents studies benchmarks tests
	$(BIN)/ruff format --check burnin agents studies benchmarks tests

bench: $(STAMP)
	$(BIN)/python -m benchmarks.burnin_throughput $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
