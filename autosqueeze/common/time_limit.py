"""A time limit on a block of Python code running in the main thread (third-party analyses,
imports of user code), for code that offers no timeout of its own."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def time_limit(seconds: float, error: type[BaseException] = TimeoutError) -> Iterator[None]:
    """Raise ``error`` in the block once it has run ``seconds`` (a SIGALRM timer: Python code
    is stopped between two bytecodes, a blocking system call when it returns). Only the main
    thread gets signals; elsewhere the block runs unlimited."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(
        signal, "setitimer"
    ):
        yield
        return

    def stop(_signum: int, _frame: Any) -> None:
        raise error(f"took over {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
