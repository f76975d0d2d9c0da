"""A Dask member task: ``python -m s3rollup.member dask-scheduler|dask-worker [options]``.

The entry point of the scheduler and worker task definitions (template.yaml). The command
is the one dask-cloudprovider puts in RunTask's container overrides, named after the
``dask-scheduler`` and ``dask-worker`` programs that distributed no longer installs: they
are distributed's ``dask scheduler`` and ``dask worker``, with the same options. TLS comes
from the environment of the request (the cluster's certificate, as dask configuration).
"""

from __future__ import annotations

import sys

from .logs import exit_process

_PROGRAMS = {"dask-scheduler": "scheduler", "dask-worker": "worker"}


def main(argv: list[str] | None = None) -> int:
    """Run the scheduler or the worker the command names, until it ends; its exit code."""
    args = sys.argv[1:] if argv is None else argv
    role = _PROGRAMS.get(args[0]) if args else None
    if role is None:
        print(f"s3rollup member: the command must start with one of {sorted(_PROGRAMS)}", file=sys.stderr)
        return 2
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
