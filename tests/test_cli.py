"""The ``instantid`` command line, run as real processes: tiny weights, generate, and one-line errors.

Each CLI process pays seconds of imports, so one module fixture starts every process this module needs,
two at a time and longest first, and the tests inspect the results.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from PIL import Image

from deployments.instantid.keypoints import reference_size
from serve.tools.cli import main
from tests.support import astronaut_jpeg, group_photo_path

POSE_PHOTO = group_photo_path()
CONSOLE_SCRIPT = Path(sys.executable).parent / "instantid"
TIMEOUT_S = 300
SMALL = ("--width", "256", "--height", "256")


class Run(NamedTuple):
    result: subprocess.CompletedProcess[str]
    out: Path  # what the command was asked to write


def cli_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **extra}
    env.pop("INSTANTID_HOME", None)
    return env


def run_cli(
    args: Sequence[str | Path], *, env: dict[str, str] | None = None, script: bool = False
) -> subprocess.CompletedProcess[str]:
    """The installed ``instantid`` console script, or ``python -m serve.tools.cli`` (the same ``main``)."""
    program = [str(CONSOLE_SCRIPT)] if script else [sys.executable, "-m", "serve.tools.cli"]
    return subprocess.run(
        [*program, *map(str, args)], capture_output=True, text=True, env=env or cli_env(), timeout=TIMEOUT_S
    )


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


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB")).astype(int)


def generate_args(weights: Path, face: Path, out: Path, *flags: str | Path) -> list[str | Path]:
    common = ["--prompt", "an astronaut", "--style", "none"]
    return ["generate", "--weights", weights, "--face", face, *common, "--out", out, *flags]


ERROR_CASES = {
    # name: (flags replacing the defaults (relative paths are in the work folder), what the error line holds)
    "face image without a face": ({"--face": "grey.jpg"}, ("no face",)),
    "missing face file": ({"--face": "missing.jpg"}, ("--face", "cannot read", "missing.jpg")),
    "zero steps": ({"--steps": "0"}, ("num_inference_steps",)),
    "width not a multiple of 8": ({"--width": "250"}, ("width",)),
    "text file as face": ({"--face": "notes.txt"}, ("unsupported image type",)),
    "gif output": ({"--out": "out.gif"}, ("--out", "out.gif")),
    "no weights folder": ({"--weights": "nowhere"}, ("nowhere", "does not exist")),
    "face index out of range": ({"--face-index": "60"}, ("face_index 60 is out of range", "faces found")),
    "pose face index without a pose": ({"--pose-face-index": "1"}, ("--pose-face-index", "--pose")),
    "unknown identity combine": ({"--identity-combine": "median"}, ("identity_combine",)),
}


def failing_generate(weights: Path, work: Path, name: str) -> tuple[list[str | Path], Path]:
    options: dict[str, str | Path] = {
        "--weights": weights,
        "--face": "astronaut.jpg",
        "--prompt": "an astronaut",
        "--seed": "7",
        "--steps": "3",
        "--width": "256",
        "--height": "256",
        "--style": "none",
        "--out": f"fail-{list(ERROR_CASES).index(name)}.png",
    }
    options.update(ERROR_CASES[name][0])
    for flag in ("--face", "--out", "--weights"):
        options[flag] = work / options[flag]
    return ["generate", *(item for pair in options.items() for item in pair)], Path(options["--out"])


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cli")
    (folder / "astronaut.jpg").write_bytes(astronaut_jpeg())
    Image.new("RGB", (256, 256), (128, 128, 128)).save(folder / "grey.jpg", quality=92)
    (folder / "notes.txt").write_text("not an image\n")
    return folder


@pytest.fixture(scope="module")
def runs(tiny_weights: Path, work: Path) -> dict[str, Run]:
    """Every CLI process of the module: two at a time (imports are single-threaded), each with one intra-op
    thread so the two do not oversubscribe a small machine (the pixel comparisons share that setting)."""
    assert CONSOLE_SCRIPT.is_file(), f"the project's console script is not installed at {CONSOLE_SCRIPT}"
    face = work / "astronaut.jpg"
    generations = {  # longest first
        "pose": ("--seed", "7", "--steps", "1", "--pose", POSE_PHOTO),
        "seed7": ("--seed", "7", "--steps", "3", *SMALL),
        "seed7_again": ("--seed", "7", "--steps", "3", *SMALL),
        "seed8": ("--seed", "8", "--steps", "3", *SMALL),
        "two_faces": ("--seed", "7", "--steps", "3", *SMALL, "--face", face, "--identity-combine", "normalized_mean"),
    }
    commands: dict[str, tuple[list[str | Path], Path]] = {
        name: (generate_args(tiny_weights, face, work / f"{name}.png", *flags), work / f"{name}.png")
        for name, flags in generations.items()
    }
    commands["weights tiny"] = (["weights", "tiny", work / "weights"], work / "weights")
    for name in ERROR_CASES:
        commands[name] = failing_generate(tiny_weights, work, name)
    env = cli_env(OMP_NUM_THREADS="1")
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {
            name: pool.submit(run_cli, args, env=env, script=name == "weights tiny")
            for name, (args, _) in commands.items()
        }
        return {name: Run(futures[name].result(), commands[name][1]) for name in commands}


def test_weights_tiny_writes_the_layout(runs: dict[str, Run], tiny_weights: Path) -> None:
    result, folder = runs["weights tiny"]
    assert result.returncode == 0, result.stderr
    assert f"wrote tiny weights to {folder}" in result.stdout
    parts = ["antelopev2", "bases", "controlnets", "depth", "instantid", "licenses.json", "loras", "sdxl"]
    assert sorted(p.name for p in folder.iterdir()) == parts
    assert (folder / "sdxl" / "model_index.json").is_file()
    assert (folder / "bases" / "tiny-alt.safetensors").is_file() and (folder / "bases" / "tiny-alt").is_dir()
    assert (folder / "loras" / "lcm-lora-sdxl.safetensors").is_file()
    assert (folder / "instantid" / "ControlNetModel" / "config.json").is_file()
    assert (folder / "instantid" / "ip-adapter.bin").is_file()
    assert (folder / "controlnets" / "depth" / "config.json").is_file() and (folder / "depth" / "config.json").is_file()
    # Same bytes as the in-process writer with the default seed: deterministic across processes too.
    assert file_hashes(folder) == file_hashes(tiny_weights)


def test_generate_writes_a_png_of_the_asked_size(runs: dict[str, Run]) -> None:
    result, out = runs["seed7"]
    assert result.returncode == 0, result.stderr
    assert f"wrote {out} (256x256, seed 7)" in result.stdout
    image = pixels(out)
    assert image.shape == (256, 256, 3)
    assert image.std() > 0  # not a blank canvas


def test_generate_same_seed_same_pixels_other_seed_differs(runs: dict[str, Run]) -> None:
    for name in ("seed7", "seed7_again", "seed8"):
        assert runs[name].result.returncode == 0, runs[name].result.stderr
    first, again, other = (pixels(runs[name].out) for name in ("seed7", "seed7_again", "seed8"))
    assert np.array_equal(first, again)
    assert np.abs(first - other).max() > 0


def test_generate_with_the_same_photo_twice_gives_the_one_photo_image(runs: dict[str, Run]) -> None:
    result, out = runs["two_faces"]
    assert result.returncode == 0, result.stderr
    assert np.abs(pixels(out).astype(int) - pixels(runs["seed7"].out).astype(int)).max() <= 1


def test_generate_with_a_pose_photo_takes_its_reference_size(runs: dict[str, Run]) -> None:
    result, out = runs["pose"]
    assert result.returncode == 0, result.stderr
    with Image.open(POSE_PHOTO) as photo:
        width, height = reference_size(*photo.size)
    assert (width, height) == (1280, 832)  # t1.jpg is 1280x886
    assert pixels(out).shape == (height, width, 3)
    assert f"({width}x{height}, seed 7)" in result.stdout


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_input_exits_with_one_error_line(runs: dict[str, Run], case: str) -> None:
    result, out = runs[case]
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


# More bad input through the same ``main``, in-process (another CLI process would cost seconds of imports).


def run_main(args: Sequence[str | Path], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return code, lines[0]


@pytest.mark.parametrize(
    ("flags", "fragments"),
    [
        (["--dtype", "float64"], ("--dtype", "float64", "float32")),
        (["--device", "gpu0"], ("--device", "gpu0")),
        (["--device", "cuda:7"], ("--device cuda:7", "no such CUDA device")),
    ],
)
def test_bad_device_or_dtype_is_refused_before_loading(
    tmp_path: Path, work: Path, capsys, flags: list[str], fragments: tuple[str, ...]
) -> None:
    nowhere = tmp_path / "no-weights"  # were the weights loaded first, the error would be about them
    args = generate_args(nowhere, work / "astronaut.jpg", tmp_path / "out.png", "--steps", "1", *flags)
    code, line = run_main(args, capsys)
    assert code == 2
    assert all(fragment in line for fragment in fragments), line
    assert "no-weights" not in line


def test_unwritable_outputs_are_one_line_errors(tiny_weights: Path, work: Path, tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")
    code, line = run_main(["weights", "tiny", blocker], capsys)
    assert code == 2 and "cannot write tiny weights" in line and "a-file" in line
    args = generate_args(tiny_weights, work / "astronaut.jpg", blocker / "out.png", "--steps", "1", *SMALL)
    code, line = run_main(args, capsys)
    assert code == 2 and line.startswith("error: --out: cannot write") and "a-file" in line
    assert blocker.read_text() == "in the way"


def test_generate_several_people_with_identity_flags(tiny_weights: Path, work: Path, tmp_path: Path, capsys) -> None:
    """``--identity FACE[:X1,Y1,X2,Y2]`` repeated: one photo per person, each with the region it owns."""
    out = tmp_path / "two.png"
    args = [
        "generate", "--weights", tiny_weights, "--prompt", "two people", "--style", "none", "--steps", "1",
        "--width", "512", "--height", "256", "--seed", "3", "--out", out,
        "--identity", f"{work / 'astronaut.jpg'}:0,0,256,256", "--identity", f"{POSE_PHOTO}:256,0,512,256",
    ]  # fmt: skip
    assert main([str(a) for a in args]) == 0, capsys.readouterr().err
    assert "(512x256, seed 3)" in capsys.readouterr().out
    assert pixels(out).shape == (256, 512, 3)


def test_generate_from_an_exported_identity_equals_the_photo(
    tiny_weights: Path, work: Path, tmp_path: Path, capsys
) -> None:
    """``--identity-file``: a saved identity's export (as ``GET /v1/identities/ID?include=embeddings`` gives it)
    makes the image its photo makes, without analysing a photo."""
    import json

    from deployments.generation.face_stage import FaceStage
    from deployments.generation.messages import IdentityRequest
    from deployments.generation.saved import saved_photos
    from deployments.instantid.faces import FaceAnalyzer

    stage = FaceStage(FaceAnalyzer(tiny_weights / "antelopev2", providers=["CPUExecutionProvider"]))
    enrolment = stage.enrol("mean", stage.identify(IdentityRequest(astronaut_jpeg(), 0, 1, 0, thumbnail=True)))
    photos = saved_photos(enrolment.chosen)
    export = {
        "id": "idt-20261207T120000Z-0123456789abcdef",
        "identity_combine": "mean",
        "photos": [{k: v for k, v in p.items() if k != "embedding"} | {"sha256": "0" * 64} for p in photos],
        "embedding": enrolment.embedding.tolist(),
        "photo_embeddings": [p["embedding"] for p in photos],
    }
    exported = tmp_path / "identity.json"
    exported.write_text(json.dumps(export))
    common = ["--prompt", "a portrait", "--style", "none", "--steps", "1", "--seed", "4", *SMALL]
    by_file = [*generate_args(tiny_weights, work / "astronaut.jpg", tmp_path / "file.png", *common)]
    by_file[by_file.index("--face") : by_file.index("--face") + 2] = ["--identity-file", exported]
    assert main([str(a) for a in by_file]) == 0, capsys.readouterr().err
    by_photo = generate_args(tiny_weights, work / "astronaut.jpg", tmp_path / "photo.png", *common)
    assert main([str(a) for a in by_photo]) == 0, capsys.readouterr().err
    assert np.array_equal(pixels(tmp_path / "file.png"), pixels(tmp_path / "photo.png"))

    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"id": "x", "photos": []}))
    by_file[by_file.index("--identity-file") + 1] = broken
    code, line = run_main([str(a) for a in by_file], capsys)
    assert code == 2 and line.startswith("error: --identity-file") and "include=embeddings" in line, line
    by_file[by_file.index("--identity-file") + 1] = exported
    code, line = run_main([*map(str, by_file), "--face-index", "1"], capsys)
    assert code == 2 and "drop --face-index" in line, line


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--identity", "A"], "--identity holds 2 to 4 people, got 1"),
        (
            ["--identity", "A", "--identity", "A", "--face", "A"],
            "--face (one person), --identity-file (one saved identity) and --identity",
        ),
        (["--identity", "A:0,0,300,256", "--identity", "A:256,0,512,256"], "overlap"),
        (["--identity", "A:0,0,256,256", "--identity", "A"], "a region for every identity or for none"),
    ],
)
def test_bad_identity_flags_are_one_line_errors(
    tiny_weights: Path, work: Path, tmp_path: Path, capsys, flags: list[str], fragment: str
) -> None:
    face = str(work / "astronaut.jpg")
    flags = [face + flag[1:] if flag.startswith("A") else flag for flag in flags]
    args = ["generate", "--weights", tiny_weights, "--prompt", "x", "--steps", "1", "--width", "512", "--height", "256"]
    code, line = run_main([*args, "--out", tmp_path / "o.png", *flags], capsys)
    assert code == 2 and fragment in line, line
