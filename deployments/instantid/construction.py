"""One lock for building torch modules in a process.

diffusers (and accelerate underneath) build a model inside ``init_empty_weights``, which swaps
``torch.nn.Module.register_parameter`` for the whole process, not just the loading thread: a module that another
thread creates meanwhile gets its parameters on the meta device. A replica loads a base in one thread while another
thread serves requests on an already loaded base, and a LoRA switch there creates PEFT's adapter layers: they came
out weightless ("Cannot copy out of meta tensor"), the half-injected adapter stayed, and every later load of that
LoRA failed ("Adapter ... already exists"). Every model load and every LoRA injection holds this lock, so no module
is ever created while another thread's model load has the patch in place.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import ParamSpec, TypeVar

MODULE_CONSTRUCTION = threading.RLock()  # re-entrant: a loader may call another (build_denoiser -> load_vae)

P = ParamSpec("P")
R = TypeVar("R")


def constructs_modules(function: Callable[P, R]) -> Callable[P, R]:
    """Run ``function`` (a model load, a LoRA injection) while holding :data:`MODULE_CONSTRUCTION`."""

    @functools.wraps(function)
    def locked(*args: P.args, **kwargs: P.kwargs) -> R:
        with MODULE_CONSTRUCTION:
            return function(*args, **kwargs)

    return locked
