# geopose-ray: `make demo` runs the embedded default end to end, `make test` runs every check CI runs.
# Both create .venv on first use and reinstall only when pyproject.toml changes.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NAME ?= demo

# pytest's workers for `make test`: two, one per core (docs/testing.md gives the suite's times).
TEST_WORKERS ?= 2

.PHONY: setup demo test soak lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# One resolver pass: pyproject.toml pins torch==2.14.1 and torchvision==0.29.1 (served from the machine's disk).
	$(BIN)/python -m pip install --quiet --no-input -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/geopose-ray demo --name $(NAME)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Runs every test but the soak runs, the `slow` ones included (CI runs exactly this), on $(TEST_WORKERS) workers,
# each with its own local Ray and MLflow server (docs/testing.md); for a quick loop:
#   make test PYTEST_ARGS='-m "not slow"'
# pytest exits 5 when it collected nothing: that is a failure here, not a pass.
test: lint
	@$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist worksteal $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

# The full-size runs of the tests the suite runs small (the 300-trial load sweep, the 20-epoch learning run), one
# at a time; their last figures are in docs/testing.md.
soak: $(STAMP)
	@$(BIN)/python -m pytest --soak -m soak $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

bench: $(STAMP)
	$(BIN)/python bench/bench_loading.py
	$(BIN)/python bench/bench_score.py

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache
