"""``instantid bench``: each benchmark runs end to end at a tiny size and reports what it promises.

No timing is asserted anywhere (these machines are shared and slow): only that the numbers exist, are
positive and finite, that both sides of every comparison ran, and that the full-size SDXL configuration
builds (on the meta device) with the published parameter counts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from serve.bench import percentile
from serve.tools.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    """``instantid ARGV`` in this process; stdout must be exactly one JSON document."""
    assert cli_main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


# ------------------------------------------------------------------------------------------ denoise


@pytest.fixture(scope="module")
def denoise_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench") / "denoise.json"
    argv = ["bench", "denoise", "--profile", "tiny", "--device", "cpu", "--steps", "2", "--size", "64"]
    assert cli_main([*argv, "--batch", "1", "--repeats", "1", "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_denoise_tiny_reports_ours_and_the_stock_pipeline(denoise_report: dict[str, Any]) -> None:
    report = denoise_report
    assert report["benchmark"] == "denoise" and report["profile"] == "tiny"
    for side in ("ours", "baseline"):
        run = report[side]["batch_1"]
        assert positive(run["seconds_per_image"]) and positive(run["images_per_min"])
        assert run["images_per_min"] == pytest.approx(60 / run["seconds_per_image"], rel=1e-3)
        assert run["finite"] is True  # the warm-up's latents (ours) / decoded images (stock) were finite
        assert run["peak_memory_gib"] is None  # CPU: no CUDA allocator to ask
    assert positive(report["ours_over_baseline_seconds_per_image"]["batch_1"])
    assert positive(report["prompt_encoding"]["seconds"])
    assert report["settings"]["cfg"] is True and report["settings"]["size"] == 64
    assert report["machine"]["gpu"] is None and report["machine"]["packages"]["diffusers"]


def test_denoise_cold_start_loads_the_saved_layout_in_a_fresh_process(denoise_report: dict[str, Any]) -> None:
    cold = denoise_report["cold_start"]
    assert positive(denoise_report["cold_start_s"]) and denoise_report["cold_start_s"] == cold["cold_start_s"]
    for key in ("load_denoiser_s", "load_prompt_encoder_s", "first_image_s", "process_s"):
        assert positive(cold[key]), key
    assert cold["image_shape"] == [1, 64, 64, 3]
    assert cold["peak_memory_gib"] is None
    assert denoise_report["saved_weights"]["bytes"] > 0


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_denoise_half_precision_runs_both_pipelines(capsys: pytest.CaptureFixture[str], dtype: str) -> None:
    """The GPU runs are half precision: the stock pipeline must decode its half latents (it once met our
    fp32 VAE and failed with a dtype mismatch), and ours must keep its fp32 decode for float16."""
    argv = ["bench", "denoise", "--profile", "tiny", "--device", "cpu", "--dtype", dtype, "--steps", "1"]
    report = run_cli(capsys, *argv, "--size", "64", "--batch", "1", "--repeats", "1", "--no-cold-start")
    assert report["settings"]["dtype"] == dtype
    assert report["settings"]["vae_dtype"] == ("float32" if dtype == "float16" else dtype)
    assert report["ours"]["batch_1"]["finite"] is True and report["baseline"]["batch_1"]["finite"] is True


def test_denoise_count_ops_shows_ours_projects_fewer_matmuls_per_step(capsys: pytest.CaptureFixture[str]) -> None:
    """Ours adds face attention but projects the unchanging text/face K/V once per batch, so per step it
    dispatches fewer matmuls than the stock pipeline (which re-projects the text every step)."""
    argv = ["bench", "denoise", "--profile", "tiny", "--device", "cpu", "--steps", "1", "--size", "64"]
    report = run_cli(capsys, *argv, "--batch", "1", "--repeats", "1", "--no-cold-start", "--count-ops")
    ours, stock = report["ops_per_step"]["ours"], report["ops_per_step"]["baseline"]
    assert ours["total"] > 0 and stock["total"] > 0
    # tiny UNet: 12 cross-attention layers x 2 text projections saved (the face ones are cached too)
    assert stock["matmul"] - ours["matmul"] == 24


def test_denoise_full_size_builds_on_the_meta_device_with_the_published_sizes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    report = run_cli(capsys, "bench", "denoise", "--profile", "sdxl-random", "--dry-run")
    counts = report["parameters"]
    # The published sizes: UNet 2.57 B, IdentityNet 1.25 B, resampler 82 M, face K/V 341 M, text encoders 818 M.
    assert counts["unet"] == pytest.approx(2.57e9, rel=0.005)
    assert counts["identitynet"] == pytest.approx(1.25e9, rel=0.005)
    assert counts["resampler"] == pytest.approx(82e6, rel=0.01)
    assert counts["face_kv"] == pytest.approx(341e6, rel=0.005)
    assert counts["text_encoder"] + counts["text_encoder_2"] == pytest.approx(818e6, rel=0.005)
    assert report["weights_gib"] == pytest.approx(10.3e9 / 2**30, rel=0.1)  # fp16 stack, fp32 VAE


def test_denoise_bench_runs_without_ray_opencv_insightface_or_onnxruntime(tmp_path: Path) -> None:
    """The GPU machines lack these: the module, the tiny run and the stock baseline must not need them."""
    blocked = ("ray", "cv2", "insightface", "onnxruntime", "boto3", "fastapi", "skimage")
    script = textwrap.dedent(
        f"""
        import runpy, sys

        for name in {blocked!r}:
            sys.modules[name] = None  # import fails, importlib.util.find_spec says absent: as if not installed
        sys.argv = ["denoise_bench", "--profile", "tiny", "--device", "cpu", "--steps", "1", "--size", "64",
                    "--batch", "1", "--repeats", "1", "--no-cold-start", "--out", {str(tmp_path / "d.json")!r}]
        runpy.run_module("serve.bench.denoise_bench", run_name="__main__")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "d.json").read_text())
    assert "face_analysis_stubbed" not in report  # loading.py no longer needs insightface to import
    assert report["ours"]["batch_1"]["finite"] and report["baseline"]["batch_1"]["finite"]


