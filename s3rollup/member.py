"""A Dask member task: ``python -m s3rollup.member dask-scheduler|dask-worker [options]``.

The entry point of the scheduler and worker task definitions (template.yaml). The command
is the one dask-cloudprovider puts in RunTask's container overrides, named after the
``dask-scheduler`` and ``dask-worker`` programs that distributed no longer installs: they
are distributed's ``dask scheduler`` and ``dask worker``, with the same options.

TLS comes sealed. RunTask's parameters, overrides included, are recorded by CloudTrail and
returned by DescribeTasks, so the cluster's private key never travels in them: the job
encrypts the cluster's certificate and key under the stack's key (KMS Encrypt, seal_tls)
with an encryption context naming the purpose and the cluster, and the overrides carry the
ciphertext and the cluster's id only. A member decrypts it with its task role (KMS
Decrypt, the same context: open_tls) and gives distributed the certificate and key as the
dask configuration of its own environment, before distributed is imported. A member whose
TLS cannot be opened starts nothing and exits with NO_TLS, saying why (never the key).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import sys
from collections.abc import Mapping
from typing import Any

from .logs import exit_process

_PROGRAMS = {"dask-scheduler": "scheduler", "dask-worker": "worker"}
# The encryption context's purpose: the key policy and the roles' policies allow direct
# Encrypt and Decrypt under the stack's key for this purpose only.
TLS_PURPOSE = "dask-cluster-tls"
SEALED_TLS, CLUSTER_ID, KEY_ARN = "S3ROLLUP_DASK_TLS", "S3ROLLUP_DASK_CLUSTER", "S3ROLLUP_KMS_KEY_ARN"
# The exit code of a member whose TLS could not be opened.
NO_TLS = 3


class TlsError(Exception):
    """The sealed TLS could not be opened (the message names no secret)."""


def tls_context(cluster: str) -> dict[str, str]:
    """The encryption context of a cluster's sealed TLS (not secret: CloudTrail records it)."""
    return {"s3rollup:purpose": TLS_PURPOSE, "s3rollup:cluster": cluster}


def seal_tls(kms: Any, key_arn: str, cluster: str, cert: str, key: str) -> dict[str, str]:
    """The members' environment for a cluster's certificate and private key (PEM): the key
    encrypted under key_arn, the cluster's id, and the key's ARN."""
    plaintext = json.dumps({"cert": cert, "key": key}).encode()
    blob = kms.encrypt(KeyId=key_arn, Plaintext=plaintext, EncryptionContext=tls_context(cluster))
    return {
        SEALED_TLS: base64.b64encode(blob["CiphertextBlob"]).decode(),
        CLUSTER_ID: cluster,
        KEY_ARN: key_arn,
    }


def tls_environment(cert: str, key: str) -> dict[str, str]:
    """A cluster's certificate (also its only CA) and key as dask configuration, for the
    scheduler and the worker alike."""
    env = {"DASK_DISTRIBUTED__COMM__TLS__CA_FILE": cert}
    for role in ("SCHEDULER", "WORKER"):
        env[f"DASK_DISTRIBUTED__COMM__TLS__{role}__CERT"] = cert
        env[f"DASK_DISTRIBUTED__COMM__TLS__{role}__KEY"] = key
    return env


def open_tls(kms: Any, env: Mapping[str, str]) -> dict[str, str]:
    """The dask configuration (tls_environment) of the TLS sealed in env; TlsError if it is
    missing or cannot be decrypted under its cluster's context."""
    from botocore.exceptions import BotoCoreError, ClientError

    missing = [name for name in (SEALED_TLS, CLUSTER_ID, KEY_ARN) if not env.get(name)]
    if missing:
        raise TlsError(f"no sealed TLS in the environment (missing {', '.join(missing)})")
    cluster = env[CLUSTER_ID]
    try:
        blob = base64.b64decode(env[SEALED_TLS], validate=True)
    except (binascii.Error, ValueError):
        raise TlsError(f"the sealed TLS of cluster {cluster} is not base64") from None
    try:
        out = kms.decrypt(CiphertextBlob=blob, KeyId=env[KEY_ARN], EncryptionContext=tls_context(cluster))
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "unknown")
        raise TlsError(f"KMS Decrypt refused the sealed TLS of cluster {cluster}: {code}") from None
    except BotoCoreError as exc:
        raise TlsError(f"KMS Decrypt failed for cluster {cluster}: {type(exc).__name__}") from None
    try:
        pems = json.loads(out["Plaintext"])
        return tls_environment(str(pems["cert"]), str(pems["key"]))
    except (ValueError, KeyError, TypeError):
        raise TlsError(f"the sealed TLS of cluster {cluster} is not a certificate and key") from None


def main(argv: list[str] | None = None) -> int:
    """Run the scheduler or the worker the command names, until it ends; its exit code."""
    args = sys.argv[1:] if argv is None else argv
    role = _PROGRAMS.get(args[0]) if args else None
    if role is None:
        print(f"s3rollup member: the command must start with one of {sorted(_PROGRAMS)}", file=sys.stderr)
        return 2
    from .aws import Aws

    try:
        os.environ.update(open_tls(Aws().client("kms"), os.environ))
    except TlsError as exc:
        print(f"s3rollup member: {exc}; the {role} does not start", file=sys.stderr)
        return NO_TLS
    import dask

    dask.config.refresh()  # the configuration as the environment now has it
    if role == "scheduler":
        from distributed.cli.dask_scheduler import main as command
    else:
        from distributed.cli.dask_worker import main as command
    try:
        command.main(args[1:], prog_name=f"dask {role}", standalone_mode=True)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


if __name__ == "__main__":
    exit_process(main())
