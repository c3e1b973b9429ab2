"""The ``instantid`` command line, run as real processes: tiny weights, generate, and one-line errors.

Each CLI process pays several seconds of imports, so the processes a module needs are started together
(two at a time) by module fixtures and the tests inspect their results.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import insightface
import numpy as np
import pytest
from PIL import Image
from skimage import data

from deployments.instantid.keypoints import reference_size

POSE_PHOTO = Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"
CONSOLE_SCRIPT = Path(sys.executable).parent / "instantid"
TIMEOUT_S = 300


def cli_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **extra}
    env.pop("INSTANTID_HOME", None)
    return env


def run_cli(args: Sequence[str | Path], *, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "serve.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=env or cli_env(),
        timeout=TIMEOUT_S,
    )


def run_many(commands: dict[str, Sequence[str | Path]]) -> dict[str, subprocess.CompletedProcess[str]]:
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(run_cli, args) for name, args in commands.items()}
        return {name: future.result() for name, future in futures.items()}


def file_hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def assert_one_error_line(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cli")
    Image.fromarray(data.astronaut()).save(folder / "astronaut.jpg", quality=92)
    Image.new("RGB", (256, 256), (128, 128, 128)).save(folder / "grey.jpg", quality=92)
    (folder / "notes.txt").write_text("not an image\n")
    return folder


@pytest.fixture(scope="module")
def tiny_cli(work: Path) -> tuple[subprocess.CompletedProcess[str], Path]:
    """``instantid weights tiny DIR`` through the installed console script."""
    assert CONSOLE_SCRIPT.is_file(), f"the project's console script is not installed at {CONSOLE_SCRIPT}"
    folder = work / "weights"
    result = subprocess.run(
        [str(CONSOLE_SCRIPT), "weights", "tiny", str(folder)],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=TIMEOUT_S,
    )
    return result, folder


@pytest.fixture(scope="module")
def weights(tiny_cli: tuple[subprocess.CompletedProcess[str], Path]) -> Path:
    result, folder = tiny_cli
    assert result.returncode == 0, result.stderr
    return folder


def generate_args(weights: Path, face: Path, out: Path, *extra: str | Path, size: bool = True) -> list[str | Path]:
    args: list[str | Path] = ["generate", "--weights", weights, "--face", face, "--prompt", "an astronaut portrait"]
    args += ["--style", "none", "--out", out]
    if size:
        args += ["--width", "256", "--height", "256"]
    return [*args, *extra]


@pytest.fixture(scope="module")
def generations(weights: Path, work: Path) -> dict[str, tuple[subprocess.CompletedProcess[str], Path]]:
    face = work / "astronaut.jpg"
    outs = {name: work / f"{name}.png" for name in ("seed7", "seed7_again", "seed8", "pose")}
    commands = {
        "seed7": generate_args(weights, face, outs["seed7"], "--seed", "7", "--steps", "3"),
        "seed7_again": generate_args(weights, face, outs["seed7_again"], "--seed", "7", "--steps", "3"),
        "seed8": generate_args(weights, face, outs["seed8"], "--seed", "8", "--steps", "3"),
        "pose": generate_args(
            weights, face, outs["pose"], "--seed", "7", "--steps", "1", "--pose", POSE_PHOTO, size=False
        ),
    }
    results = run_many(commands)
    return {name: (results[name], outs[name]) for name in commands}


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB")).astype(int)


def test_weights_tiny_writes_the_layout(tiny_cli, tiny_weights: Path) -> None:
    result, folder = tiny_cli
    assert result.returncode == 0, result.stderr
    assert str(folder) in result.stdout
    assert sorted(p.name for p in folder.iterdir()) == ["antelopev2", "instantid", "sdxl"]
    assert (folder / "sdxl" / "model_index.json").is_file()
    assert (folder / "instantid" / "ControlNetModel" / "config.json").is_file()
    assert (folder / "instantid" / "ip-adapter.bin").is_file()
    # Same bytes as the in-process writer with the default seed: deterministic across processes too.
    assert file_hashes(folder) == file_hashes(tiny_weights)


def test_generate_writes_a_png_of_the_asked_size(generations) -> None:
    result, out = generations["seed7"]
    assert result.returncode == 0, result.stderr
    assert f"wrote {out} (256x256, seed 7)" in result.stdout
    image = pixels(out)
    assert image.shape == (256, 256, 3)
    assert image.std() > 0  # not a blank canvas


def test_generate_same_seed_same_pixels_other_seed_differs(generations) -> None:
    for name in ("seed7", "seed7_again", "seed8"):
        assert generations[name][0].returncode == 0, generations[name][0].stderr
    first, again, other = (pixels(generations[name][1]) for name in ("seed7", "seed7_again", "seed8"))
    assert np.array_equal(first, again)
    assert np.abs(first - other).max() > 0


def test_generate_with_a_pose_photo_takes_its_reference_size(generations) -> None:
    result, out = generations["pose"]
    assert result.returncode == 0, result.stderr
    with Image.open(POSE_PHOTO) as photo:
        width, height = reference_size(*photo.size)
    assert (width, height) == (1280, 832)  # t1.jpg is 1280x886
    assert pixels(out).shape == (height, width, 3)
    assert f"({width}x{height}, seed 7)" in result.stdout


ERROR_CASES = {
    # name: (arguments replacing the defaults, fragments the one error line must hold)
    "missing face file": ({"--face": "missing.jpg"}, ("--face", "cannot read", "missing.jpg")),
    "face image without a face": ({"--face": "grey.jpg"}, ("no face",)),
    "zero steps": ({"--steps": "0"}, ("num_inference_steps",)),
    "width not a multiple of 8": ({"--width": "250"}, ("width",)),
    "text file as face": ({"--face": "notes.txt"}, ("unsupported image type",)),
    "gif output": ({"--out": "out.gif"}, ("--out", "out.gif")),
    "no weights folder": ({"--weights": "nowhere"}, ("nowhere", "does not exist")),
}


@pytest.fixture(scope="module")
def failures(weights: Path, work: Path) -> dict[str, tuple[subprocess.CompletedProcess[str], Path]]:
    commands: dict[str, list[str | Path]] = {}
    outs: dict[str, Path] = {}
    for name, (changes, _) in ERROR_CASES.items():
        options: dict[str, str | Path] = {
            "--weights": weights,
            "--face": "astronaut.jpg",
            "--prompt": "an astronaut",
            "--seed": "7",
            "--steps": "3",
            "--width": "256",
            "--height": "256",
            "--style": "none",
            "--out": f"fail-{len(outs)}.png",
        }
        options.update(changes)
        for flag in ("--face", "--out", "--weights"):  # relative names live in the work folder
            options[flag] = work / options[flag]
        outs[name] = Path(options["--out"])
        commands[name] = ["generate", *(item for pair in options.items() for item in pair)]
    results = run_many(commands)
    return {name: (results[name], outs[name]) for name in commands}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_input_exits_with_one_error_line(failures, case: str) -> None:
    result, out = failures[case]
    assert_one_error_line(result, *ERROR_CASES[case][1])
    assert result.returncode == 2
    assert not out.exists()


@pytest.mark.parametrize("offline", ["1", "true"])
def test_weights_download_offline_fails_with_one_line_and_writes_nothing(tmp_path: Path, offline: str) -> None:
    target = tmp_path / "real-weights"
    result = run_cli(["weights", "download", target], env=cli_env(HF_HUB_OFFLINE=offline))
    line = assert_one_error_line(result)
    assert "offline" in line.lower() or "HF_HUB_OFFLINE" in line
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []
