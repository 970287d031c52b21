"""Results kept by the content of the tensor they were computed from.

An evaluator compresses one base model again and again, and most layers of most plans are
that model's own weights under a choice it has seen before: their SVD, or their quantized and
packed bytes, are the ones computing them again would give. Keyed by the tensor's bytes (not
by layer name or plan), a cached result is exactly the fresh one, whatever came before.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Generic, TypeVar

import torch

T = TypeVar("T")


def content_key(tensor: torch.Tensor) -> bytes:
    """Equal for two tensors exactly when their dtype, shape and values are (SHA-256 of the
    bytes: ~3 ms per million fp32 values here, a tenth of quantizing and packing them)."""
    data = tensor.detach().cpu().contiguous()
    digest = hashlib.sha256(data.reshape(-1).view(torch.uint8).numpy().data)
    return digest.digest() + f"{data.dtype}{tuple(data.shape)}".encode()


class ContentCache(Generic[T]):
    """A least-recently-used map holding at most ``max_bytes`` of results."""

    def __init__(self, max_bytes: int, size_of: Callable[[T], int]) -> None:
        self.max_bytes = max_bytes
        self._size_of = size_of
        self._items: OrderedDict[Hashable, tuple[T, int]] = OrderedDict()
        self._bytes = 0

    def get(self, key: Hashable, compute: Callable[[], T]) -> T:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key][0]
        value = compute()
        self.put(key, value)
        return value

    def put(self, key: Hashable, value: T) -> None:
        """Keep ``value`` under ``key`` (not at all when it alone is over ``max_bytes``)."""
        size = self._size_of(value)
        if key in self._items:
            self._bytes -= self._items.pop(key)[1]
        if size <= self.max_bytes:
            self._items[key] = (value, size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, dropped) = self._items.popitem(last=False)
                self._bytes -= dropped

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def clear(self) -> None:
        self._items.clear()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._items)


def cache_dir() -> Path:
    """Where the user's caches live: ``$AUTOSQUEEZE_CACHE_DIR``, ``$XDG_CACHE_HOME``/autosqueeze
    or ``~/.cache/autosqueeze``."""
    if os.environ.get("AUTOSQUEEZE_CACHE_DIR"):
        return Path(os.environ["AUTOSQUEEZE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "autosqueeze"
