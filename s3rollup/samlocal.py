"""SAM's Lambda emulator against a running embedded stack: what `sam local invoke` and
`sam local start-lambda` need besides the built function (the Makefile's sam-local targets).

    eval "$(python -m s3rollup.samlocal READY_FILE PYTHON)"

reads the ready file `s3rollup up --host 172.31.250.1 --ready-file READY_FILE` wrote, and
- writes .aws-sam/local/env-vars.json (--env-vars): the deployed function's environment, read
  back from the stack as the dispatcher reads it, so no name is written twice;
- builds the local Lambda runtime image with the stack's endpoint (functions/runtime/
  build_image.sh PYTHON ENDPOINT): --env-vars sets only the variables the template declares,
  and the function declares no endpoint, as it needs none in AWS;
- prints shell assignments: S3ROLLUP_SAM_IMAGE, S3ROLLUP_SAM_ENV_VARS, and the endpoint,
  credentials (component_credentials) and region for SAM, which passes the last two into the
  container.
"""

from __future__ import annotations

import json
import shlex
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from botocore.exceptions import BotoCoreError, ClientError

from .aws import LOCAL_OPERATOR, Aws
from .errors import ConfigError
from .local import ROOT, component_credentials, function_environment, load_template, stack_outputs

OUT_DIR = Path(".aws-sam") / "local"
BUILD_IMAGE = ROOT / "functions" / "runtime" / "build_image.sh"


def function_ids(template: dict[str, Any]) -> list[str]:
    """The template's functions' logical ids (SAM's names for them)."""
    return [k for k, v in template["Resources"].items() if v["Type"] == "AWS::Serverless::Function"]


def sam_env_vars(function_id: str, environment: dict[str, str]) -> dict[str, dict[str, str]]:
    """SAM's --env-vars document: the function's deployed environment, under its logical id."""
    return {function_id: dict(environment)}


def invoke_image(python: str, endpoint: str) -> str:
    """The local Lambda runtime image that reaches endpoint (built or reused)."""
    done = subprocess.run(
        [str(BUILD_IMAGE), python, endpoint], capture_output=True, text=True, check=False, timeout=1800
    )
    if done.returncode != 0:
        raise ConfigError(f"the local Lambda image could not be built:\n{done.stderr[-3000:]}")
    return done.stdout.strip().splitlines()[-1]


def prepare(ready_file: Path, python: str, out_dir: Path = OUT_DIR) -> dict[str, str]:
    """Write the env-vars file and build the image for the stack in ready_file; return the
    environment SAM runs with."""
    try:
        ready = json.loads(ready_file.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{ready_file}: no ready file of a running stack ({exc}); start one with "
            f"`s3rollup up --host 172.31.250.1 --no-dispatch --ready-file {ready_file}`"
        ) from None
    endpoint = urlparse(ready["endpoint_url"])
    try:  # a ready file left by a stopped stack: say so now, not after the SDK's retries
        socket.create_connection((endpoint.hostname, endpoint.port or 80), timeout=2).close()
    except OSError:
        raise ConfigError(
            f"nothing answers at {ready['endpoint_url']} ({ready_file}): is `s3rollup up` still running?"
        ) from None
    # The stack's operator reads the function's environment and takes its role's credentials,
    # which SAM passes into the container as Lambda does.
    aws = Aws(ready["region"], ready["endpoint_url"], credentials=LOCAL_OPERATOR)
    try:
        outputs = stack_outputs(aws, ready["stack"])
        environment = function_environment(aws, outputs["IngestFunctionName"])
        credentials = component_credentials(aws, ready["stack"], "function")
    except (BotoCoreError, ClientError) as exc:
        raise ConfigError(
            f"no stack {ready['stack']!r} answers at {ready['endpoint_url']} ({exc}): "
            "is `s3rollup up` still running?"
        ) from None
    (function_id,) = function_ids(load_template())
    out_dir.mkdir(parents=True, exist_ok=True)
    env_vars = out_dir / "env-vars.json"
    env_vars.write_text(json.dumps(sam_env_vars(function_id, environment), indent=2) + "\n")
    return {
        "S3ROLLUP_SAM_IMAGE": invoke_image(python, ready["endpoint_url"]),
        "S3ROLLUP_SAM_ENV_VARS": str(env_vars),
        # SAM asks STS for the account id before each run: the stack answers at once (AWS,
        # unreachable here, would cost each run its connect retries).
        "AWS_ENDPOINT_URL": ready["endpoint_url"],
        "AWS_REGION": ready["region"],
        "AWS_DEFAULT_REGION": ready["region"],
        **credentials,
    }


def main(argv: list[str] | None = None) -> int:
    """Print `export` lines for the shell that runs SAM; errors are one line on stderr."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m s3rollup.samlocal READY_FILE PYTHON", file=sys.stderr)
        return 2
    try:
        env = prepare(Path(args[0]), args[1])
    except ConfigError as exc:
        print(f"s3rollup.samlocal: {exc}", file=sys.stderr)
        return 1
    for k, v in env.items():
        print(f"export {k}={shlex.quote(v)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
