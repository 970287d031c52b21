"""The dashboard's HTTP server: a small read-only Starlette app served by uvicorn (h11).

Why not ``http.server``: its one thread per connection and its per-read timeout let a few
dozen clients that send a byte every few seconds hold every slot. On an event loop an idle
connection costs little, and here each request must arrive whole (request line, headers and
body) within ``request_timeout``, at most ``MAX_CONNECTIONS`` are held at once, and the
kernel queues up to ``BACKLOG`` connections before they are accepted.
"""

from __future__ import annotations

import hmac
import json
import socket
import threading
from pathlib import Path
from typing import Any

import h11
import uvicorn
from starlette.applications import Starlette
from starlette.datastructures import Headers, QueryParams
from starlette.middleware import Middleware
from starlette.responses import Response
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from autosqueeze.common.errors import UserError
from autosqueeze.settings.config import StudyConfig, masked
from autosqueeze.views.dashboard import LOOPBACK, plotly_js, render_page
from autosqueeze.views.study_view import StudyReader

REQUEST_TIMEOUT_S = 10.0  # to send one whole request, headers and body; then the socket closes
KEEP_ALIVE_S = 5  # an idle connection between two requests
MAX_CONNECTIONS = 500  # held at once; a connection beyond closes unanswered (well under ulimit -n)
BACKLOG = 1024  # connections the kernel queues for the server to accept
MAX_HEADER_BYTES = 64 * 1024  # request line and headers; beyond: 400, 414 or 431


def make_app(config: StudyConfig, config_arg: str | Path, token: str | None = None) -> Starlette:
    """The dashboard as an ASGI app: GET and HEAD of five paths; nothing is ever written."""
    reader = StudyReader(config, config_arg)
    try:
        reader.view()  # replay the storage and fill the cache now, not on the first poll
    except Exception:  # noqa: BLE001 - the page reports storage trouble on its polls
        pass
    page = render_page(None)
    if token is not None:  # the page's own script request carries it too
        page = page.replace('src="plotly.min.js"', f'src="plotly.min.js?token={token}"')
    page_bytes = page.encode("utf-8")
    one_view = threading.Lock()  # the reader's cache is not for two threads at once

    async def index(_: Any) -> Response:
        return _answer(200, "text/html; charset=utf-8", page_bytes)

    async def plotly(_: Any) -> Response:
        return _answer(200, "text/javascript", plotly_js().encode("utf-8"), cache=True)

    def study(_: Any) -> Response:  # a plain def: Starlette runs it in a thread, off the loop
        with one_view:
            try:
                status, view = 200, reader.view()
            except Exception as exc:  # noqa: BLE001 - a storage hiccup must not take the page down
                status = 500
                view = {"status": "error", "message": masked(f"{type(exc).__name__}: {exc}")}
        return _answer(status, "application/json", json.dumps(view).encode())

    async def favicon(_: Any) -> Response:
        return _answer(204, "image/x-icon", b"")

    routes = [
        Route("/", index),
        Route("/index.html", index),
        Route("/plotly.min.js", plotly),
        Route("/api/study", study),
        Route("/favicon.ico", favicon),
    ]
    gate = Middleware(_Gate, token=token)
    return Starlette(routes=routes, middleware=[gate])


class _Gate:
    """What every request must pass before any route, in order (h11 has already refused
    two Host headers with 400: a check and a proxy could read different names):

    - a target and headers under ``MAX_HEADER_BYTES`` (414, 431), even when they arrive
      in one piece (h11 counts only what is still incomplete);
    - a Host naming loopback (403): a web page the user visits cannot rebind its own name to
      loopback and read the study; served beyond loopback, the ``token`` in the query
      instead (``?token=`` on the page, which forwards it);
    - GET or HEAD (405, with Allow): the dashboard only reads."""

    def __init__(self, app: Any, token: str | None) -> None:
        self.app, self.token = app, token

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        refusal = self.refusal(scope) if scope["type"] == "http" else None
        await (self.app if refusal is None else refusal)(scope, receive, send)

    def refusal(self, scope: dict) -> Response | None:
        target = len(scope["raw_path"]) + len(scope["query_string"])
        if target > MAX_HEADER_BYTES:
            return _answer(414, "text/plain", b"URI too long")
        if target + sum(len(k) + len(v) for k, v in scope["headers"]) > MAX_HEADER_BYTES:
            return _answer(431, "text/plain", b"request headers too large")
        if self.token is not None:
            given = QueryParams(scope["query_string"]).get("token", "")
            allowed = hmac.compare_digest(given.encode(), self.token.encode())
        else:
            host = Headers(scope=scope).get("host", "")
            name = host.rsplit(":", 1)[0].strip("[]").lower()
            allowed = name in LOOPBACK
        if not allowed:
            return _answer(403, "text/plain", b"forbidden")
        if scope["method"] not in ("GET", "HEAD"):
            return _answer(405, "text/plain", b"read-only", allow="GET, HEAD")
        return None


