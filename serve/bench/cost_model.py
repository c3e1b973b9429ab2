"""The forward cost a SIMULATED Denoiser waits, fitted from a denoise-bench report measured on a GPU.

``instantid bench denoise`` times our denoiser's whole ``generate()`` per batch size N (N single-image requests,
``settings.steps`` steps, CFG: 2N UNet rows per forward). A forward then costs about ``seconds_per_run / steps``,
and a least-squares line through those points gives ``seconds = launch_s + per_row_s x rows``.

What is not per step cannot be separated in such a report: the per-run work (each job's setup, the VAE decode of
each image) grows with N exactly as the rows do, so it lands in the line, spread over the steps (a decode per
image adds to ``per_row_s``, setup per run to ``launch_s``). That is why the simulated denoiser skips the VAE
decode (its cost is already in the line) but still runs the tiny model's real job setup on top, so it slightly
overstates a GPU's per-request cost; the residuals show how far the points are from a line at all (a GPU's
forward cost bends upwards once the batch fills the device).

The line is fitted here, unweighted, over the report's batch sizes; the admission policy
(``deployments/instantid/admission.py``) does not use it: it estimates its own forwards' fixed cost online.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deployments.config import DenoiserCostModel, ForwardCost
from serve.bench import BenchError


def fit_line(points: dict[int, float]) -> tuple[float, float] | None:
    """Least squares (intercept, slope) through (rows, seconds); None without two distinct row counts."""
    if len(points) < 2:
        return None
    mean_x = sum(points) / len(points)
    mean_y = sum(points.values()) / len(points)
    sxx = sum((r - mean_x) ** 2 for r in points)
    slope = sum((r - mean_x) * (s - mean_y) for r, s in points.items()) / sxx
    return mean_y - slope * mean_x, slope


@dataclass(frozen=True)
class CostFit:
    """The fitted line and the report it came from."""

    source: str
    measured: str  # what the report measured: device, dtype, size, steps
    steps: int
    rows_per_image: int
    forward_s: dict[int, float]  # rows -> seconds_per_run / steps
    launch_s: float
    per_row_s: float

    def seconds(self, rows: int) -> float:
        return self.launch_s + self.per_row_s * rows

    def residuals(self) -> dict[int, float]:
        return {rows: measured - self.seconds(rows) for rows, measured in self.forward_s.items()}

    def describe(self) -> dict[str, Any]:
        """For reports: the constants, the points, the residuals (seconds and relative)."""
        return {
            "source": self.source,
            "measured": self.measured,
            "model": "forward seconds = launch_s + per_row_s x rows (least squares over the report's batch sizes)",
            "launch_s": self.launch_s,
            "per_row_s": self.per_row_s,
            "forward_s_by_rows": {str(r): s for r, s in sorted(self.forward_s.items())},
            "residual_s_by_rows": {str(r): s for r, s in sorted(self.residuals().items())},
            "residual_relative_by_rows": {str(r): s / self.forward_s[r] for r, s in sorted(self.residuals().items())},
            "not_separated": "per-run work (job setup, VAE decode of each image) is spread over the steps and "
            "included in the constants: a report of one step count cannot tell it from the per-row cost",
        }

    def cost_model(self, sizes: list[str]) -> DenoiserCostModel:
        """A cost model that gives requests of ``sizes`` ("WxH") this fit's forward cost."""
        cost = ForwardCost(launch_s=self.launch_s, per_row_s=self.per_row_s)
        note = f"fitted from {self.measured}; every forward of the listed sizes costs as that forward does"
        return DenoiserCostModel(source=self.source, sizes=dict.fromkeys(sizes, cost), note=note)


def fit_report(path: Path) -> CostFit:
    """Fit ``launch_s + per_row_s x rows`` to a denoise-bench report's ``ours.batch_N.seconds_per_run``."""
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise BenchError(f"--cost-model {path}: not a readable JSON report ({exc})") from None
    settings, ours = report.get("settings") or {}, report.get("ours") or {}
    if report.get("benchmark") != "denoise" or not ours or "steps" not in settings:
        raise BenchError(f"--cost-model {path}: not an `instantid bench denoise` report (benchmark, settings, ours)")
    steps = int(settings["steps"])
    rows_per_image = 2 if settings.get("cfg", True) else 1
    forward_s = {run["batch"] * rows_per_image: run["seconds_per_run"] / steps for run in ours.values()}
    line = fit_line(forward_s)
    if line is None:
        raise BenchError(f"--cost-model {path}: needs at least two batch sizes to fit a line, has {sorted(ours)}")
    launch_s, per_row_s = line
    if launch_s < 0 or per_row_s < 0:
        raise BenchError(
            f"--cost-model {path}: the fitted forward cost {launch_s:.4g} s + {per_row_s:.4g} s/row has a "
            f"negative constant (forward seconds by rows: {forward_s}); a report with more batch sizes fits better"
        )
    machine = report.get("machine") or {}
    gpu = (machine.get("gpu") or {}).get("name", settings.get("device", "?"))
    measured = (
        f"{gpu}, {settings.get('dtype')}, {settings.get('size')}x{settings.get('size')}, {steps} steps, "
        f"CFG {settings.get('cfg')}, batch sizes {sorted(run['batch'] for run in ours.values())}"
    )
    return CostFit(str(path), measured, steps, rows_per_image, forward_s, launch_s, per_row_s)
