"""The compact messages the deployments pass to each other (plain dataclasses, pickled by Ray)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from deployments.instantid.conditioning import FaceCondition
from deployments.instantid.pipeline import GenerationParams
from deployments.instantid.text import PromptEmbeddings


@contextmanager
def stage_timer(timings: dict[str, dict[str, float]], stage: str) -> Iterator[None]:
    """Record a stage's wall-clock start and end (unix seconds) into ``timings[stage]``."""
    start = time.time()
    try:
        yield
    finally:
        end = time.time()
        timings[stage] = {"start": start, "end": end, "seconds": end - start}


@dataclass
class FaceRequest:
    face_image: bytes
    pose_image: bytes | None = None
    width: int | None = None
    height: int | None = None


@dataclass
class FaceResult:
    condition: FaceCondition
    timings: dict[str, dict[str, float]]


@dataclass
class PromptRequest:
    prompt: str
    negative_prompt: str | None
    do_classifier_free_guidance: bool


@dataclass
class PromptResult:
    embeddings: PromptEmbeddings
    timings: dict[str, dict[str, float]]


@dataclass
class DenoiseResult:
    """The images plus everything the store must record about how they were made."""

    images: np.ndarray  # (num_images, H, W, 3) uint8
    params: GenerationParams  # sized
    face: dict[str, Any]
    prompt_truncated: bool
    timings: dict[str, dict[str, float]] = field(default_factory=dict)
