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
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from torch import nn

from deployments import metrics
from deployments.generation.messages import StageTiming
from deployments.instantid.bases import SDXLBase, resolve_architecture, resolve_base
from deployments.instantid.catalogue import ModelCatalogue
from deployments.instantid.errors import ModelUnavailableError, WeightsError
from deployments.instantid.loras import LoraAdapters, architecture_skeletons, check_loras, resolve_lora_files

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


@dataclass
class ReplicaModels:
    """A GPU replica's catalogue, checked when it starts: every source exists, every LoRA fits the architecture.

    ``parts`` are the models this replica adapts (``unet``, or the two text encoders).
    """

    catalogue: ModelCatalogue
    architecture: Path  # the default base's configs: the architecture every base and LoRA must match
    lora_files: dict[str, Path]
    cache_dir: str | None

    @classmethod
    def prepare(cls, models: Mapping[str, Any], cache_dir: str | None, parts: tuple[str, ...]) -> ReplicaModels:
        catalogue = ModelCatalogue.model_validate(models)
        catalogue.check_sources()
        architecture = resolve_architecture(str(catalogue.base_models["sdxl"].source), cache_dir)
        lora_files = resolve_lora_files(catalogue.loras, cache_dir)
        check_loras(lora_files, architecture_skeletons(architecture, parts))
        return cls(catalogue, architecture, lora_files, cache_dir)

    def base(self, name: str, components: tuple[str, ...]) -> SDXLBase:
        """Local files of base ``name`` (only ``components``' files are copied from S3 or the hub)."""
        spec = self.catalogue.base_models[name]
        return resolve_base(
            name, spec, config_source=str(self.architecture), components=components, cache_dir=self.cache_dir
        )

    def adapters(self, targets: Mapping[str, nn.Module], unet_config: Any = None) -> LoraAdapters:
        return LoraAdapters(
            targets,
            self.lora_files,
            capacity=self.catalogue.max_loras_per_replica,
            unet_config=unet_config,
            fuse=self.catalogue.fuse_loras,
        )


class BaseSlots(Generic[ModelT]):
    """The replica's bases by name, loaded by ``build`` (name -> model and its LoRA adapters) behind Serve's
    ``@serve.multiplexed``, at most ``max_models`` at once."""

    def __init__(self, build: Callable[[str], tuple[ModelT, LoraAdapters]], max_models: int) -> None:
        self._build = build
        self._load = multiplexed_loader(self._load_slot, max_models)
        self._slots: dict[str, BaseSlot[ModelT]] = {}

    async def _load_slot(self, name: str) -> BaseSlot[ModelT]:
        started = time.perf_counter()
        try:
            model, adapters = await asyncio.to_thread(self._build, name)
        except WeightsError as exc:  # this base is unusable; the replica still serves the others
            raise ModelUnavailableError(f"base {name} could not be loaded: {exc.message}") from exc
        slot = BaseSlot(name, model, adapters, time.perf_counter() - started)
        self._slots[name] = slot
        metrics.record_model_load("base", name, slot.load_seconds)
        return slot

    def slots(self) -> list[BaseSlot[ModelT]]:
        """The bases loaded now."""
        return [slot for slot in self._slots.values() if slot.model is not None]

    @property
    def loaded(self) -> list[str]:
        return [slot.name for slot in self.slots()]

    async def acquire(self, name: str) -> tuple[BaseSlot[ModelT], StageTiming | None]:
        """The base ``name``, marked in use (call :meth:`BaseSlot.release` when done), and when this call waited
        for it to load (None when it was warm)."""
        for other in [s for s in self._slots.values() if s.busy and s.name != name and s.model is not None]:
            await self._load(other.name)  # keep busy bases at the recent end of Serve's LRU
        started = time.time()
        warm = name in self.loaded
        slot = await self._load(name)
        slot.acquire()
        return slot, None if warm else StageTiming.since(started)


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
