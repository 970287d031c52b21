"""Output from C++ libraries kept out of ours: they write to file descriptors 1 and 2,
below Python's ``sys.stdout``/``sys.stderr``, so only pointing the descriptor elsewhere
silences them."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

STDOUT, STDERR = 1, 2


@contextlib.contextmanager
def silenced(fd: int) -> Iterator[None]:
    """File descriptor ``fd`` pointed at /dev/null for the block; what Python wrote to its
    stream before is flushed first. Left as it is where it cannot be duplicated."""
    (sys.stdout if fd == STDOUT else sys.stderr).flush()
    try:
        saved = os.dup(fd)
    except OSError:  # closed (a daemon's): nothing to silence
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), fd)
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)
