"""Structured logs for the worker and the command line: one JSON object a line.

Fields passed with ``extra={...}`` become keys of the object. Callers pass names, ids,
counts and reason codes only, never a cell value.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """Formats a record as JSON with its extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one JSON line."""
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        if record.exc_info and record.exc_info[0] is not None:
            # The exception's type and where it was raised; not its text, which may quote data.
            out["exception"] = record.exc_info[0].__name__
            out["trace"] = [
                f"{Path(f.filename).name}:{f.lineno} {f.name}"
                for f in traceback.extract_tb(record.exc_info[2])
            ][-8:]
        return json.dumps(out, default=str)


def configure(level: str = "INFO") -> None:
    """Send s3rollup's logs to stdout as JSON; keep chatty libraries at WARNING."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("distributed", "botocore", "urllib3", "werkzeug", "asyncio", "tornado"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def exit_process(code: int) -> NoReturn:
    """End the process with ``code`` once its output and logs are written.

    Arrow's native thread pools can abort the interpreter's final teardown with
    "terminate called without an active exception" (SIGABRT) after all work is done
    (apache/arrow#34314). When a command or a job's ``main()`` returns, everything it does
    is finished and every ``finally`` has run, so the process flushes and ends here
    instead of going through that teardown: its exit code is the one ``main()`` chose.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        # A closed pipe or stream has no reader left to write for.
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)
