"""The safety check as a stage, and what its verdicts make of a generation's images before anything is stored.

:class:`SafetyStage` judges every image of a :class:`DenoiseResult` (served by the ``SafetyChecker`` deployment,
beside the identity score); :func:`screen` applies the verdicts where the images are stored (the ResultStore, or
the in-process pipeline's last step): flagged images are kept, blurred or left out as the policy says, each kept
image records its verdict and its index among the request's images, and meta.json records the refused ones. When
every image is refused there is nothing to store: :class:`ContentRefusedError` (422), never an empty success.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from deployments.instantid.errors import ContentRefusedError
from deployments.instantid.safety import SafetyCheck, obscure

from .messages import DenoiseResult, SafetyResult, Timings, timed


class SafetyStage:
    """Judges generated images with ``check`` (the classifier and the policy)."""

    def __init__(self, check: SafetyCheck, *, replica: str = "") -> None:
        self.safety = check
        self.replica = replica

    def check(self, output: DenoiseResult) -> SafetyResult:
        timings: Timings = {}
        with timed(timings, "safety"):
            verdicts = self.safety(list(output.images))
        check = self.safety
        return SafetyResult(verdicts, check.policy, check.classifier.name, check.threshold, timings, self.replica)


@dataclass
class Screened:
    """A generation's images as they may be stored, with what each stored image records."""

    images: list[np.ndarray]
    fields: list[dict[str, Any]]  # per stored image: its index among the request's images, its verdict
    identity_similarities: list[float | None] | None
    identity_scores: list[Any] | None
    meta: dict[str, Any] | None  # meta.json's safety block; None when no check ran


def screen(
    images: Sequence[np.ndarray],
    safety: SafetyResult | None,
    identity_similarities: Sequence[float | None] | None = None,
    identity_scores: Sequence[Any] | None = None,
) -> Screened:
    """The images to store after ``safety``'s verdicts: refused ones left out (with their scores), blurred ones
    replaced by :func:`obscure` of them; without a check, every image as it is."""
    if safety is None:
        keep = list(range(len(images)))
        verdicts = None
    else:
        if len(safety.verdicts) != len(images):
            raise RuntimeError(f"{len(safety.verdicts)} safety verdicts for {len(images)} images")
        keep = [i for i, verdict in enumerate(safety.verdicts) if verdict.action != "refuse"]
        verdicts = safety.verdicts
        if not keep:
            raise ContentRefusedError(
                f"the safety check refused every image ({len(images)}) and none was stored; another prompt or seed "
                "may pass"
            )
    stored, fields = [], []
    for index in keep:
        verdict = None if verdicts is None else verdicts[index]
        stored.append(obscure(images[index]) if verdict is not None and verdict.action == "blur" else images[index])
        fields.append({"index": index, **({"safety": verdict.record()} if verdict is not None else {})})
    return Screened(
        stored,
        fields,
        None if identity_similarities is None else [identity_similarities[i] for i in keep],
        None if identity_scores is None else [identity_scores[i] for i in keep],
        None if safety is None else safety.meta(),
    )
