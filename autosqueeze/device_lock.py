"""One device, one latency measurement at a time, across every process on the machine.

Work that loads the device (compressing, evaluating the metric, loading a model, sampling the
next plan) holds the lock *shared*; a latency measurement holds it *exclusive*, so it never
runs beside other work on that device. Long shared work (recovery training) calls the
``pause`` that ``shared()`` yields now and then, so a waiting measurement gets its turn within
a fraction of a second rather than after the whole job. The lock is a pair of ``flock``s on
files in the temp folder: the kernel releases them when a process dies, so a crashed
evaluator can never leave the device locked. A gate lock makes it fair: a waiting
measurement stops new shared holders from cutting in.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


class DeviceLock:
    def __init__(self, device: torch.device, folder: Path | None = None) -> None:
        name = device.type  # a Ray GPU worker sees its GPU as cuda:0, whichever it is
        folder = folder or Path(tempfile.gettempdir())
        self._paths = (folder / f"autosqueeze-{name}.gate", folder / f"autosqueeze-{name}.lock")

    @contextmanager
    def shared(self) -> Iterator[Callable[[], None]]:
        """Held shared; yields ``pause()``, which lets a waiting exclusive holder go first."""
        with self._held(fcntl.LOCK_SH) as pause:
            yield pause

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._held(fcntl.LOCK_EX):
            yield

    @contextmanager
    def _held(self, mode: int) -> Iterator[Callable[[], None]]:
        gate_fd = os.open(self._paths[0], os.O_RDWR | os.O_CREAT, 0o666)
        lock_fd = os.open(self._paths[1], os.O_RDWR | os.O_CREAT, 0o666)

        def acquire() -> None:
            fcntl.flock(gate_fd, fcntl.LOCK_EX)  # queue at the gate...
            try:
                fcntl.flock(lock_fd, mode)  # ...until the device lock is ours
            finally:
                fcntl.flock(gate_fd, fcntl.LOCK_UN)

        def pause() -> None:
            fcntl.flock(lock_fd, fcntl.LOCK_UN)
            acquire()  # behind whoever queued meanwhile

        try:
            acquire()
            yield pause
        finally:
            os.close(lock_fd)  # closing releases the flock
            os.close(gate_fd)
