"""A small HTTP layer for the simulator: routes, requests, responses, one threaded server.

The standard library's server is enough for loopback traffic and starts in milliseconds; the
APIs (lambda_api.Api, runpod_api.Api, hf_hub) answer each Request with a Response.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

log = logging.getLogger("gpu_session.sim.http")


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-cased names
    body: bytes
    params: dict[str, str] = field(default_factory=dict)  # from the route pattern

    def json(self):
        try:
            return json.loads(self.body or b"null")
        except ValueError:
            return None


@dataclass
class Response:
    status: int = 200
    body: bytes | Callable = b""  # a callable streams: it gets the socket file to write to
    headers: dict[str, str] = field(default_factory=dict)


class Drop(Exception):
    """Raised by a handler to close the connection without an answer."""


def json_response(payload, status: int = 200, headers: dict | None = None) -> Response:
    return Response(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})})


Handler = Callable[[Request], Response]


class Router:
    def __init__(self):
        self._routes: list[tuple[str, re.Pattern, Handler]] = []

    def add(self, method: str, pattern: str, handler: Handler) -> None:
        """pattern: a path with {name} (one segment) or {name:path} (the rest) placeholders."""
        rx = re.sub(r"\{(\w+):path\}", r"(?P<\1>.+)", pattern)
        rx = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", rx)
        self._routes.append((method, re.compile(f"^{rx}$"), handler))

    def dispatch(self, req: Request) -> Response:
        allowed = False
        for method, rx, handler in self._routes:
            m = rx.match(req.path)
            if m:
                if method != req.method and not (method == "GET" and req.method == "HEAD"):
                    allowed = True
                    continue
                req.params = m.groupdict()
                return handler(req)
        if allowed:
            return json_response({"error": "method not allowed"}, 405)
        return json_response({"error": f"no route for {req.method} {req.path}"}, 404)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    router: Router  # set on the subclass per server

    def log_message(self, fmt, *args):  # requests go to our logger, never stderr
        log.debug("%s " + fmt, self.client_address[0], *args)

    def _handle(self):
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        req = Request(
            method=self.command,
            path=url.path,
            query={k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()},
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
        )
        try:
            resp = self.router.dispatch(req)
        except Drop:
            self.close_connection = True
            self.connection.shutdown(2)
            return
        except Exception:  # a simulator bug must still answer, as a real API's 500 would
            log.exception("simulator error on %s %s", req.method, req.path)
            resp = json_response({"error": "simulator internal error"}, 500)
        try:
            self._answer(resp)
        except ConnectionError as e:  # the client gave up (its timeout) or closed: one line, no traceback
            self.close_connection = True
            log.info(
                "client %s hung up before the answer to %s %s was sent (%s)",
                self.client_address[0], req.method, req.path, type(e).__name__,
            )  # fmt: skip

    def _answer(self, resp: Response) -> None:
        self.send_response(resp.status)
        streaming = callable(resp.body)
        for k, v in resp.headers.items():
            self.send_header(k, v)
        if not streaming and "Content-Length" not in resp.headers:
            self.send_header("Content-Length", str(len(resp.body)))
        self.end_headers()
        if self.command == "HEAD":
            return
        if streaming:
            resp.body(self.wfile)
        else:
            self.wfile.write(resp.body)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _handle


class _Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        """A client that hung up anywhere else (reading its request, say) is one line too; other errors
        keep the standard traceback."""
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError):
            log.info("client %s hung up (%s)", client_address[0], type(exc).__name__)
        else:
            super().handle_error(request, client_address)


class Server:
    """Serves one router on one or more addresses, all on the same port."""

    def __init__(self, router: Router, addresses: list[str], port: int = 0):
        handler = type("Handler", (_Handler,), {"router": router})
        self._servers: list[ThreadingHTTPServer] = []
        for addr in addresses:
            srv = _Server((addr, port), handler)
            srv.daemon_threads = True
            port = srv.server_address[1]
            self._servers.append(srv)
        self.port = port
        self._threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in self._servers]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def close(self) -> None:
        for s in self._servers:
            s.shutdown()
            s.server_close()
