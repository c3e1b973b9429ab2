"""``instantid bench gpu``: every figure the project needs from a GPU machine, in one run of at most ~8 minutes.

One command takes everything, in priority order, so that a single short session on a GPU yields every figure
(``gpu_sections`` says what each section measures):

    pipelines    ours (eager) vs diffusers' stock SDXL ControlNet pipeline at batch 1, 2 and 4 (ABBA, one process)
    switches     each speed switch alone against the eager denoiser (ABBA), its image against eager's (max
                 pixel difference, PSNR): fused QKV, channels-last, bf16 VAE decode, fp8, the bucketed step;
                 last, every switch off through the same path (must give the eager image exactly)
    graphs       the bucketed step recorded as CUDA graphs, against eager, at batch 1 and 2
    compile      regional torch.compile (+ bucketed step), then everything at once (compile + graphs + fused QKV +
                 channels-last): compile time, speed, pixel difference
    lora_switch  what a LoRA switch costs (merge, restore, fused-projection refresh) and whether the graphs' image
                 after a switch is the eager one
    identities   two people in one image against one
    lcm          the LCM mode at batch 1, ours vs stock
    cold_start   a fresh process loads saved weights and finishes an image: eager, compiled with a cold compile
                 cache, compiled with the warm cache
    serve        the Serve stack's static vs continuous batching under open-loop load with the Denoiser on the GPU
                 (needs ray[serve] and the stack's packages there: fails soft, saying what is missing)

Each section runs in its own process under its own time box (a CUDA error, an out-of-memory or a hang in one cannot
take the others down), the sections share one overall budget, and the report is rewritten after every section and
every measurement inside one (written whole to a temporary file, then renamed: the file on disk is always valid
JSON, whatever stops the run). Peak GPU memory comes with every timed run.

``--device cpu`` is a dry run on the tiny test models (64 px, 2 steps, a few seconds per section): CI runs it so
that this script cannot rot between GPU runs. Like ``denoise_bench`` this module imports only torch and numpy at
module level and needs neither Ray nor insightface except in the serve section.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serve.bench import BenchError, add_gpu_arguments, machine_facts, progress, rounded

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("torch", "diffusers", "transformers", "torchao", "ray", "accelerate", "safetensors")
STARTUP_S = 20.0  # a section's process: interpreter, imports, CUDA context (on top of its own box)


@dataclass(frozen=True)
class Box:
    """A section's time box in seconds: on a GPU (full size) and in the CPU dry run (tiny models)."""

    gpu: float
    cpu: float


# Priority order: when the budget runs out, the later sections are skipped (and say so).
# CPU boxes are generous: they bound a dry run on a loaded CI machine, they are not estimates.
SECTIONS: dict[str, Box] = {
    "pipelines": Box(110, 480),
    "switches": Box(100, 600),  # a dry run under a load average of 20 timed out at 240 s
    "graphs": Box(45, 360),
    "compile": Box(130, 600),
    "lora_switch": Box(40, 360),
    "identities": Box(30, 240),
    "lcm": Box(30, 360),
    "cold_start": Box(150, 300),
    "serve": Box(150, 420),
}


