# s3rollup: `make demo` runs the main job on the embedded stack; `make test` runs every check.
# Both create .venv on first use and install the pinned, hash-checked dependencies.

PYTHON ?= $(shell p="$$(pyenv root 2>/dev/null)/versions/3.12.1/bin/python3.12"; \
                  if [ -x "$$p" ]; then echo "$$p"; \
                  else command -v python3.12 || command -v python3; fi)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-dev
LOCK   := requirements/dev.lock

SAM_VENV := .venv-sam
SAM      := $(SAM_VENV)/bin/sam
export SAM_CLI_TELEMETRY := 0
# Byte-compile at install time: the venvs are read far more often than written, and where
# PYTHONDONTWRITEBYTECODE is set (as on CI machines) every process would otherwise compile
# its imports from source (s3rollup.job with pandas, pyarrow and distributed: 3.3 s -> 0.9 s).
export UV_COMPILE_BYTECODE := 1

.PHONY: demo test lint typecheck template awscli unit integration lock clean bench bench-quick bench-image soak scale \
        sam-local sam-start-lambda

# The worker's native kernels (s3rollup/native/rollup.c, loaded with ctypes);
# worker/Dockerfile builds the image's copy with the same script.
NATIVE := s3rollup/native/librollup.so

$(NATIVE): s3rollup/native/rollup.c s3rollup/native/build.sh
	s3rollup/native/build.sh $@ $(CC)

$(STAMP): $(LOCK) pyproject.toml $(NATIVE)
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

# aws-sam-cli, checkov and the AWS CLI (v1, which vendors its own botocore and pins old
# docutils and rsa) each pin their own boto3 and friends: each lives in a venv of its own,
# .venv-<name>, synced from requirements/<name>.lock.
CHECKOV_VENV := .venv-checkov
CHECKOV      := $(CHECKOV_VENV)/bin/checkov
AWS_VENV     := .venv-aws

.venv-%/.installed: requirements/%.lock $(STAMP)
	@test -x $(@D)/bin/python || $(PYTHON) -m venv $(@D)
	$(BIN)/uv pip sync -q --python $(@D)/bin/python $<
	@touch $@

# `sam build` (python3.12 on PATH) produces the function's artifact, again when its sources change.
SAM_BUILT := .aws-sam/build/template.yaml

$(SAM_BUILT): template.yaml $(addprefix functions/ingest/,Makefile app.py requirements.txt) \
              $(wildcard s3rollup/*.py) $(SAM_VENV)/.installed
	PATH="$(dir $(PYTHON)):$$PATH" $(SAM) build --build-dir .aws-sam/build
	@touch $@

# The template validates and lints offline, and the artifact imports without pandas, numpy,
# pyarrow or dask.
template: $(SAM_VENV)/.installed $(CHECKOV_VENV)/.installed $(SAM_BUILT)
	$(SAM) validate --lint -t template.yaml
	$(SAM_VENV)/bin/cfn-lint template.yaml
	$(CHECKOV) -f template.yaml --framework cloudformation --quiet --compact --skip-download
	$(PYTHON) -I -S tests/check_lambda_artifact.py .aws-sam/build/IngestFunction

# The built function in SAM's Lambda emulator, in the local Lambda runtime image
# (functions/runtime/), against a stack started with
#   .venv/bin/s3rollup up --host 172.31.250.1 --no-dispatch --ready-file ready.json
# `make sam-local EVENT=F` invokes it once with the event in F; `make sam-start-lambda` serves
# the Lambda Invoke API on 127.0.0.1:$(LAMBDA_PORT) for boto3's lambda.invoke. Needs a Docker
# engine (worker/build_local_base.sh, root, prepares one) and s3rollup.samlocal's environment:
# the image for the stack's endpoint, the --env-vars file and the credentials.
READY       ?= ready.json
EVENT       ?= events/sqs-s3-put.json
LAMBDA_PORT ?= 3001
SAM_ENV      = sam_env="$$($(BIN)/python -m s3rollup.samlocal $(READY) $(PYTHON))" && eval "$$sam_env"
SAM_RUNTIME  = -t $(SAM_BUILT) --invoke-image "$$S3ROLLUP_SAM_IMAGE" --skip-pull-image \
               --env-vars "$$S3ROLLUP_SAM_ENV_VARS"

sam-local: $(SAM_BUILT)
	@$(SAM_ENV) && set -x && $(SAM) local invoke IngestFunction -e $(EVENT) $(SAM_RUNTIME)

sam-start-lambda: $(SAM_BUILT)
	@$(SAM_ENV) && set -x && $(SAM) local start-lambda --host 127.0.0.1 --port $(LAMBDA_PORT) \
	    --warm-containers LAZY $(SAM_RUNTIME)

# The tests upload with `aws s3 cp` exactly as the README tells users to.
awscli: $(AWS_VENV)/.installed

test: lint typecheck template awscli
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Re-pin after changing pyproject.toml's dependencies.
lock:
	$(BIN)/uv pip compile -q --python-version 3.12 --generate-hashes --extra dev \
	    -o $(LOCK) pyproject.toml
	$(BIN)/uv pip compile -q --python-version 3.12 --generate-hashes --extra worker \
	    -o worker/requirements.lock pyproject.toml
	$(BIN)/uv pip compile -q --python-version 3.12 --generate-hashes \
	    -o functions/ingest/requirements.txt functions/ingest/requirements.in
	$(BIN)/uv pip compile -q --python-version 3.12 --generate-hashes --extra bench \
	    -c $(LOCK) -o requirements/bench.lock pyproject.toml
	echo aws-sam-cli | $(BIN)/uv pip compile -q --python-version 3.12 --generate-hashes \
	    -o requirements/sam.lock -
	echo checkov | $(BIN)/uv pip compile -q --python-version 3.12 --generate-hashes \
	    -o requirements/checkov.lock -
	echo awscli | $(BIN)/uv pip compile -q --python-version 3.12 --generate-hashes \
	    -o requirements/aws.lock -

# Benchmarks (bench/README.md): never part of `make test`. polars, duckdb and psutil come
# from the bench extra, pinned in requirements/bench.lock.
BENCH_STAMP := $(VENV)/.installed-bench

$(BENCH_STAMP): $(STAMP) requirements/bench.lock
	$(BIN)/uv pip install -q --python $(BIN)/python -r requirements/bench.lock
	@touch $@

bench: $(BENCH_STAMP)
	$(BIN)/python bench/run.py $(ARGS)

bench-quick: $(BENCH_STAMP)
	$(BIN)/python bench/run.py --quick $(ARGS)

# The worker image's start, `docker run` to the first partial, cold and warm
# (bench/worker_image.py; needs a Docker engine and a built image: bench/README.md).
bench-image: $(STAMP)
	$(BIN)/python bench/worker_image.py $(ARGS)

# A bounded load of many small parts through the whole embedded stack (bench/soak.py):
# throughput, upload-to-published lag, and every result checked. Not part of `make test`.
soak: $(STAMP)
	$(BIN)/python bench/soak.py $(ARGS)

# What one more part costs as a dataset grows, on the embedded stack (bench/scale.py; hours
# with the defaults). Not part of `make test`.
scale: $(BENCH_STAMP)
	$(BIN)/python bench/scale.py $(ARGS)

clean:
	rm -rf $(NATIVE) $(VENV) $(SAM_VENV) $(CHECKOV_VENV) $(AWS_VENV) .aws-sam .pytest_cache .mypy_cache .ruff_cache .bench-cache
