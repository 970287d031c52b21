"""Progress a user can see wherever the output goes: tqdm's bar on a terminal; on a log (CI,
Slurm, ``nohup``: standard error is not a terminal) a plain line at least every
``LOG_EVERY_S`` seconds while the phase runs, and one when it ends. tqdm alone prints nothing
there (its bar is off when the output is not a terminal) or, forced on, rewrites one line
with carriage returns: a ConvNeXt-T search printed nothing for 15 minutes before it was
stopped."""

from __future__ import annotations

import sys
import threading
from typing import Any

from tqdm import tqdm

LOG_EVERY_S = 60.0
"""The longest a log goes without a line while a phase runs."""


def progress_bar(*, desc: str, unit: str, enabled: bool = True, **options: Any) -> tqdm:
    """A tqdm bar (``total``, ``initial`` and the rest as tqdm takes them) that shows on a
    terminal, writes lines to a log (the module docstring), and is silent when not
    ``enabled``."""
    if not enabled:
        return tqdm(disable=True, **options)
    if sys.stderr.isatty():
        return tqdm(desc=desc, unit=unit, dynamic_ncols=True, **options)
    log = _NoBlankWrites(sys.stderr)
    return _LogLines(  # maxinterval too: tqdm's monitor would refresh every 10 s otherwise
        desc=desc, unit=unit, file=log, mininterval=LOG_EVERY_S, maxinterval=LOG_EVERY_S, **options
    )


class _NoBlankWrites:
    """A stream that drops what tqdm writes around its status (a closing newline, a bare
    carriage return): on a log those are blank lines."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        return self.stream.write(text) if text.strip() else 0

    def flush(self) -> None:
        self.stream.flush()


class _LogLines(tqdm):  # type: ignore[misc]
    """tqdm's status as whole lines, each on its own: at most one per ``mininterval`` as
    it advances, one every ``LOG_EVERY_S`` while it does not (a long trial, a calibration
    pass), and the last when it closes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._closing, self._shown = False, -1
        super().__init__(*args, ascii=True, ncols=100, **kwargs)
        self._stopped = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, daemon=True, name=self.desc)
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stopped.wait(LOG_EVERY_S):
            since = self._time() - self.last_print_t
            if since >= LOG_EVERY_S * 0.99:
                self.refresh()

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if self._closing and self.n == self._shown:
            return True  # its last line is already there
        line = self.__str__() if msg is None else msg
        self.fp.write(line.strip("\r") + "\n")
        self.fp.flush()
        self._shown = self.n
        return True

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        """The figures beside the count, shown with the next line (not a line of their own:
        the search sets them after every trial)."""
        super().set_postfix_str(s, refresh=False)

    def close(self) -> None:
        self._closing = True
        if getattr(self, "_stopped", None) is not None:
            self._stopped.set()
        super().close()
