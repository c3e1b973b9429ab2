"""Who runs a job, and until when: a lease in the job's state, renewed by its holder, taken over once it expires.

Leases are compared across machines, so the clock is wall-clock time (``time.time``); tests pass a clock of their
own to move time without waiting.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from pydantic import BaseModel

Clock = Callable[[], float]


class Lease(BaseModel):
    """The replica holding a job and the wall-clock second its hold ends."""

    holder: str
    expires_at: float


class Leases:
    """Makes and checks leases of ``lease_s`` seconds on ``clock``."""

    def __init__(self, lease_s: float, clock: Clock = time.time) -> None:
        self.lease_s = lease_s
        self.clock = clock

    def grant(self, holder: str) -> Lease:
        return Lease(holder=holder, expires_at=self.clock() + self.lease_s)

    def expired(self, lease: Lease | None) -> bool:
        """True when nobody holds the job any more: no lease, or its end has passed."""
        return lease is None or lease.expires_at < self.clock()
