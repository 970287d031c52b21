"""The live dashboard and the static HTML report: one page, drawn from one study view.

The page (``page.html`` + ``app.js``) builds every figure with plotly.js from the JSON of
``study_view``. Served live, it polls ``api/study``; as a report, the view and plotly.js
are inlined, so the file works offline and can be shared. Nothing loads from a CDN.
"""

from __future__ import annotations

import hmac
import json
import secrets
import sys
import threading
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from autosqueeze.config import StudyConfig, masked
from autosqueeze.errors import UserError
from autosqueeze.study_view import StudyReader, open_existing, study_view


def render_page(view: dict[str, Any] | None) -> str:
    """The page: live (``view`` None: it fetches ``api/study``) or a self-contained report."""
    live = view is None
    pieces = {
        "__TITLE__": _escape_html(view["name"]) if view else "dashboard",
        "__DATA__": "null" if live else _script_safe(json.dumps(view)),
        "__APP__": ("window.AUTOSQUEEZE_LIVE = true;\n" if live else "") + _asset("app.js"),
    }
    html = _asset("page.html")
    for placeholder, text in pieces.items():
        html = html.replace(placeholder, text)
    plotly = '</script><script src="plotly.min.js">' if live else _script_safe(plotly_js())
    return html.replace("__PLOTLY__", plotly)


def write_report(config: StudyConfig, config_arg: str | Path, output: Path) -> int:
    view = study_view(config, config_arg, open_existing(config))
    if view["status"] == "missing":
        raise UserError(view["message"])
    html = render_page(view)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(html, encoding="utf-8")
    return len(view.get("trials", []))


LOOPBACK = {"127.0.0.1", "localhost", "::1"}
MAX_CONNECTIONS = 64  # at once; more are closed unanswered
REQUEST_TIMEOUT_S = 10.0  # a client that sends nothing (or half a request) for this long


def make_server(
    config: StudyConfig, config_arg: str | Path, host: str, port: int, token: str | None = None
) -> ThreadingHTTPServer:
    """A read-only HTTP server for the dashboard (GET and HEAD; nothing is ever written).

    It answers only requests whose Host header names loopback (a web page the user visits
    cannot rebind its own name to it and read the study); served beyond loopback, only
    requests carrying ``token`` (``?token=`` on the page, which forwards it)."""
    reader = StudyReader(config, config_arg)
    try:
        reader.view()  # replay the storage and fill the cache now, not on the first poll
    except Exception:  # noqa: S110 - the page reports storage trouble on its polls
        pass
    page = render_page(None)
    if token is not None:  # the page's own script request carries it too
        page = page.replace('src="plotly.min.js"', f'src="plotly.min.js?token={token}"')
    page_bytes = page.encode("utf-8")

    class Handler(BaseHTTPRequestHandler):
        timeout = REQUEST_TIMEOUT_S
        default_request_version = "HTTP/1.0"  # a malformed request's error has a status line

        def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
            self._answer(with_body=False)

        def do_GET(self) -> None:  # noqa: N802
            self._answer(with_body=True)

        def _answer(self, with_body: bool) -> None:
            path, _, query = self.path.partition("?")
            if not self._allowed(query):
                self._send(403, "text/plain", b"forbidden", with_body)
            elif path in ("/", "/index.html"):
                self._send(200, "text/html; charset=utf-8", page_bytes, with_body)
            elif path == "/plotly.min.js":
                body = plotly_js().encode("utf-8")
                self._send(200, "text/javascript", body, with_body, cache=True)
            elif path == "/api/study":
                try:
                    status, view = 200, reader.view()
                except Exception as exc:  # a storage hiccup must not take the page down
                    status = 500
                    view = {"status": "error", "message": masked(f"{type(exc).__name__}: {exc}")}
                self._send(status, "application/json", json.dumps(view).encode(), with_body)
            elif path == "/favicon.ico":
                self._send(204, "image/x-icon", b"", with_body)
            else:
                self._send(404, "text/plain", b"not found", with_body)

        def _allowed(self, query: str) -> bool:
            if token is not None:
                given = parse_qs(query).get("token", [""])[0]
                return hmac.compare_digest(given.encode(), token.encode())
            name = (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]").lower()
            return name in LOOPBACK

        def _send(
            self, status: int, kind: str, body: bytes, with_body: bool, cache: bool = False
        ) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "max-age=3600" if cache else "no-store")
            self.end_headers()
            if with_body:
                self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass  # quiet: the terminal shows the search, not every poll

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

        def process_request(self, request: Any, client_address: Any) -> None:
            if not self.slots.acquire(blocking=False):
                self.shutdown_request(request)  # too many at once: closed, unanswered
                return
            super().process_request(request, client_address)

        def process_request_thread(self, request: Any, client_address: Any) -> None:
            try:
                super().process_request_thread(request, client_address)
            finally:
                self.slots.release()

        def handle_error(self, request: Any, client_address: Any) -> None:
            if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
                super().handle_error(request, client_address)  # a client that left: quiet

    try:
        return Server((host, port), Handler)
    except OSError as exc:
        raise UserError(f"--port: cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def serve(
    config: StudyConfig, config_arg: str | Path, host: str, port: int, remote: bool = False
) -> None:
    """Serve on ``host``; beyond loopback only with ``remote`` (``--allow-remote``), and
    then only to requests carrying the printed URL's token."""
    beyond = host not in LOOPBACK
    if beyond and not remote:
        raise UserError(
            f"--host {host}: the dashboard shows the whole study to whoever reaches it; "
            "serving beyond loopback needs --allow-remote (each request must then carry "
            "the token in the printed URL)."
        )
    token = secrets.token_urlsafe(16) if beyond else None
    server = make_server(config, config_arg, host, port, token)
    address = f"http://{host}:{server.server_port}/" + (f"?token={token}" if token else "")
    print(
        f"autosqueeze dashboard for {config.name}: {address} (read-only; Ctrl-C stops it)",
        file=sys.stderr,
    )
    if beyond:
        print(
            f"warning: serving on {host}, beyond this machine: anyone with the URL above "
            "can read the study.",
            file=sys.stderr,
        )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


@cache
def plotly_js() -> str:
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def _asset(name: str) -> str:
    return files(__package__).joinpath(name).read_text(encoding="utf-8")


def _script_safe(text: str) -> str:
    return text.replace("</script", "<\\/script").replace("<!--", "<\\!--")


def _escape_html(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
