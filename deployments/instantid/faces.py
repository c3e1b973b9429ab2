"""Face analysis for InstantID: the largest face's box, 5 keypoints and raw 512-d ArcFace embedding.

Built directly on insightface's ``model_zoo.get_model`` (onnxruntime sessions) rather than its
``FaceAnalysis`` app, because the app:

- looks the pack up under ``~/.insightface/models`` and tries a (dead) download when it is missing;
- ends in a bare ``AssertionError`` for an empty or nested folder (a frequent unzip mistake);
- opens a session for every ``.onnx`` in the folder, although InstantID needs only detection and
  recognition (the landmark and gender/age models cost load time and memory for nothing);
- runs recognition on every detected face, whereas only the chosen (largest) face matters.

So the folder is validated first with one actionable message, only the two needed files are loaded,
and only the chosen face is recognised. Images come in as RGB (what the decoder produces) and are
handed to insightface as BGR, which is what its preprocessing (``swapRB=True``) expects.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
from insightface.app.common import Face
from insightface.model_zoo import get_model
from insightface.model_zoo.arcface_onnx import ArcFaceONNX
from insightface.model_zoo.scrfd import SCRFD

from .errors import NoFaceError, WeightsError
from .face_data import DetectedFace

DETECTOR_FILE = "scrfd_10g_bnkps.onnx"
RECOGNIZER_FILE = "glintr100.onnx"
ANTELOPEV2_FILES = (DETECTOR_FILE, RECOGNIZER_FILE, "2d106det.onnx", "1k3d68.onnx", "genderage.onnx")
REQUIRED_FILES = (DETECTOR_FILE, RECOGNIZER_FILE)
EMBEDDING_DIM = 512

# insightface 2.1's norm_crop calls scikit-image's deprecated ``SimilarityTransform.estimate`` and warns on
# every face; the result is unchanged, so silence exactly that warning from exactly that module.
warnings.filterwarnings(
    "ignore",
    message=r".*`estimate` is deprecated",
    category=FutureWarning,
    module=r"insightface\.utils\.face_align",
)


def default_providers() -> list[str]:
    """CUDA first when this onnxruntime build has it (the GPU image), then CPU as the fallback."""
    available = onnxruntime.get_available_providers()
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _listing(directory: Path, limit: int = 12) -> str:
    """What is in ``directory``, for error messages: names, folders with a trailing slash."""
    try:
        entries = sorted(directory.iterdir(), key=lambda p: p.name)
    except OSError as exc:
        return f"(unreadable: {exc})"
    if not entries:
        return "nothing"
    names = [p.name + ("/" if p.is_dir() else "") for p in entries[:limit]]
    more = f" ... and {len(entries) - limit} more" if len(entries) > limit else ""
    return ", ".join(names) + more


def _subfolders(directory: Path) -> list[Path]:
    try:
        return sorted(p for p in directory.iterdir() if p.is_dir())
    except OSError:
        return []


def _nested_pack(directory: Path) -> Path | None:
    """A sub-folder, one or two levels down, holding the required files: the classic double-unzip layout.

    Only those two levels are listed (no recursive walk), so pointing at a large tree stays fast.
    """
    for child in _subfolders(directory):
        for candidate in (child, *_subfolders(child)):
            if all((candidate / name).is_file() for name in REQUIRED_FILES):
                return candidate
    return None


def _expected_text() -> str:
    optional = ", ".join(ANTELOPEV2_FILES[2:])
    return f"expected directly in it: {', '.join(REQUIRED_FILES)} (required) and {optional} (optional, unused here)"


def validate_model_dir(model_dir: str | Path) -> Path:
    """Check the antelopev2 folder before any session is opened; one message says what to fix.

    Never downloads: the pack's public download URL is dead, and a serving process must not fetch
    weights at run time anyway.
    """
    directory = Path(model_dir).expanduser()
    advice = "Nothing is downloaded at run time: place the antelopev2 files there."
    if not directory.exists():
        raise WeightsError(f"antelopev2 face model folder {directory} does not exist; {_expected_text()}. {advice}")
    if not directory.is_dir():
        raise WeightsError(f"antelopev2 face model path {directory} is not a folder; {_expected_text()}. {advice}")
    missing = [name for name in REQUIRED_FILES if not (directory / name).is_file()]
    if not missing:
        return directory
    found = _listing(directory)
    nested = _nested_pack(directory)
    if nested is not None:
        raise WeightsError(
            f"antelopev2 face model folder {directory} has the model files in a sub-folder, {nested} "
            f"(unzipping antelopev2.zip inside a folder named antelopev2 gives antelopev2/antelopev2/). "
            f"Use {nested} as the antelopev2 folder instead, or move its files up; {_expected_text()}. "
            f"Found in {directory}: {found}."
        )
    problem = "is empty" if found == "nothing" else f"lacks {', '.join(missing)}"
    raise WeightsError(
        f"antelopev2 face model folder {directory} {problem}; {_expected_text()}. Found: {found}. {advice}"
    )


def _check_file_bytes(path: Path) -> None:
    """Catch the usual non-model files (empty, Git LFS pointer, HTML error page) with a clear message."""
    size = path.stat().st_size
    if size == 0:
        raise WeightsError(f"{path} is empty (0 bytes); copy the real {path.name} there")
    with path.open("rb") as handle:
        head = handle.read(64)
    if head.startswith(b"version https://git-lfs"):
        raise WeightsError(f"{path} is a Git LFS pointer, not the model: fetch the real file (git lfs pull)")
    if head.lstrip().startswith(b"<"):
        raise WeightsError(f"{path} looks like an HTML/XML page (a failed download?), not an ONNX model")


def _load(path: Path, expected: type, role: str, providers: list[str]) -> Any:
    """Open one session through insightface's router and insist it routed to ``expected``."""
    _check_file_bytes(path)
    try:
        model = get_model(str(path), providers=providers)
    except Exception as exc:  # onnxruntime/protobuf raise many types for a bad file
        raise WeightsError(f"could not load the {role} {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, expected):
        got = "nothing (unrecognised signature)" if model is None else type(model).__name__
        raise WeightsError(
            f"{path} should be the {role} but insightface routed it to {got}: the file does not have the "
            f"{expected.__name__} signature (is it the right antelopev2 file?)"
        )
    return model


class FaceAnalyzer:
    """Detection (SCRFD) and recognition (ArcFace) from an antelopev2 folder, on onnxruntime.

    Safe to share between threads: onnxruntime sessions are thread-safe for ``run`` and no per-call
    state is kept on the instance.
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        providers: Sequence[str] | None = None,
        det_size: int = 640,
        det_thresh: float = 0.5,
        nms_thresh: float = 0.4,
    ) -> None:
        if det_size <= 0 or det_size % 32:
            raise ValueError(
                f"det_size must be a positive multiple of 32 (the detector's largest stride), got {det_size}"
            )
        self.model_dir = validate_model_dir(model_dir)
        self.providers = list(providers) if providers is not None else default_providers()
        self.det_size = det_size
        self._detector: SCRFD = _load(self.model_dir / DETECTOR_FILE, SCRFD, "face detector", self.providers)
        if not self._detector.use_kps:
            raise WeightsError(
                f"{self.model_dir / DETECTOR_FILE} is a detector without keypoints; InstantID needs the 5-keypoint "
                "SCRFD (9 outputs)"
            )
        self._recognizer: ArcFaceONNX = _load(
            self.model_dir / RECOGNIZER_FILE, ArcFaceONNX, "face recognizer", self.providers
        )
        out_dim = self._recognizer.output_shape[-1]
        if isinstance(out_dim, int) and out_dim != EMBEDDING_DIM:
            raise WeightsError(
                f"{self.model_dir / RECOGNIZER_FILE} gives {out_dim}-d embeddings; InstantID needs {EMBEDDING_DIM}"
            )
        # ctx_id only matters when negative (insightface then rebuilds the session on CPU); the providers
        # were already chosen when the sessions were opened, so 0 keeps them as they are.
        self._detector.prepare(ctx_id=0, det_thresh=det_thresh, nms_thresh=nms_thresh, input_size=(det_size, det_size))
        self._recognizer.prepare(ctx_id=0)

    @staticmethod
    def _to_bgr(rgb: np.ndarray) -> np.ndarray:
        if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            shape = getattr(rgb, "shape", None)
            dtype = getattr(rgb, "dtype", type(rgb).__name__)
            raise ValueError(f"expected an RGB uint8 array of shape (H, W, 3), got {dtype} {shape}")
        return np.ascontiguousarray(rgb[:, :, ::-1])

    def _detect_bgr(self, bgr: np.ndarray) -> list[DetectedFace]:
        boxes, kpss = self._detector.detect(bgr, max_num=0)
        faces = [
            DetectedFace(bbox=boxes[i, :4], kps=kpss[i], det_score=float(boxes[i, 4])) for i in range(boxes.shape[0])
        ]
        # Stable: equal areas keep the detector's (score) order.
        return sorted(faces, key=lambda f: f.area, reverse=True)

    def detect(self, rgb: np.ndarray) -> list[DetectedFace]:
        """All faces above the threshold after NMS, largest box first, without embeddings."""
        return self._detect_bgr(self._to_bgr(rgb))

    def _embed_bgr(self, bgr: np.ndarray, face: DetectedFace) -> np.ndarray:
        # insightface aligns the 112x112 crop from the 5 keypoints (norm_crop) and runs ArcFace on it.
        target = Face(bbox=np.array(face.bbox), kps=np.array(face.kps), det_score=face.det_score)
        embedding = self._recognizer.get(bgr, target)
        return np.asarray(embedding, dtype=np.float32).reshape(-1).copy()

    def embed(self, rgb: np.ndarray, face: DetectedFace) -> np.ndarray:
        """The raw (not L2-normalised) 512-d identity vector of ``face`` found in ``rgb``."""
        return self._embed_bgr(self._to_bgr(rgb), face)

    def analyze(self, rgb: np.ndarray, which: str = "face") -> DetectedFace:
        """The largest face (by box area) with its raw embedding; only that face is recognised.

        ``which`` names the image in the error ("face" or "pose") so the client knows which upload failed.
        """
        bgr = self._to_bgr(rgb)
        faces = self._detect_bgr(bgr)
        if not faces:
            raise NoFaceError(f"no face detected in the {which} image")
        largest = faces[0]
        return replace(largest, embedding=self._embed_bgr(bgr, largest))

    def check_health(self) -> None:
        """Run both sessions on tiny inputs; raise WeightsError when either is broken.

        Also warms the detector's fixed-size session, which insightface builds on first use.
        """
        try:
            self._detect_bgr(np.zeros((64, 64, 3), dtype=np.uint8))
            feat = np.asarray(self._recognizer.get_feat(np.full((112, 112, 3), 128, dtype=np.uint8)))
        except Exception as exc:
            raise WeightsError(f"face analysis sessions are broken: {type(exc).__name__}: {exc}") from exc
        if feat.shape != (1, EMBEDDING_DIM) or not np.all(np.isfinite(feat)):
            raise WeightsError(f"face recognizer returned {feat.shape} with non-finite values or wrong size")
