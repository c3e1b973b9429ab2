"""The ingress's generation slots: a request gets one now or a 503, a job waits for one in arrival order."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable


class Admission:
    """At most ``limit`` generations at once per ingress replica. ``try_enter`` answers at once (a request beyond the
    limit gets a 503); ``wait_turn`` queues a job, oldest first, reporting its position as it changes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0
        self._queue: collections.deque[str] = collections.deque()
        self._changed = asyncio.Condition()

    def try_enter(self) -> bool:
        if self.in_flight >= self.limit or self._queue:  # waiting jobs keep their turn
            return False
        self.in_flight += 1
        return True

    async def wait_turn(self, job_id: str, on_position: Callable[[int], None]) -> None:
        self._queue.append(job_id)
        try:
            async with self._changed:
                last = None
                while self._queue[0] != job_id or self.in_flight >= self.limit:
                    position = self._queue.index(job_id)
                    if position != last:
                        on_position(position)
                        last = position
                    await self._changed.wait()
                self._queue.popleft()
                self.in_flight += 1
        except BaseException:
            if job_id in self._queue:
                self._queue.remove(job_id)
            async with self._changed:
                self._changed.notify_all()
            raise
        async with self._changed:
            self._changed.notify_all()

    @property
    def waiting(self) -> int:
        return len(self._queue)

    async def leave(self) -> None:
        self.in_flight -= 1
        async with self._changed:
            self._changed.notify_all()
