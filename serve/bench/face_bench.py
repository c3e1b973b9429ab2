"""``instantid bench face``: our face analysis against insightface's default ``FaceAnalysis`` app.

Ours (:class:`deployments.instantid.faces.FaceAnalyzer`) opens only the detector and the recogniser and
recognises only the largest face, which is all InstantID uses. insightface's default configuration opens
all five antelopev2 models and runs landmarks (2D and 3D), gender/age and recognition on every detected
face. Both run on the same photos (scikit-image's astronaut, one face; insightface's ``t1.jpg``, six faces)
with the same onnxruntime providers, in the same process, one after the other.

Default weights are tiny random models in the published file layout (made in a temp dir): they have the
real signatures and insightface routes them like the real ones, but their cost is not the real models'.
``--weights`` points at a real antelopev2 folder for numbers that mean something.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from serve.bench import BenchError, emit, machine_facts, progress


def bench_photos() -> dict[str, np.ndarray]:
    """RGB uint8 photos: a one-face portrait and insightface's six-face group photo."""
    import insightface
    from skimage import data

    from deployments.instantid.images import decode_image

    group = Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"
    if not group.is_file():
        raise BenchError(f"insightface's sample photo {group} is missing (is insightface installed whole?)")
    return {"astronaut": np.ascontiguousarray(data.astronaut()[:, :, :3]), "t1": decode_image(group.read_bytes())}


@contextlib.contextmanager
def antelopev2_folder(weights: Path | None) -> Iterator[tuple[Path, str]]:
    """``(folder, kind)``: the given antelopev2 folder (or ``weights/antelopev2``), else tiny ones in a temp dir."""
    if weights is not None:
        folder = weights / "antelopev2" if (weights / "antelopev2").is_dir() else weights
        yield folder, "given"
        return
    from deployments.tiny.faces import write_tiny_antelopev2

    with tempfile.TemporaryDirectory(prefix="instantid-bench-faces-") as tmp:
        folder = Path(tmp) / "antelopev2"
        write_tiny_antelopev2(folder)
        yield folder, "tiny (random models with the published signatures; costs are not the real models')"


def _time_images(analyse: Callable[[str], int], names: list[str], count: int) -> dict[str, Any]:
    """One warm-up per photo, then ``count`` timed calls cycling through the photos."""
    for name in names:
        analyse(name)
    per_image: list[float] = []
    faces: dict[str, int] = {}
    start = time.perf_counter()
    for i in range(count):
        name = names[i % len(names)]
        t = time.perf_counter()
        faces[name] = analyse(name)
        per_image.append(time.perf_counter() - t)
    wall = time.perf_counter() - start
    return {
        "images": count,
        "seconds": wall,
        "images_per_s": count / wall,
        "median_ms_per_image": 1000 * statistics.median(per_image),
        "faces_analysed_per_photo": faces,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    import insightface
    import onnxruntime
    from insightface.app import FaceAnalysis

    from deployments.instantid.errors import NoFaceError
    from deployments.instantid.faces import RECOGNIZER_FILE, FaceAnalyzer, default_providers, validate_model_dir

    providers = args.providers.split(",") if args.providers else default_providers()
    photos = bench_photos()
    bgr = {name: np.ascontiguousarray(rgb[:, :, ::-1]) for name, rgb in photos.items()}  # insightface's input
    names = list(photos)
    with antelopev2_folder(args.weights) as (folder, kind):
        validate_model_dir(folder)
        # onnxruntime's process-wide set-up happens at the first session: pay it here, outside both load times.
        onnxruntime.InferenceSession(str(folder / RECOGNIZER_FILE), providers=providers)
        progress(f"ours: detection + recognition of the largest face ({folder})")
        start = time.perf_counter()
        ours = FaceAnalyzer(folder, providers=providers)
        ours_load = time.perf_counter() - start

        def analyse_ours(name: str) -> int:
            try:
                ours.analyze(photos[name])
            except NoFaceError:
                return 0
            return 1

        ours_result = _time_images(analyse_ours, names, args.images)
        ours_result |= {"load_s": ours_load, "models": ["detection", "recognition"], "recognises": "largest face"}

        progress("insightface default: FaceAnalysis(allowed_modules=None), every model on every face")
        start = time.perf_counter()
        # insightface's own logging is chatty on stdout in some versions: stdout is for our JSON only.
        with contextlib.redirect_stdout(sys.stderr):
            app = FaceAnalysis(name=str(folder), allowed_modules=None, providers=providers)
            app.prepare(ctx_id=0, det_size=(640, 640))
        default_load = time.perf_counter() - start

        def analyse_default(name: str) -> int:
            return len(app.get(bgr[name]))

        default_result = _time_images(analyse_default, names, args.images)
        default_result |= {"load_s": default_load, "models": sorted(app.models), "recognises": "every face"}

    return {
        "benchmark": "face",
        "machine": machine_facts(("onnxruntime", "insightface", "numpy"))
        | {"onnxruntime_providers": onnxruntime.get_available_providers()},
        "settings": {
            "weights": kind,
            "antelopev2": str(folder) if args.weights is not None else None,
            "providers": providers,
            "det_size": [640, 640],
            "photos": {name: list(rgb.shape) for name, rgb in photos.items()},
            "insightface": insightface.__version__,
        },
        "ours": ours_result,
        "insightface_default": default_result,
        "ours_over_default_images_per_s": ours_result["images_per_s"] / default_result["images_per_s"],
    }


def main_from_args(args: argparse.Namespace) -> int:
    emit(run(args), args.out)
    return 0
