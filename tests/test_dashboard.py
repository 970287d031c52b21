"""The dashboard server and the HTML report, on studies that are missing, empty, finished
and being written; and a real headless Chromium that clicks a point of the Pareto plot."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO, SLOW_METRIC, study_config, write_yaml

from autosqueeze.cli import main
from autosqueeze.compression.techniques import TECHNIQUES
from autosqueeze.settings.config import load_config
from autosqueeze.studies.study import open_study
from autosqueeze.views.dashboard.server import make_server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def start(config_path: Path, **options):
    server = make_server(load_config(config_path), config_path, "127.0.0.1", 0, **options)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_port}/"


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dash")
    path = write_yaml(
        folder / "study.yaml",
        study_config(folder, search={"trials": 12, "seed": 0, "output_dir": str(folder / "run")}),
    )
    assert main(["search", str(path), "--no-progress"]) == 0
    return path


def test_unknown_and_empty_studies_give_a_message_not_a_crash(make_config, tmp_path):
    config = make_config()
    server, url = start(config)
    try:
        status, body = get(url + "api/study")
        view = json.loads(body)
        assert status == 200 and view["status"] == "missing"
        assert (
            "No study named 'digits-test'" in view["message"]
            and "autosqueeze search" in (view["message"])
        )
        assert not (tmp_path / "run" / "study.log").exists()  # reading creates nothing
        open_study(load_config(config), create=True)  # now it exists, with no trials
        view = json.loads(get(url + "api/study")[1])
        assert (
            view["status"] == "empty"
            and view["trials"] == []
            and "no trials yet" in (view["message"])
        )
        assert get(url)[0] == 200 and get(url + "plotly.min.js")[0] == 200
        assert get(url + "nope")[0] == 404
    finally:
        server.shutdown()


@pytest.mark.slow  # the long tests: python -m pytest -m slow
@pytest.mark.parametrize("storage", ["journal", "sqlite"])
def test_polling_while_a_search_writes_holds_no_lock(tmp_path, storage):
    (tmp_path / "slow_metric_dash.py").write_text(SLOW_METRIC)
    url_or_path = str(tmp_path / "s.log") if storage == "journal" else f"sqlite:///{tmp_path}/s.db"
    config = write_yaml(
        tmp_path / "s.yaml",
        study_config(
            tmp_path,
            task={"metric": "slow_metric_dash:metric"},
            search={"trials": 6, "output_dir": str(tmp_path / "run"), "storage": url_or_path},
        ),
    )
    args = ["search", str(config), "--no-progress", "--no-sensitivity"]  # no pass: its probes
    search = subprocess.Popen(  # would each wait on the slow metric
        [sys.executable, "-m", "autosqueeze", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    server, url = start(config)
    seen = set()
    try:
        while search.poll() is None:
            status, body = get(url + "api/study")
            assert status == 200, body
            view = json.loads(body)
            seen.add(sum(t["state"] == "COMPLETE" for t in view.get("trials", [])))
            time.sleep(0.1)
    finally:
        server.shutdown()
    _, err = search.communicate()
    assert search.returncode == 0, err.decode()  # the writer never met a lock
    assert len(seen) > 2  # the page saw the study grow


def test_report_is_one_self_contained_file(searched, tmp_path, capsys):
    out = tmp_path / "report.html"
    assert main(["report", str(searched), "-o", str(out)]) == 0
    html = out.read_text()
    assert "Plotly" in html and "<script src=" not in html  # plotly.js inlined, no CDN
    assert "http://" not in html.split("window.AUTOSQUEEZE_DATA")[1][:2000]
    data = json.loads(html.split("window.AUTOSQUEEZE_DATA = ")[1].split(";</script>")[0])
    assert len(data["trials"]) == 12 and data["front"]
    capsys.readouterr()


@pytest.mark.slow  # the long tests: python -m pytest -m slow
@pytest.mark.skipif(
    not Path(CHROMIUM).exists() and not os.environ.get("CI"),
    reason="needs Debian's chromium (.ci/run installs it)",
)
def test_browser_renders_one_point_per_trial_and_click_shows_the_plan(searched):
    from playwright.sync_api import sync_playwright

    server, url = start(searched)
    trials = {t.number: t for t in open_study(load_config(searched), create=False).trials}
    artifacts = REPO / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=CHROMIUM,
                args=[
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--no-first-run",
                ],
            )
            page = browser.new_page(viewport={"width": 1500, "height": 1400})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url)
            plot = "#pareto-size_bytes-latency_ms"  # int8 and int8-dynamic share metric and size
            page.wait_for_selector(f"{plot} .scatterlayer .point", timeout=30000)
            counts = page.evaluate(
                "id => document.getElementById(id).data.map(t => t.x.length)", plot[1:]
            )
            complete = [n for n, t in trials.items() if t.state.name == "COMPLETE"]
            assert sum(counts) == len(complete)  # a timed point per timed trial
            assert page.locator(f"{plot} .scatterlayer .point").count() == len(complete)
            # metric and size: every finished trial, those stopped before timing included
            both = "pareto-metric-size_bytes"
            counts = page.evaluate(
                "id => document.getElementById(id).data.map(t => t.x.length)", both
            )
            assert sum(counts) == 12 > len(complete)
            # click the point that stands furthest from the others (markers can overlap):
            # the heatmap must show that trial's plan
            centers = page.evaluate(
                """id => { const el = document.getElementById(id), out = [];
                el.querySelectorAll('.scatterlayer .trace').forEach((trace, i) =>
                  trace.querySelectorAll('.point').forEach((point, j) => {
                    const r = point.getBoundingClientRect();
                    out.push([el.data[i].customdata[j], r.x + r.width / 2, r.y + r.height / 2]);
                  }));
                return out; }""",
                plot[1:],
            )

            def room(c):
                return min((c[1] - o[1]) ** 2 + (c[2] - o[2]) ** 2 for o in centers if o[0] != c[0])

            number, x, y = max(centers, key=room)
            page.mouse.move(x, y)
            page.mouse.click(x, y)
            page.wait_for_function(
                f"document.getElementById('plan-heatmap').dataset.trial === '{number}'",
                timeout=10000,
            )
            assert f"Trial {number}" in page.inner_text("#selected-title")
            heatmap = page.evaluate(
                "(() => { const d = document.getElementById('plan-heatmap').data[0];"
                " return {x: d.x, z: d.z, text: d.text}; })()"
            )
            assert heatmap["x"] == list(TECHNIQUES)  # the knobs as registered, none copied
            column = heatmap["x"].index("bits")
            plan = json.loads(trials[number].user_attrs["plan"])["layers"]
            bits = [str(plan.get(layer, {}).get("bits", 32)) for layer in sorted(plan)]
            assert sorted(row[column] for row in heatmap["text"]) == sorted(bits)
            strengths = {row[column]: z[column] for row, z in zip(heatmap["text"], heatmap["z"])}
            assert all(s == pytest.approx(1 - int(b) / 32) for b, s in strengths.items())
            assert f"--trial {number} -o" in page.inner_text("#selected-cli")
            page.click("#trials th[data-key='size_bytes']")  # the table sorts
            first = page.inner_text("#trials tbody tr:first-child td:nth-child(1)")
            sized = [n for n, t in trials.items() if "size_bytes" in t.user_attrs]  # pruned too
            smallest = min(sized, key=lambda n: trials[n].user_attrs["size_bytes"])
            assert first == str(smallest)
            # the sensitivity table: layers in model order x every value probed
            heat = page.evaluate(
                "(() => { const d = document.getElementById('sensitivity-heatmap').data[0];"
                " return {x: d.x, y: d.y, text: d.text}; })()"
            )
            stored = open_study(load_config(searched), create=False).user_attrs["sensitivity"]
            assert heat["y"] == [
                "features.0",
                "features.2",
                "features.5",
                "classifier.1",
                "classifier.3",
            ]
            column = heat["x"].index("bits=2")
            assert float(heat["text"][0][column]) == pytest.approx(
                stored["drops"]["features.0.bits=2"], abs=1e-4
            )
            knobs = [c.partition("=")[0] for c in heat["x"]]  # grouped by knob, values in order
            assert knobs == sorted(knobs)
            widths = [int(c.partition("=")[2]) for c in heat["x"] if c.startswith("bits=")]
            assert widths == sorted(widths)
            for key in stored.get("skipped", {}):  # a weaker value broke the layer
                group, _, knob = key.partition("=")[0].rpartition(".")
                cell = f"{knob}={key.partition('=')[2].strip(chr(34))}"
                text = heat["text"][heat["y"].index(group)][heat["x"].index(cell)]
                assert text.startswith("more (not probed")
            page.screenshot(path=str(artifacts / "dashboard.png"), full_page=True)
            assert errors == []
            browser.close()
    finally:
        server.shutdown()


def test_a_cached_view_equals_a_fresh_one_as_the_study_grows(tmp_path, capsys):
    from autosqueeze.views.study_view import StudyReader, study_view

    path = write_yaml(tmp_path / "s.yaml", study_config(tmp_path, search={"trials": 6}))
    quick = ["--no-progress", "--no-sensitivity"]  # the view's trials are what is compared
    assert main(["search", str(path), *quick]) == 0
    config = load_config(path)
    reader = StudyReader(config, path)

    def same(cached: dict, fresh: dict) -> None:
        cached, fresh = dict(cached), dict(fresh)
        cached.pop("updated"), fresh.pop("updated")
        assert cached == fresh

    same(reader.view(), study_view(config, path, open_study(config, create=False)))
    assert main(["search", str(path), "--trials", "10", *quick]) == 0
    later = reader.view()  # extends what it kept from the first poll
    same(later, study_view(config, path, open_study(config, create=False)))
    assert len(later["trials"]) == 10 and later["hypervolume"]
    assert [p[0] for p in later["hypervolume"]] == sorted(
        t["number"] for t in later["trials"] if t["feasible"]
    )
    capsys.readouterr()


def _raw(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(request)
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def test_the_dashboard_answers_only_loopback_names_and_tokens(searched, tmp_path, capsys):
    server, url = start(searched)
    port = server.server_port
    try:
        ok = _raw(port, b"GET /api/study HTTP/1.0\r\nHost: 127.0.0.1:%d\r\n\r\n" % port)
        assert _status(ok) == 200 and b'"trials"' in ok
        rebound = _raw(port, b"GET /api/study HTTP/1.0\r\nHost: evil.example:%d\r\n\r\n" % port)
        assert _status(rebound) == 403 and b"trials" not in rebound
        head = _raw(port, b"HEAD / HTTP/1.0\r\nHost: localhost\r\n\r\n")
        assert _status(head) == 200 and head.endswith(b"\r\n\r\n")  # no body
        assert _status(_raw(port, b"GARBAGE\r\n\r\n")) == 400
        idle = socket.create_connection(("127.0.0.1", port))  # sends half a request, stays
        idle.sendall(b"GET / HTTP/1.1\r\n")
        assert get(url)[0] == 200  # others are still answered meanwhile
        idle.close()
    finally:
        server.shutdown()
        server.server_close()
    assert "Traceback" not in capsys.readouterr().err  # a client that left is not an error

    token_server = make_server(load_config(searched), searched, "127.0.0.1", 0, token="s3cret")
    threading.Thread(target=token_server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{token_server.server_port}/"
    try:
        assert get(base + "api/study")[0] == 403
        assert get(base + "api/study?token=wrong")[0] == 403
        status, page = get(base + "?token=s3cret")
        assert status == 200 and b'src="plotly.min.js?token=s3cret"' in page
        assert get(base + "api/study?token=s3cret")[0] == 200
    finally:
        token_server.shutdown()
        token_server.server_close()
    code = main(["dashboard", str(searched), "--host", "0.0.0.0", "--port", "0"])
    assert code == 2 and "--allow-remote" in capsys.readouterr().err


def test_one_host_header_and_only_reading_methods(make_config):
    server, url = start(make_config())
    port = server.server_port
    try:
        loopback = b"Host: 127.0.0.1:%d\r\n" % port
        two = _raw(port, b"GET /api/study HTTP/1.0\r\n" + loopback + b"Host: evil.example\r\n\r\n")
        assert _status(two) == 400 and b"status" not in two
        for method in (b"DELETE", b"PUT", b"POST", b"PATCH", b"OPTIONS"):
            for path in (b"/", b"/api/study", b"/nope"):
                request = method + b" " + path + b" HTTP/1.0\r\n" + loopback
                answer = _raw(port, request + b"Content-Length: 2\r\n\r\n{}")
                assert _status(answer) == 405, (method, path)
                assert b"\r\nallow: get, head\r\n" in answer.lower()
        # a stranger learns nothing, not even which methods exist
        foreign = _raw(port, b"DELETE / HTTP/1.0\r\nHost: evil.example\r\n\r\n")
        assert _status(foreign) == 403
    finally:
        server.shutdown()


def _trickle(port: int, seconds: float) -> float | None:
    """Connect and send a header a byte at a time, 0.2 s apart, until the server hangs up:
    the seconds from connecting to that (None: still open after ``seconds``)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:  # 0.2: the pace
        sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n")
        while time.monotonic() - started < seconds:
            try:
                sock.sendall(b"X")
                if sock.recv(1024) == b"":
                    return time.monotonic() - started
            except TimeoutError:
                continue
            except OSError:  # reset
                return time.monotonic() - started
    return None


def test_slow_clients_neither_hold_the_server_nor_stay_for_ever(make_config):
    server, url = start(make_config())
    port = server.server_port
    slow = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(100)]
    stop = threading.Event()

    def trickle() -> None:  # a byte each second on every slow socket, until the end
        while not stop.wait(1):
            for sock in slow:
                try:
                    sock.sendall(b"X")
                except OSError:
                    pass

    for sock in slow:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
    threading.Thread(target=trickle, daemon=True).start()
    try:
        assert get(url + "api/study")[0] == 200  # answered meanwhile (urlopen waits 30 s)
    finally:
        stop.set()
        for sock in slow:
            sock.close()
        server.shutdown()

    server, _ = start(make_config(), request_timeout=2)  # the whole request, not each read
    try:
        took = _trickle(server.server_port, seconds=60)
        assert took is not None and took >= 2
    finally:
        server.shutdown()
