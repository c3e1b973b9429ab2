"""The soak over time in one PNG: latency, throughput and errors, with every fault's span shaded and named."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from .records import RunLog

BIN_S = 10.0
GENERATE = ("generate_json", "generate_multipart")


def plot(log: RunLog, path: Path, t0: float) -> Path:
    """Write the PNG (matplotlib, headless) with time in seconds since ``t0`` (the start of the open-loop traffic)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (latency, throughput, errors) = plt.subplots(3, 1, figsize=(13, 9), sharex=True)
    ok = [(e.scheduled_at - t0, e.latency_s) for e in log.exchanges if e.kind in GENERATE and e.status == 200]
    bad = [
        (e.scheduled_at - t0, e.latency_s)
        for e in log.exchanges
        if e.kind in GENERATE and (e.status is None or e.status >= 500)
    ]
    if ok:
        latency.scatter(*zip(*ok, strict=True), s=6, color="tab:blue", label="200")
    if bad:
        latency.scatter(*zip(*bad, strict=True), s=14, marker="x", color="tab:red", label="5xx / no answer")
    latency.set_ylabel("generate latency (s)\nfrom scheduled arrival")
    latency.legend(loc="upper right", fontsize=8)

    bins: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    for e in log.exchanges:
        slot = int((e.finished_at - t0) // BIN_S)
        if e.kind in GENERATE and e.status == 200:
            bins["generations"][slot] += 1
        if e.kind == "hostile":
            bins["hostile"][slot] += 1
        elif e.status is None or e.status >= 500:
            bins["5xx / no answer"][slot] += 1
        elif e.status >= 400:
            bins["4xx (not hostile)"][slot] += 1
    for job in log.jobs:
        final = job.final or {}
        if final.get("status") == "succeeded" and job.stream and job.stream.terminal_at:
            bins["jobs"][int((job.stream.terminal_at - t0) // BIN_S)] += 1

    every = [slot for counts in bins.values() for slot in counts]
    first, last = (min(every), max(every) + 1) if every else (0, 1)

    def series(name: str) -> tuple[list[float], list[float]]:
        """A step line over every bin of the run (a bin without answers is a 0, not a gap)."""
        slots = range(first, last + 1)
        return [s * BIN_S for s in slots], [bins[name].get(s, 0) / BIN_S for s in slots]

    for name, colour in (("generations", "tab:green"), ("jobs", "tab:purple")):
        if bins[name]:
            throughput.step(*series(name), where="post", color=colour, label=f"{name} done / s")
    throughput.set_ylabel("per second")
    throughput.legend(loc="upper right", fontsize=8)
    for name, colour in (("5xx / no answer", "tab:red"), ("4xx (not hostile)", "tab:orange"), ("hostile", "grey")):
        if bins[name]:
            errors.step(*series(name), where="post", color=colour, label=name)
    errors.set_ylabel("answers / s")
    errors.set_xlabel(f"seconds since the open-loop traffic started ({BIN_S:.0f} s bins)")
    errors.legend(loc="upper right", fontsize=8)

    for fault in log.faults:
        start = fault.started_at - t0
        end = (fault.ended_at or log.traffic_end) - t0
        for axis in (latency, throughput, errors):
            axis.axvspan(start, max(end, start + 1), color="tab:red" if fault.error else "gold", alpha=0.25)
        latency.annotate(
            f"{fault.kind}:{fault.target}" if fault.kind == "replica" else fault.kind,
            (start, 1.0),
            xycoords=("data", "axes fraction"),
            rotation=90,
            fontsize=7,
            va="top",
        )
    figure.suptitle("instantid bench chaos: faults shaded")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