def _answer(status: int, kind: str, body: bytes, cache: bool = False, **headers: str) -> Response:
    headers["Cache-Control"] = "max-age=3600" if cache else "no-store"
    return Response(body, status, headers, media_type=kind)


class _WholeRequestH11(H11Protocol):
    """uvicorn's h11 protocol with the deadline it lacks: uvicorn times out idle keep-alive
    connections only, so a client that trickles a request byte by byte would hold its
    connection for ever. Here the clock starts when the connection opens (or at a later
    request's first byte) and stops once the request has arrived whole."""

    request_timeout = REQUEST_TIMEOUT_S
    _deadline: Any = None

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        if len(self.connections) > MAX_CONNECTIONS:
            transport.close()  # beyond the limit: closed at once, unanswered
        else:
            self._deadline = self.loop.call_later(self.request_timeout, transport.close)

    def data_received(self, data: bytes) -> None:
        if self._deadline is None:  # the next request on a kept-alive connection
            self._deadline = self.loop.call_later(self.request_timeout, self.transport.close)
        super().data_received(data)
        if self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):  # whole, or refused
            self._deadline.cancel()
            self._deadline = None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        super().connection_lost(exc)


class DashboardServer:
    """uvicorn on a socket bound here, so that a busy ``--port`` is a UserError and port 0
    is known at once; shaped like socketserver's servers: ``serve_forever`` blocks until
    Ctrl-C or SIGTERM (uvicorn stops, then raises the signal again) or ``shutdown``."""

    def __init__(self, app: Starlette, host: str, port: int, request_timeout: float) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            self.socket = socket.create_server((host, port), family=family, backlog=BACKLOG)
        except OSError as exc:
            raise UserError(
                f"--port: cannot listen on {host}:{port}: {exc.strerror or exc}"
            ) from None
        self.server_port = self.socket.getsockname()[1]
        protocol = type("Protocol", (_WholeRequestH11,), {"request_timeout": request_timeout})
        config = uvicorn.Config(
            app,
            http=protocol,
            limit_concurrency=MAX_CONNECTIONS,  # requests beyond answer 503
            backlog=BACKLOG,
            timeout_keep_alive=KEEP_ALIVE_S,
            h11_max_incomplete_event_size=MAX_HEADER_BYTES,
            timeout_graceful_shutdown=5,  # Ctrl-C waits this long at most for a poll
            lifespan="off",
            proxy_headers=False,  # nothing sits in front of it: X-Forwarded-* are a client's
            server_header=False,
            access_log=False,  # quiet: the terminal shows the search, not every poll
            log_config=None,  # leave the process's logging alone
            log_level="error",  # a malformed request is the client's business
        )
        self._server = uvicorn.Server(config)
        self._stopped = threading.Event()

    def serve_forever(self) -> None:
        try:
            self._server.run(sockets=[self.socket])
        finally:
            self._stopped.set()

    def shutdown(self) -> None:
        """Stop ``serve_forever`` (running in another thread) and wait for it."""
        self._server.should_exit = True
        self._stopped.wait()

    def server_close(self) -> None:
        self.socket.close()


def make_server(
    config: StudyConfig,
    config_arg: str | Path,
    host: str,
    port: int,
    token: str | None = None,
    request_timeout: float = REQUEST_TIMEOUT_S,
) -> DashboardServer:
    """A read-only dashboard server on ``host:port`` (see ``_Gate`` for who is answered)."""
    app = make_app(config, config_arg, token)
    return DashboardServer(app, host, port, request_timeout)