def test_keypoint_image_has_the_published_colours_at_the_keypoints() -> None:
    from deployments.instantid.keypoints import KEYPOINT_COLOURS
    from serve.bench.denoise_bench import FACE_KEYPOINTS, keypoint_image

    image = keypoint_image(256, 192)
    assert image.shape == (192, 256, 3) and image.dtype == np.uint8
    for (x, y), colour in zip(FACE_KEYPOINTS * [256, 192], KEYPOINT_COLOURS, strict=True):
        assert tuple(image[int(y), int(x)]) == colour
    assert image[0, 0].tolist() == [0, 0, 0]


def test_no_cuda_gives_one_error_line(capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert cli_main(["bench", "denoise", "--profile", "sdxl-random", "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --device cuda: CUDA is not available")


# ------------------------------------------------------------------------------------------ face


def test_face_reports_both_configurations(capsys: pytest.CaptureFixture[str]) -> None:
    report = run_cli(capsys, "bench", "face", "--images", "2")
    ours, default = report["ours"], report["insightface_default"]
    for side in (ours, default):
        assert side["images"] == 2
        assert positive(side["images_per_s"]) and positive(side["median_ms_per_image"]) and positive(side["load_s"])
    assert ours["models"] == ["detection", "recognition"]
    assert sorted(default["models"]) == ["detection", "genderage", "landmark_2d_106", "landmark_3d_68", "recognition"]
    assert set(ours["faces_analysed_per_photo"]) == {"astronaut", "t1"}
    assert positive(report["ours_over_default_images_per_s"])
    assert report["settings"]["photos"]["t1"] == [886, 1280, 3]


# ------------------------------------------------------------------------------------------ serve


def test_reports_keep_five_significant_digits_at_every_magnitude() -> None:
    from serve.bench import rounded

    report = {"step_s": 0.000123456789, "rate": 1324.50331, "runs": [3.14159265, float("nan")], "n": 3}
    assert rounded(report) == {"step_s": 0.00012346, "rate": 1324.5, "runs": [3.1416, None], "n": 3}


def test_stage_breakdown_overheads() -> None:
    from serve.bench.serve_bench import stage_breakdown

    timings = [{"face": 0.2, "prompt": 0.1, "denoise": 1.0, "store": 0.1, "total": 1.5}]
    out = stage_breakdown(timings, [1.6], concurrent_face_prompt=True)
    assert out["overhead_s"] == pytest.approx(0.1)  # total - every stage
    assert out["critical_path_overhead_s"] == pytest.approx(0.2)  # face and prompt overlap
    assert out["http_s"] == pytest.approx(0.1)
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([], 95) is None


def bench_serve(home: Path, argv: list[str], timeout: float) -> dict[str, Any]:
    """``instantid bench serve ARGV`` in a subprocess (its own Ray and SeaweedFS); its JSON, also written to --out."""
    out = home / "bench.json"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, "-m", "serve.tools.cli", "bench", "serve", *argv, "--home", str(home), "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report == json.loads(out.read_text())
    return report


@pytest.mark.slow
def test_serve_reports_latency_throughput_breakdown_and_ratios(tmp_path: Path) -> None:
    """In a subprocess: the bench starts its own Ray (and SeaweedFS), apart from the session's cluster."""
    argv = ["--requests", "2", "--concurrency", "2", "--steps", "1", "--size", "256", "--max-seconds", "240"]
    report = bench_serve(tmp_path, argv, timeout=420)

    served, local = report["serve"], report["in_process"]
    c1, cn = served["concurrency_1"], served["concurrency_n"]
    assert c1["latency"]["requests"] == 2 and cn["latency"]["requests"] == 2
    assert positive(c1["latency"]["median_s"]) and positive(c1["latency"]["p95_s"])
    assert positive(cn["throughput_images_per_s"]) and cn["concurrency"] == 2
    for stage in ("face_s", "prompt_s", "denoise_s", "store_s", "total_s"):
        assert positive(c1["breakdown"][stage]), stage
    for key in ("overhead_s", "critical_path_overhead_s", "http_s"):
        assert isinstance(c1["breakdown"][key], float), key
    assert positive(local["latency"]["median_s"]) and positive(local["throughput_images_per_s"])
    for ratio in ("latency_median", "latency_p95", "throughput"):
        assert positive(report["serve_over_in_process"][ratio]), ratio
    assert (tmp_path / "weights" / "tiny" / "sdxl").is_dir()  # made because missing
    assert not report["settings"]["stopped_by_deadline"]


def test_open_loop_mix_is_seeded_poisson_over_the_given_steps_and_images() -> None:
    from serve.bench.batching_bench import request_mix

    args = argparse.Namespace(mix_steps=[4, 8, 30], mix_images=[1, 2])
    shots = request_mix(args, 4000, 2.0, seed=3)
    assert shots == request_mix(args, 4000, 2.0, seed=3) and shots != request_mix(args, 4000, 2.0, seed=4)
    gaps = np.diff([0.0] + [s.at for s in shots])
    assert (gaps > 0).all() and abs(gaps.mean() - 0.5) < 0.03  # exponential gaps with mean 1/rate
    assert abs(gaps.std() - 0.5) < 0.04  # an exponential's standard deviation equals its mean
    assert {s.steps for s in shots} == {4, 8, 30} and {s.images for s in shots} == {1, 2}
    assert len({s.seed for s in shots}) == 4000
    assert all(s.at == 0 for s in request_mix(args, 5, None, seed=0))  # closed loop: no schedule


H200_REPORT = REPO / "serve/bench/results/h200-2026-11-26/run2-float16-interleaved.json"


def test_cost_model_fit_is_least_squares_over_the_reports_forwards() -> None:
    """Forward seconds = seconds_per_run / steps at 2N rows (CFG); the line through them and its residuals."""
    from serve.bench.cost_model import fit_report

    fit = fit_report(H200_REPORT)
    report = json.loads(H200_REPORT.read_text())
    runs = {2 * run["batch"]: run["seconds_per_run"] / 30 for run in report["ours"].values()}
    assert fit.forward_s == pytest.approx(runs) and sorted(runs) == [2, 4, 8]
    xs, ys = np.array(sorted(runs)), np.array([runs[r] for r in sorted(runs)])
    slope, intercept = np.polyfit(xs, ys, 1)
    assert fit.per_row_s == pytest.approx(slope) and fit.launch_s == pytest.approx(intercept)
    assert fit.launch_s == pytest.approx(0.0574, abs=5e-4) and fit.per_row_s == pytest.approx(0.0236, abs=5e-4)
    assert sum(fit.residuals().values()) == pytest.approx(0, abs=1e-12)  # least squares with an intercept
    model = fit.cost_model(["256x256"])
    assert model.source == str(H200_REPORT) and model.by_size()[(256, 256)].seconds(2) == pytest.approx(fit.seconds(2))
    assert "H200" in fit.describe()["measured"] and "1024x1024" in fit.describe()["measured"]


def test_cost_model_refuses_reports_it_cannot_fit(tmp_path: Path) -> None:
    from serve.bench import BenchError
    from serve.bench.cost_model import fit_report

    with pytest.raises(BenchError, match="not an `instantid bench denoise` report"):
        fit_report(REPO / "serve/bench/results/cpu-batching-2026-11-27.json")
    with pytest.raises(BenchError, match="negative constant"):  # two noisy points whose line falls with rows
        fit_report(REPO / "serve/bench/results/h200-2026-11-26/run1-float16-cold-start.json")
    one = json.loads(H200_REPORT.read_text())
    one["ours"] = {"batch_1": one["ours"]["batch_1"]}
    (tmp_path / "one.json").write_text(json.dumps(one))
    with pytest.raises(BenchError, match="at least two batch sizes"):
        fit_report(tmp_path / "one.json")


def test_latency_parts_split_each_request_into_queue_denoise_and_the_rest() -> None:
    """From the responses' timings: the Denoiser's queue wait, the denoise, and the latency outside the Denoiser;
    a response without both timings is left out of the parts, not counted as zero."""
    from serve.bench.batching_bench import Shot, _latency_parts

    def payload(queue: float, denoise: float) -> dict[str, Any]:
        return {"timings": {"denoise_queue": {"seconds": queue}, "denoise": {"seconds": denoise}}}

    shot = Shot(0.0, 4, 1, 1)
    done = [(shot, 3.0, payload(1.0, 1.5)), (shot, 5.0, payload(2.0, 2.5)), (shot, 9.0, {"timings": {}})]
    parts = _latency_parts(done)
    assert parts["denoise_queue"] == {
        "p50": pytest.approx(percentile([1.0, 2.0], 50)),
        "p95": pytest.approx(percentile([1.0, 2.0], 95)),
    }
    assert parts["denoise"]["p50"] == pytest.approx(percentile([1.5, 2.5], 50))
    assert parts["outside_denoiser"]["p50"] == pytest.approx(0.5) and parts["outside_denoiser"]["p95"] == pytest.approx(
        0.5
    )


@pytest.mark.slow
def test_serve_open_loop_compares_static_and_continuous_batching(tmp_path: Path) -> None:
    argv = ["--open-loop", "--mix-steps", "1", "3", "--mix-images", "1", "2", "--clients", "2"]
    argv += ["--saturation-requests", "4", "--load-requests", "4", "--size", "256"]
    report = bench_serve(tmp_path, argv, timeout=600)
    assert report["benchmark"] == "serve-batching" and positive(report["capacity_rps"])
    assert report["load_rate_rps"] == pytest.approx(0.7 * report["capacity_rps"], rel=1e-4)
    for mode in ("static", "continuous"):
        for phase in ("saturation", "load"):
            measured = report[mode][phase]
            assert measured["requests"] == 4 and measured["errors"] == 0, (mode, phase, measured)
            assert all(positive(measured["latency"][q]) for q in ("p50_s", "p95_s", "p99_s"))
            assert measured["forwards"] > 0 and measured["mean_rows_per_forward"] >= 2  # CFG: 2 rows per image
    for ratio in ("p95_at_load", "p50_at_load", "throughput_at_saturation"):
        assert positive(report["continuous_over_static"][ratio]), ratio
    assert "SIMULATED" not in report and report["continuous"]["admission"]["admission"] == "marginal"


@pytest.mark.slow
def test_serve_open_loop_with_a_cost_model_is_a_labelled_simulation_of_both_admissions(
    tmp_path: Path, tiny_weights: Path
) -> None:
    """--cost-model: the real stack, every forward a wait of the H200 fit's length, each output labelled SIMULATED."""
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "tiny").symlink_to(tiny_weights)  # the session's tiny weights as the bench home's
    argv = ["--open-loop", "--cost-model", str(H200_REPORT), "--admission", "marginal", "greedy"]
    argv += ["--mix-steps", "2", "3", "--mix-images", "1", "2", "--clients", "2", "--size", "256"]
    report = bench_serve(tmp_path, [*argv, "--saturation-requests", "3", "--load-requests", "3"], timeout=600)
    fit = report["cost_model"]
    assert report["SIMULATED"].startswith("SIMULATED: forwards wait") and str(H200_REPORT) in report["SIMULATED"]
    assert f"{fit['launch_s']:.5g} s + {fit['per_row_s']:.5g} s/row" in report["SIMULATED"]
    assert fit["source"] == str(H200_REPORT) and set(fit["residual_s_by_rows"]) == {"2", "4", "8"}
    assert "SIMULATED" in report["settings"]["config"] and report["settings"]["admission"] == ["marginal", "greedy"]
    for name in ("static", "continuous", "continuous-greedy"):
        for phase in ("saturation", "load"):
            measured = report[name][phase]
            assert measured["requests"] == 3 and measured["errors"] == 0, (name, phase, measured)
            # every forward waited at least the launch cost: the forwards were the modelled ones
            assert measured["wall_s"] >= measured["forwards"] * fit["launch_s"], (name, phase)
        assert positive(report[f"{name}_over_static"]["p95_at_load"]) if name != "static" else True
    assert report["continuous"]["admission"]["admission"] == "marginal"
    assert report["continuous-greedy"]["admission"] == {"admission": "greedy"}


# ------------------------------------------------------------------------------------------ events


@pytest.mark.slow
def test_events_reports_both_phases_and_every_subscriber_gets_the_outcome(tmp_path: Path, tiny_weights: Path) -> None:
    """In a subprocess, like the serve bench: its own Ray and SeaweedFS; the session's tiny weights as its home's."""
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "tiny").symlink_to(tiny_weights)
    out = tmp_path / "events.json"
    argv = ["--jobs", "1", "--subscribers", "3", "--steps", "2", "--size", "256", "--home", str(tmp_path)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, "-m", "serve.tools.cli", "bench", "events", *argv, "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report == json.loads(out.read_text()) and report["benchmark"] == "events"
    assert report["settings"] | {"jobs": 1, "subscribers": 3, "steps": 2, "size": 256} == report["settings"]
    for phase in ("baseline", "loaded"):
        assert report[phase]["jobs"] == report[phase]["succeeded"] == 1 and report[phase]["failures"] == []
        for times in ("end_to_end", "denoise"):
            assert positive(report[phase][times]["median_s"]) and positive(report[phase][times]["mean_s"])
    assert "subscribers" not in report["baseline"]
    subscribers = report["loaded"]["subscribers"]
    assert subscribers["total"] == subscribers["completed"] == 3 and subscribers["terminal_events"] == {"succeeded": 3}
    assert subscribers["stream_errors"] == 0 and subscribers["step_events"]["expected_per_job"] == 2
    assert report["loaded"]["per_job"][0]["subscribers_completed"] == 3
    for ratio in ("end_to_end_median", "end_to_end_mean", "denoise_median", "denoise_mean"):
        assert positive(report["loaded_over_baseline"][ratio]), ratio


# ------------------------------------------------------------------------------------------ gpu (its CPU dry run)


@pytest.fixture(scope="module")
def gpu_dry_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``instantid bench gpu --device cpu``: the in-process sections on the tiny models, each in its own process.

    cold_start (three fresh processes) and serve (a whole local Ray stack) take minutes on two cores: they run in
    ``instantid bench gpu --device cpu`` by hand, not here.
    """
    work = tmp_path_factory.mktemp("gpu-bench")
    sections = ["pipelines", "switches", "graphs", "compile", "lora_switch", "identities", "lcm"]
    command = ["bench", "gpu", "--device", "cpu", "--repeats", "1", "--sections", *sections]
    assert cli_main([*command, "--workdir", str(work), "--out", str(work / "gpu.json")]) == 0
    report = json.loads((work / "gpu.json").read_text())
    print({name: round(section["section_s"], 1) for name, section in report["sections"].items()})  # seen with -s
    return report


@pytest.mark.slow
@pytest.mark.timeout(3000)  # the module's dry run (its fixture) runs inside the first test's limit
def test_gpu_dry_run_runs_every_section(gpu_dry_run: dict[str, Any]) -> None:
    sections = gpu_dry_run["sections"]
    assert gpu_dry_run["settings"]["profile"] == "tiny" and gpu_dry_run["machine"]["python"]
    for name, section in sections.items():
        assert section["status"] == "ok", (name, section.get("error"), section.get("log_tail"))
        assert positive(section["section_s"]) and not section.get("skipped"), name
        assert section["settings"]["size"] == 64 and section["settings"]["dtype"] == "float32", name
    for batch in ("batch_1", "batch_2", "batch_4"):
        run = sections["pipelines"]["batches"][batch]
        assert positive(run["ours"]["seconds_per_image"]) and positive(run["stock"]["seconds_per_image"])
        assert run["ours"]["finite"] and run["stock"]["finite"] and positive(run["ours_over_stock"])
        assert run["ours"]["batch"] == int(batch.removeprefix("batch_")) and len(run["ours"]["runs_s"]) == 1


@pytest.mark.slow
@pytest.mark.timeout(3000)  # the module's dry run (its fixture) runs inside the first test's limit
def test_gpu_dry_run_compares_each_switch_with_the_eager_images(gpu_dry_run: dict[str, Any]) -> None:
    sections = gpu_dry_run["sections"]
    exact = {"fuse_qkv", "channels_last", "static_step", "cuda_graphs", "compile", "all"}  # float reassociation only
    switches = {**sections["switches"]["switches"], **sections["graphs"]["switches"], **sections["compile"]["switches"]}
    assert set(switches) == {
        "fuse_qkv",
        "channels_last",
        "vae_bf16",
        "fp8",
        "static_step",
        "cuda_graphs",
        "compile",
        "all",
        "off",
    }
    for name, switch in switches.items():
        if name == "fp8" and "error" in switch:  # torchao not installed: the switch says so, the others ran
            assert "torchao" in switch["error"]
            continue
        run = switch["batch_1"]
        assert positive(run["seconds_per_image"]) and positive(run["over_eager"]), name
        assert run["finite"] and positive(run["eager_seconds_per_image"]), name
        assert run["images_vs_eager"]["max_abs"] <= (2 if name in exact else 64), name
    # Every switch off, through accelerate(): the eager images bit for bit (PSNR None: identical).
    assert switches["off"]["batch_1"]["images_vs_eager"] == {"max_abs": 0.0, "psnr_db": None}
    assert "static_forwards" not in switches["off"] and "static_forwards" not in switches["fuse_qkv"]
    # bf16 decode is a real precision change: it shows, and stays small.
    assert 0 < switches["vae_bf16"]["batch_1"]["images_vs_eager"]["max_abs"] <= 64
    assert switches["cuda_graphs"]["batch_2"]["images_vs_eager"]["max_abs"] <= 2
    assert switches["static_step"]["static_forwards"] > 0 and switches["static_step"]["eager_forwards"] == 0
    lora = sections["lora_switch"]
    assert lora["lora_changes_the_image"]["max_abs"] > 4
    assert lora["accelerated"]["images_vs_eager_with_lora"]["max_abs"] <= 2
    assert lora["accelerated"]["images_vs_eager_without_lora"]["max_abs"] <= 2
    assert positive(sections["identities"]["batch_1"]["two_over_one"])
    assert positive(sections["lcm"]["batch_1"]["ours_over_stock"])


@pytest.mark.slow
def test_gpu_sections_are_time_boxed_and_a_killed_one_leaves_valid_json(tmp_path: Path, monkeypatch) -> None:
    """A section that overruns its box is killed; what it wrote stays readable and the next section runs.

    A real section fits what it measures to its box (it skips what would not fit), so the overrunning one is a
    stand-in child that records "running" with the section's own ``Recorder`` and then hangs."""
    from serve.bench import gpu_bench

    real_command = gpu_bench._section_command

    def command(name: str, args: argparse.Namespace, out: Path, box_s: float) -> list[str]:
        if name != "pipelines":
            return real_command(name, args, out, box_s)
        hang = (
            "import time; from pathlib import Path; from serve.bench.gpu_bench import Recorder; "
            f"Recorder(Path({str(out)!r}), {box_s}); time.sleep(600)"
        )
        return [sys.executable, "-c", hang]

    monkeypatch.setattr(gpu_bench, "STARTUP_S", 0.0)
    monkeypatch.setattr(gpu_bench, "_section_command", command)
    monkeypatch.setitem(gpu_bench.SECTIONS, "pipelines", gpu_bench.Box(gpu=1, cpu=12))
    args = argparse.Namespace(
        device="cpu",
        dtype=None,
        size=None,
        steps=None,
        repeats=1,
        sections=["pipelines", "identities"],
        budget_s=600.0,
        workdir=tmp_path,
        out=tmp_path / "gpu.json",
    )
    report = gpu_bench.run(args)
    assert report["sections"]["pipelines"]["status"] == "timed_out"
    assert report["sections"]["identities"]["status"] == "ok"
    assert json.loads((tmp_path / "gpu.json").read_text())["sections"]["identities"]["status"] == "ok"
    assert json.loads((tmp_path / "sections" / "pipelines.json").read_text())["status"] == "running"
