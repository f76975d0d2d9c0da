"""A fault-injecting HTTP proxy on 127.0.0.1 in front of the embedded endpoint.

Clients pointed at it (AWS_ENDPOINT_URL) see the real services, except that requests a rule
matches are answered by the rule instead: an error status with the service's error body
(returned *before* the request reaches the service, as a throttle or a front-end 5xx
would), or a delay before forwarding (a slow read). Every injected fault is counted.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlparse

_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade", "te", "trailer"}


@dataclass(frozen=True)
class Request:
    """What a rule sees of a request."""

    method: str
    path: str
    target: str  # X-Amz-Target (JSON protocols: DynamoDB, ECS, SQS); "" for S3
    body: bytes
    # The SDK's last try of this call (its amz-sdk-request header: attempt=N; max=N)
    last_attempt: bool = False


def _is_last_attempt(header: str | None) -> bool:
    fields = dict(part.strip().partition("=")[::2] for part in (header or "").split(";"))
    return bool(fields.get("attempt")) and fields.get("attempt") == fields.get("max")


@dataclass
class Rule:
    """Answer every ``every``-th matching request (the first ``times`` of those, if set) with
    status and body, or only delay it. A ``transient`` fault spares an SDK call's last try:
    it can make every call retry, never fail (requests that happen to fall on the fault's
    turn at each of their tries would otherwise fail a call now and then)."""

    name: str
    match: Callable[[Request], bool]
    status: int = 0  # 0: forward after the delay
    body: Callable[[Request], bytes] | bytes = b""
    content_type: str = "application/x-amz-json-1.0"
    delay: float = 0.0
    every: int = 1
    times: int | None = None
    transient: bool = False
    matched: int = 0


def s3_error(code: str) -> bytes:
    """An S3 XML error body (SlowDown, InternalError, ...)."""
    return f"<Error><Code>{code}</Code><Message>injected</Message></Error>".encode()


def json_error(shape: str, message: str = "injected") -> bytes:
    """A JSON-protocol error body botocore maps to the error code ``shape``."""
    return json.dumps({"__type": shape, "message": message}).encode()


class FaultProxy:
    """The proxy; use as a context manager, add rules, read ``injected`` and ``seen``."""

    def __init__(self, upstream: str) -> None:
        parsed = urlparse(upstream)
        self.upstream = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        self.rules: list[Rule] = []
        self.injected: Counter[str] = Counter()
        self.seen: list[Request] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _serve(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                req = Request(
                    self.command,
                    self.path,
                    self.headers.get("X-Amz-Target", ""),
                    body,
                    _is_last_attempt(self.headers.get("amz-sdk-request")),
                )
                rule = proxy._pick(req)
                if rule is not None and rule.delay:
                    time.sleep(rule.delay)
                if rule is not None and rule.status:
                    data = rule.body(req) if callable(rule.body) else rule.body
                    self._reply(rule.status, [("Content-Type", rule.content_type)], data)
                    return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=120)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                keep = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP | {"content-length"}]
                if self.command == "HEAD":
                    keep.append(("Content-Length", resp.getheader("Content-Length") or "0"))
                self._reply(resp.status, keep, data, head=self.command == "HEAD")

            def _reply(
                self, status: int, headers: list[tuple[str, str]], data: bytes, head: bool = False
            ) -> None:
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                if not head:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if not head:
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _serve

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def _pick(self, req: Request) -> Rule | None:
        with self._lock:
            self.seen.append(req)
            for rule in self.rules:
                if not rule.match(req) or (rule.transient and rule.status and req.last_attempt):
                    continue
                rule.matched += 1
                done = self.injected[rule.name]
                if rule.matched % rule.every == 0 and (rule.times is None or done < rule.times):
                    self.injected[rule.name] += 1
                    return rule
        return None

    def add(self, rule: Rule) -> None:
        """Start applying a rule (rules are tried in the order added)."""
        with self._lock:
            self.rules.append(rule)

    def clear(self) -> None:
        """Stop injecting faults."""
        with self._lock:
            self.rules.clear()

    @contextlib.contextmanager
    def running(self) -> Iterator[FaultProxy]:
        """Serve in a background thread until the block ends."""
        thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._server.shutdown()
            self._server.server_close()
