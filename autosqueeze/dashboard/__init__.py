"""The live dashboard and the static HTML report: one page, drawn from one study view.

The page (``page.html`` + ``app.js``) builds every figure with plotly.js from the JSON of
``study_view``. Served live, it polls ``api/study``; as a report, the view and plotly.js
are inlined, so the file works offline and can be shared. Nothing loads from a CDN.
"""

from __future__ import annotations

import json
import sys
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files
from pathlib import Path
from typing import Any

from autosqueeze.config import StudyConfig
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


def make_server(
    config: StudyConfig, config_arg: str | Path, host: str, port: int
) -> ThreadingHTTPServer:
    """A read-only HTTP server for the dashboard (GET only; nothing is ever written)."""
    reader = StudyReader(config, config_arg)
    try:
        reader.view()  # replay the storage and fill the cache now, not on the first poll
    except Exception:  # noqa: S110 - the page reports storage trouble on its polls
        pass
    page = render_page(None).encode("utf-8")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            path = self.path.split("?", 1)[0]
            if path in ("/", "/index.html"):
                self._send(200, "text/html; charset=utf-8", page)
            elif path == "/plotly.min.js":
                self._send(200, "text/javascript", plotly_js().encode("utf-8"), cache=True)
            elif path == "/api/study":
                try:
                    status, body = 200, reader.view()
                except Exception as exc:  # a storage hiccup must not take the page down
                    status = 500
                    body = {"status": "error", "message": f"{type(exc).__name__}: {exc}"}
                self._send(status, "application/json", json.dumps(body).encode("utf-8"))
            elif path == "/favicon.ico":
                self._send(204, "image/x-icon", b"")
            else:
                self._send(404, "text/plain", b"not found")

        def _send(self, status: int, kind: str, body: bytes, cache: bool = False) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "max-age=3600" if cache else "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass  # quiet: the terminal shows the search, not every poll

    try:
        return ThreadingHTTPServer((host, port), Handler)
    except OSError as exc:
        raise UserError(f"--port: cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def serve(config: StudyConfig, config_arg: str | Path, host: str, port: int) -> None:
    server = make_server(config, config_arg, host, port)
    print(
        f"autosqueeze dashboard for {config.name}: http://{host}:{server.server_port}/ "
        "(read-only; Ctrl-C stops it)",
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
