"""A least-recently-used cache bounded by the bytes of what it holds, safe from several threads:
the Ingress keeps thumbnails in one, the Verifier candidates' local features."""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Callable, Optional


class BytesLRU:
    """At most `max_bytes` of values, as `size(value)` counts them; the least recently used go
    first, and a value larger than the whole budget is not kept."""

    def __init__(self, max_bytes: int, size: Callable[[Any], int]):
        self.max_bytes, self.size, self.bytes = max_bytes, size, 0
        self._items: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> Optional[Any]:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: tuple, value: Any) -> None:
        n = self.size(value)
        if n > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            self.bytes += n - (self.size(old) if old is not None else 0)
            self._items[key] = value
            while self.bytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self.bytes -= self.size(dropped)