def write_json(path: Path, document: dict[str, Any]) -> None:
    """Replace ``path`` with ``document`` at once (write a sibling, then rename): never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    with os.fdopen(handle, "w") as out:
        json.dump(rounded(document), out, indent=2)
        out.write("\n")
    os.replace(temporary, path)


class Recorder:
    """What a section measured so far, written out after every addition, and the section's deadline."""

    def __init__(self, path: Path, box_s: float) -> None:
        self.path = path
        self.deadline = time.monotonic() + box_s
        self.data: dict[str, Any] = {"status": "running"}
        self.flush()

    def __setitem__(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.flush()

    def flush(self) -> None:
        write_json(self.path, self.data)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def has_time(self, needed_s: float, what: str) -> bool:
        """Whether ``needed_s`` more seconds fit the box; if not, ``what`` is listed as skipped."""
        if self.left() >= needed_s:
            return True
        self.data.setdefault("skipped", []).append(
            f"{what} (time box: {self.left():.0f} s left, ~{needed_s:.0f} s needed)"
        )
        self.flush()
        return False


# ------------------------------------------------------------------------------------------ the parent


def _section_command(name: str, args: argparse.Namespace, out: Path, box_s: float) -> list[str]:
    command = [sys.executable, "-m", "serve.bench.gpu_bench", "--section", name, "--section-out", str(out)]
    command += ["--box-s", f"{box_s:.1f}", "--device", args.device, "--workdir", str(args.workdir)]
    for flag, value in (("--dtype", args.dtype), ("--size", args.size), ("--steps", args.steps)):
        if value is not None:
            command += [flag, str(value)]
    command += ["--repeats", str(args.repeats)]
    return command


def run_section(name: str, box_s: float, args: argparse.Namespace) -> dict[str, Any]:
    """``name`` in a child process: killed (its process group) ``STARTUP_S`` after its box; what it recorded
    until then is kept."""
    out = Path(args.workdir) / "sections" / f"{name}.json"
    out.unlink(missing_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    started = time.perf_counter()
    log = Path(args.workdir) / "sections" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            _section_command(name, args, out, box_s),
            cwd=REPO_ROOT,
            env=env,
            stdout=stderr,
            stderr=stderr,
            start_new_session=True,  # its own process group: a kill takes its children (cold-start loads) too
        )
        try:
            code = proc.wait(timeout=box_s + STARTUP_S)
            status = None
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code, status = proc.returncode, "timed_out"
    try:
        result = json.loads(out.read_text())
    except (OSError, ValueError):
        result = {}
    if status is None:
        status = result.get("status") if code == 0 else "failed"
        status = "ok" if status in (None, "running") else status
    result["status"] = status
    result["section_s"] = time.perf_counter() - started
    result["box_s"] = box_s
    if status in ("failed", "timed_out"):
        result["exit_code"] = code
        result["log_tail"] = log.read_text(errors="replace")[-1500:]
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    gpu = args.device != "cpu"
    names = args.sections or list(SECTIONS)
    unknown = sorted(set(names) - set(SECTIONS))
    if unknown:
        raise BenchError(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    budget = args.budget_s if args.budget_s is not None else (480.0 if gpu else 2400.0)
    out = Path(args.out) if args.out is not None else Path(args.workdir) / "gpu-bench.json"
    report: dict[str, Any] = {
        "benchmark": "gpu",
        "machine": machine_facts(PACKAGES),
        "settings": {
            "device": args.device,
            "profile": "sdxl-random" if gpu else "tiny",
            "budget_s": budget,
            "sections": names,
            "repeats": args.repeats,
            "order": "per comparison: a checked warm-up each, then timed runs alternating (ABBA)",
        },
        "sections": {},
    }
    started = time.monotonic()
    for name in names:
        left = budget - (time.monotonic() - started)
        box = min(SECTIONS[name].gpu if gpu else SECTIONS[name].cpu, left - STARTUP_S)
        if box < 10:
            report["sections"][name] = {"status": "skipped", "reason": f"the run's budget ({budget:.0f} s) is spent"}
            write_json(out, report)
            continue
        progress(f"section {name}: time box {box:.0f} s ({left:.0f} s of the budget left)")
        report["sections"][name] = run_section(name, box, args)
        report["total_s"] = time.monotonic() - started
        write_json(out, report)
        progress(
            f"section {name}: {report['sections'][name]['status']} in {report['sections'][name]['section_s']:.1f} s"
        )
    report["total_s"] = time.monotonic() - started
    write_json(out, report)
    return report


# ------------------------------------------------------------------------------------------ the children


def run_child(args: argparse.Namespace) -> int:
    recorder = Recorder(Path(args.section_out), args.box_s - 5.0)  # 5 s to write and exit before the kill
    try:
        from serve.bench import gpu_sections

        gpu_sections.run(args.section, gpu_sections.Context.of(args), recorder)
    except Exception as exc:  # recorded, then the parent marks the section failed from the exit code
        recorder["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        raise
    if recorder.data.get("status") == "running":
        recorder["status"] = "ok"
    return 0


def main_from_args(args: argparse.Namespace) -> int:
    if args.section is not None:
        return run_child(args)
    if args.workdir is None:
        args.workdir = Path(tempfile.mkdtemp(prefix="instantid-gpu-bench-"))
    args.workdir = Path(args.workdir).resolve()
    report = run(args)
    sys.stdout.write(json.dumps(rounded(report), indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve.bench.gpu_bench", description=__doc__.split("\n\n")[0])
    add_gpu_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return main_from_args(args)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
