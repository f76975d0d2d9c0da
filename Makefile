# s3rollup: `make demo` runs the main job on the embedded stack; `make test` runs every check.
# Both create .venv on first use and install the pinned, hash-checked dependencies.

PYTHON ?= $(shell p="$$(pyenv root 2>/dev/null)/versions/3.12.1/bin/python3.12"; \
                  if [ -x "$$p" ]; then echo "$$p"; \
                  else command -v python3.12 || command -v python3; fi)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-dev
LOCK   := requirements/dev.lock

.PHONY: demo test lint typecheck unit integration lock clean build-IngestFunction

$(STAMP): $(LOCK) pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@test -x $(BIN)/uv || $(BIN)/python -m pip install -q --disable-pip-version-check uv
	$(BIN)/uv pip sync -q --python $(BIN)/python $(LOCK)
	$(BIN)/uv pip install -q --python $(BIN)/python --no-deps -e .
	@touch $@

demo: $(STAMP)
	$(BIN)/s3rollup demo $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Re-pin after changing pyproject.toml's dependencies.
lock:
	$(BIN)/uv pip compile -q --python-version 3.12 --generate-hashes --extra dev \
	    -o $(LOCK) pyproject.toml
	$(BIN)/uv pip compile -q --python-version 3.12 --generate-hashes --extra worker \
	    -o worker/requirements.lock pyproject.toml
	$(BIN)/uv pip compile -q --python-version 3.12 --generate-hashes \
	    -o functions/ingest/requirements.txt functions/ingest/requirements.in

clean:
	rm -rf $(VENV) .aws-sam .pytest_cache .mypy_cache .ruff_cache

# `sam build` (BuildMethod: makefile): the handler plus the Lambda-side library, no pandas/dask.
build-IngestFunction:
	cp functions/ingest/app.py "$(ARTIFACTS_DIR)/"
	mkdir -p "$(ARTIFACTS_DIR)/s3rollup"
	cp s3rollup/__init__.py s3rollup/aws.py s3rollup/audit.py s3rollup/config.py \
	   s3rollup/contract.py s3rollup/errors.py s3rollup/ingest.py s3rollup/launch.py \
	   s3rollup/state.py s3rollup/validate.py "$(ARTIFACTS_DIR)/s3rollup/"
	python3 -m pip install -q --no-deps --require-hashes -r functions/ingest/requirements.txt \
	    -t "$(ARTIFACTS_DIR)"
