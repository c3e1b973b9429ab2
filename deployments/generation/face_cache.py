"""Recent face analyses by photo, so a client that sends the same photo again skips detection and recognition.

Keys are the photo's SHA-256 and the analysis options that shaped the result (which face, the smallest face
accepted); values are the analysis (boxes, keypoints, the chosen face's embedding), never the photo. Bounded in
entries (least recently used out) and in age (an entry older than ``ttl_s`` is analysed afresh), per replica: a
photo analysed on one replica is a miss on another, which costs an analysis, not a wrong answer.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any


class FaceCache:
    def __init__(self, max_entries: int = 1024, ttl_s: float = 3600.0, clock: Callable[[], float] = time.monotonic):
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self.clock = clock
        self._entries: OrderedDict[Hashable, tuple[float, Any]] = OrderedDict()
        self._lock = threading.Lock()  # a deployment's sync methods run in worker threads
        self.hits = self.misses = 0

    @staticmethod
    def photo_key(image: bytes) -> str:
        return hashlib.sha256(image).hexdigest()

    def get(self, key: Hashable) -> Any | None:
        if self.max_entries == 0:
            return None
        with self._lock:
            found = self._entries.get(key)
            if found is None or self.clock() - found[0] > self.ttl_s:
                self._entries.pop(key, None)
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return found[1]

    def put(self, key: Hashable, value: Any) -> None:
        if self.max_entries == 0:
            return
        with self._lock:
            self._entries[key] = (self.clock(), value)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
