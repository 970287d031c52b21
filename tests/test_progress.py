"""Progress on a log: whole lines, and one at least every ``LOG_EVERY_S`` while nothing
advances (a long trial or calibration pass), so a CI or Slurm log never goes quiet."""

from __future__ import annotations

import io
import threading

from autosqueeze.common import progress


def test_a_log_gets_whole_lines_and_a_line_while_nothing_advances(monkeypatch):
    written = io.StringIO()
    heartbeat = threading.Event()

    class Log(io.StringIO):
        def isatty(self) -> bool:
            return False

        def write(self, text: str) -> int:
            if "2/5" in text:
                heartbeat.set()  # a line with no update() since the last one
            return written.write(text)

    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.05)
    monkeypatch.setattr(progress.sys, "stderr", Log())
    bar = progress.progress_bar(total=5, desc="phase", unit="step")
    bar.update(2)
    before = written.getvalue().count("\n")
    assert heartbeat.wait(timeout=30), written.getvalue()
    assert written.getvalue().count("\n") > before
    bar.update(3)
    bar.close()
    lines = written.getvalue().splitlines()
    assert "\r" not in written.getvalue()
    assert lines[0].startswith("phase:") and "0/5" in lines[0]
    assert "5/5" in lines[-1]


def test_off_means_silent(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr(progress.sys, "stderr", log)
    with progress.progress_bar(total=3, desc="phase", unit="step", enabled=False) as bar:
        bar.update(3)
    assert log.getvalue() == ""
