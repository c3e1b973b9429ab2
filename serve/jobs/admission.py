"""The ingress's generation slots: a request gets one now or a 503, a job waits for one in arrival order."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable


class SlotsStalled(RuntimeError):
    """Every slot has been taken, and none freed, for longer than any admitted generation may take."""


class Admission:
    """At most ``limit`` generations at once per ingress replica. ``try_enter`` answers at once (a request beyond the
    limit gets a 503); ``wait_turn`` queues a job, oldest first, reporting its position as it changes.

    ``clock`` (monotonic seconds) times how long the slots have been full without one being freed: see
    :meth:`check_moving`."""

    def __init__(self, limit: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.in_flight = 0
        self._queue: collections.deque[str] = collections.deque()
        self._changed = asyncio.Condition()
        self._clock = clock
        self._moved_at = clock()  # the last time a slot was taken or given back

    def try_enter(self) -> bool:
        if self.in_flight >= self.limit or self._queue:  # waiting jobs keep their turn
            return False
        self.in_flight += 1
        self._moved_at = self._clock()
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
                self._moved_at = self._clock()
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
        self._moved_at = self._clock()
        async with self._changed:
            self._changed.notify_all()

    def full_for(self) -> float:
        """Seconds since the last slot was taken, while all are taken and none was given back (0 while one is
        free)."""
        if self.in_flight < self.limit:
            return 0.0
        return max(0.0, self._clock() - self._moved_at)

    def check_moving(self, bound_s: float) -> None:
        """Raise :class:`SlotsStalled` when every slot has been held for more than ``bound_s`` with none given back.

        Every admitted generation ends (an answer, a 504 or a failed job) within the request timeout, so full slots
        that do not move for longer than that mean the replica's own calls to the graph are wedged: every new
        request would be refused as overloaded for as long as it lives. The ingress's health check raises this,
        and Serve replaces the replica (its jobs are taken over once their leases expire)."""
        stuck = self.full_for()
        if stuck > bound_s:
            raise SlotsStalled(
                f"all {self.limit} generation slots taken and none given back for {stuck:.0f} s (bound {bound_s:.0f} s)"
            )
