"""SDXL bases on a GPU replica, loaded through Ray Serve's model multiplexing and never unloaded while in use.

Serve's ``@serve.multiplexed`` keeps at most N models per replica, reports which ones a replica holds (so that
requests for a base are routed to replicas that have it warm) and unloads the least recently used one to make
room, calling its ``__del__``. It does not know which bases running jobs still use; two things make that safe:

- before a base is loaded, every base in use is touched (a cache hit moves it to the recent end), so the
  least recently used base, the one Serve unloads, is an idle one whenever there is one;
- if every base is busy, :meth:`BaseSlot.__del__` (which Serve runs in a worker thread) waits until the last
  job using the base has released it, then frees it; the new base loads after that, so memory stays bounded.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from deployments.instantid.loras import LoraAdapters

ModelT = TypeVar("ModelT")


class BaseSlot(Generic[ModelT]):
    """One loaded base: its model, its LoRA adapters, how many jobs use it, and what loading it cost."""

    def __init__(self, name: str, model: ModelT, adapters: LoraAdapters, load_seconds: float) -> None:
        self.name = name
        self.model: ModelT | None = model
        self.adapters = adapters
        self.load_seconds = load_seconds
        self.lock = threading.Lock()  # one batch at a time uses the model and switches its adapters
        self._users = 0
        self._idle = threading.Condition()

    def acquire(self) -> None:
        with self._idle:
            if self.model is None:
                raise RuntimeError(f"base {self.name} was unloaded")
            self._users += 1

    def release(self) -> None:
        with self._idle:
            self._users -= 1
            self._idle.notify_all()

    @property
    def busy(self) -> bool:
        return self._users > 0

    def __del__(self) -> None:
        """Serve's multiplexer unloads a base by calling this (in a worker thread); Python calls it again when the
        slot is collected. The first call waits for the base's jobs to finish, then frees the model."""
        with self._idle:
            while self._users > 0:
                self._idle.wait()
            model, self.model = self.model, None
        if model is not None:
            del model
            gc.collect()
            _empty_device_cache()


def _empty_device_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class BaseSlots(Generic[ModelT]):
    """The replica's bases by name, over a ``@serve.multiplexed`` loader (``load`` is that loader)."""

    def __init__(self, load: Callable[[str], Awaitable[BaseSlot[ModelT]]]) -> None:
        self._load = load
        self._slots: dict[str, BaseSlot[ModelT]] = {}

    def register(self, slot: BaseSlot[ModelT]) -> BaseSlot[ModelT]:
        """Called by the loader for each base it loads (the loader itself runs inside Serve's multiplexer)."""
        self._slots[slot.name] = slot
        return slot

    def slots(self) -> list[BaseSlot[ModelT]]:
        """The bases loaded now."""
        return [slot for slot in self._slots.values() if slot.model is not None]

    @property
    def loaded(self) -> list[str]:
        return [slot.name for slot in self.slots()]

    async def acquire(self, name: str) -> tuple[BaseSlot[ModelT], float]:
        """The base ``name``, marked in use (call :meth:`BaseSlot.release` when done), and the seconds this call
        spent waiting for it to load (0 when it was warm)."""
        for other in [s for s in self._slots.values() if s.busy and s.name != name and s.model is not None]:
            await self._load(other.name)  # keep busy bases at the recent end of Serve's LRU
        started = time.perf_counter()
        warm = name in self.loaded
        slot = await self._load(name)
        slot.acquire()
        return slot, 0.0 if warm else time.perf_counter() - started


def multiplexed_loader(
    load: Callable[[str], Awaitable[BaseSlot[ModelT]]], max_models: int
) -> Callable[[str], Awaitable[BaseSlot[ModelT]]]:
    """``load`` behind ``@serve.multiplexed`` with a configured capacity (the decorator's argument is fixed when it is
    applied, so it is applied here, at replica start; Serve detects multiplexing set up at init time)."""
    from ray import serve as ray_serve

    async def load_base(name: str) -> BaseSlot[ModelT]:  # a plain function: Serve keeps its cache on it
        return await load(name)

    return ray_serve.multiplexed(max_num_models_per_replica=max_models)(load_base)


async def run_locked(slot: BaseSlot, work: Callable[[], object]) -> object:
    """``work()`` in a worker thread while holding the slot's lock (a base runs one batch at a time)."""

    def locked() -> object:
        with slot.lock:
            return work()

    return await asyncio.to_thread(locked)
