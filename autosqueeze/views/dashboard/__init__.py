"""The live dashboard and the static HTML report: one page, drawn from one study view.

The page (``page.html`` + ``app.js``) builds every figure with plotly.js from the JSON of
``study_view``. Served live (``server.py``), it polls ``api/study``; as a report, the view
and plotly.js are inlined, so the file works offline and can be shared. Nothing loads from a
CDN.
"""

from __future__ import annotations

import json
import secrets
import sys
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any

from autosqueeze.common.errors import UserError
from autosqueeze.settings.config import StudyConfig
from autosqueeze.views.study_view import open_existing, study_view


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
    from autosqueeze.views.dashboard.server import make_server  # uvicorn: only when serving

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
