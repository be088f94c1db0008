"""The HTTP plumbing both emulators share: a threaded loopback server, a request log, faults.

An emulator subclasses :class:`EmulatorServer` and implements :meth:`EmulatorServer.route` (the
API itself) and :meth:`EmulatorServer.error` (the API's own error body shape). Everything a client
sends is recorded as a :class:`RecordedRequest`, so tests assert on what a user would see on the
wire. Faults injected with :meth:`EmulatorServer.inject_fault` answer in place of the API, in the
API's own error shape, for a given number of matching requests.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import sys
import threading
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the emulator received it."""

    method: str
    path: str
    query: Mapping[str, list[str]]
    headers: Mapping[str, str]  # keys lower-cased
    body: bytes
    status: int = 0  # filled in once answered
    received: float = 0.0  # when it arrived (time.time()), before any latency or fault delay

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body or b"null")

    def form(self) -> dict[str, list[str]]:
        """The body parsed as application/x-www-form-urlencoded."""
        return urllib.parse.parse_qs(self.body.decode("utf-8"), keep_blank_values=True)

    def param(self, name: str) -> str | None:
        """The first query-string value of ``name``."""
        values = self.query.get(name)
        return values[0] if values else None


@dataclass
class Response:
    """What the emulator answers."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, status: int, payload: Any, headers: Mapping[str, str] | None = None) -> Response:
        """A JSON response."""
        merged = {"Content-Type": "application/json; charset=UTF-8", **(headers or {})}
        return cls(status, json.dumps(payload).encode("utf-8"), merged)


@dataclass
class Fault:
    """An injected failure: answers ``status`` for the next ``times`` matching requests."""

    status: int
    method: str | None = None
    path: str = ".*"  # regular expression searched in the request path
    times: int = 1
    delay: float = 0.0  # seconds to wait before answering (a slow or hung server)
    headers: dict[str, str] = field(default_factory=dict)
    reason: str = ""  # API-specific error reason, e.g. "rateLimitExceeded" or "rate_limit"
    message: str = "Injected fault"
    #: Carry the request out first, then answer the error: the "it worked but the answer was
    #: lost" case (a 5xx or timeout after a send), which is what makes non-idempotent calls risky.
    after: bool = False
    #: Close the connection without answering at all (after carrying the request out, with
    #: ``after``): a dropped connection, which the client sees as a connection error.
    drop: bool = False

    def matches(self, method: str, path: str) -> bool:
        """Whether this fault applies to a request."""
        if self.times <= 0:
            return False
        if self.method is not None and self.method.upper() != method:
            return False
        return re.search(self.path, path) is not None


class _QuietServer(ThreadingHTTPServer):
    """The stdlib server, minus a traceback on stderr when a client goes away mid-answer.

    Crash tests kill the responder while a request is in flight; the answer then meets a closed
    socket. Google's and Stripe's servers shrug that off, and so does the emulator: the request
    is recorded all the same. Any other error still prints.
    """

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):  # BrokenPipe, ConnectionReset...
            return
        super().handle_error(request, client_address)


class EmulatorServer:
    """A threaded HTTP server on 127.0.0.1 that records requests and can inject faults."""

    #: Name used in log lines and thread names.
    name = "emulator"

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, latency: float = 0.0) -> None:
        self._lock = threading.RLock()
        self._requests: list[RecordedRequest] = []
        self._faults: list[Fault] = []
        self.latency = latency
        self._httpd = _QuietServer((host, port), _make_handler(self))
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:54321``, without a trailing slash."""
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> Self:
        """Serve in a background thread; returns self for chaining."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._httpd.serve_forever, name=f"{self.name}-server", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- observation and faults -----------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        """A copy of every request received so far, oldest first."""
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        """Forget the request log (state is kept)."""
        with self._lock:
            self._requests.clear()

    def inject_fault(self, fault: Fault) -> Fault:
        """Answer matching requests with ``fault`` instead of the API, ``fault.times`` times."""
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        """Remove every injected fault."""
        with self._lock:
            self._faults.clear()

    def reset(self) -> None:
        """Forget requests and faults; subclasses also reset their API state."""
        with self._lock:
            self._requests.clear()
            self._faults.clear()

    # -- for subclasses ---------------------------------------------------------------------------

    def route(self, request: RecordedRequest) -> Response:
        """Answer one request as the emulated API would."""
        raise NotImplementedError

    def error(self, fault: Fault, request: RecordedRequest) -> Response:
        """An error response in the emulated API's own shape, for the request it fails."""
        return Response.json(fault.status, {"error": {"message": fault.message}}, fault.headers)

    # -- internals --------------------------------------------------------------------------------

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.matches(method, path):
                    fault.times -= 1
                    return fault
        return None

    def _dispatch(self, request: RecordedRequest) -> Response | None:
        """The answer to one request; ``None`` when an injected fault drops the connection."""
        if self.latency:
            time.sleep(self.latency)
        fault = self._take_fault(request.method, request.path)
        if fault is None or fault.after:
            try:
                response = self.route(request)
            except Exception as exc:  # an emulator bug must show as a 500, not a hung client
                response = Response.json(500, {"error": {"message": f"emulator error: {exc!r}"}})
        if fault is not None:
            if fault.delay:
                time.sleep(fault.delay)
            if fault.drop:
                self._log_request(request, 0)
                return None
            response = self.error(fault, request)
        self._log_request(request, response.status)
        return response

    def _log_request(self, request: RecordedRequest, status: int) -> None:
        with self._lock:
            self._requests.append(
                RecordedRequest(
                    request.method,
                    request.path,
                    request.query,
                    request.headers,
                    request.body,
                    status,
                    request.received,
                )
            )


def _make_handler(server: EmulatorServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body leave in separate writes; with Nagle's algorithm on, a kept-alive
        # connection then waits for the client's delayed ACK, about 40 ms per request.
        disable_nagle_algorithm = True

        def _handle(self) -> None:
            received = time.time()
            parsed = urllib.parse.urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            request = RecordedRequest(
                method=self.command,
                path=parsed.path,
                query=urllib.parse.parse_qs(parsed.query, keep_blank_values=True),
                headers={k.lower(): v for k, v in self.headers.items()},
                body=body,
                received=received,
            )
            response = server._dispatch(request)
            if response is None:  # a dropped connection: no status line, just a closed socket
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.send_response(response.status)
            for key, value in response.headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(response.body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(response.body)

        # http.server dispatches on these exact names.
        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _handle  # noqa: N815

        def log_message(self, format: str, *args: Any) -> None:
            # The request log is the record; stderr noise would drown test and demo output.
            pass

    return Handler
