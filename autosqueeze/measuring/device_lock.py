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

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


class DeviceLock:
    def __init__(self, device: torch.device, folder: Path | None = None) -> None:
        name = device.type  # a Ray GPU worker sees its GPU as cuda:0, whichever it is
        folder = folder or Path(tempfile.gettempdir())
        self._paths = (folder / f"autosqueeze-{name}.gate", folder / f"autosqueeze-{name}.lock")

    @contextmanager
    def shared(self) -> Iterator[Held]:
        """Held shared; yields a ``Held``: calling it lets a waiting exclusive holder go
        first, and ``held.exclusive()`` steps up for a short timing inside shared work."""
        with self._held(fcntl.LOCK_SH) as held:
            yield held

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._held(fcntl.LOCK_EX):
            yield

    @contextmanager
    def _held(self, mode: int) -> Iterator[Held]:
        gate_fd, lock_fd = (_shared_file(path) for path in self._paths)
        try:
            held = Held(gate_fd, lock_fd, mode)
            held.acquire(mode)
            yield held
        finally:
            os.close(lock_fd)  # closing releases the flock
            os.close(gate_fd)


class Held:
    """The lock as one holder holds it."""

    def __init__(self, gate_fd: int, lock_fd: int, mode: int) -> None:
        self._gate_fd, self._lock_fd, self._mode = gate_fd, lock_fd, mode

    def acquire(self, mode: int) -> None:
        fcntl.flock(self._gate_fd, fcntl.LOCK_EX)  # queue at the gate...
        try:
            fcntl.flock(self._lock_fd, mode)  # ...until the device lock is ours
        finally:
            fcntl.flock(self._gate_fd, fcntl.LOCK_UN)

    def __call__(self) -> None:
        """Pause: let whoever queued meanwhile go first, then hold it again."""
        fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        self.acquire(self._mode)

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Held exclusive for a while (a timing inside shared work), then as before. The
        step is not atomic: the lock is let go and queued for again."""
        fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        self.acquire(fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            self.acquire(self._mode)


def _shared_file(path: Path) -> int:
    """The lock file, opened read-write; made writable for every user when this process
    creates it (the umask would leave 0644, locking a second user out of the device)."""
    try:  # an existing file without O_CREAT: Linux's protected_regular refuses O_CREAT on
        return os.open(path, os.O_RDWR)  # another user's file in the sticky temp folder
    except FileNotFoundError:
        pass
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    with contextlib.suppress(OSError):
        os.fchmod(fd, 0o666)
    return fd
