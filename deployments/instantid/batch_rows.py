"""The batch rows of denoising jobs: made once per job, concatenated once per set of running jobs.

A job's rows are one contiguous block of every UNet/ControlNet forward: its negatives then its positives
with classifier-free guidance, its positives alone without. Everything in a block is constant while the job
runs (prompt and face embeddings, keypoint image, masks, strengths), so it is made once when the job starts;
a :class:`StepBatch` concatenates the blocks of the jobs that step together and is rebuilt only when that set
changes (a job joins, finishes or is cancelled). What does change per step -- each job's timestep and whether
its control windows are open -- is gathered per step from the jobs themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .attention import FaceConditioning


@dataclass
class JobRows:
    """One job's block of rows (``count`` = num_images, doubled with CFG), on the denoiser's device and dtype."""

    count: int
    images: int
    cfg: bool
    guidance: float
    text: torch.Tensor  # (count, text tokens, dim)
    pooled: torch.Tensor  # (count, pooled dim)
    face: torch.Tensor  # (count, face tokens, dim)
    control_image: torch.Tensor  # (count, 3, H, W) keypoint image
    mask: torch.Tensor | None  # (count, 1, H, W) enhance-face-region mask, or None
    identity_strength: torch.Tensor  # (count,)
    adapter_strength: torch.Tensor  # (count,)
    time_ids: torch.Tensor  # (count, 6)
    maps: dict[str, torch.Tensor]  # extra ControlNet name -> (count, 3, H, W)
    map_strengths: dict[str, torch.Tensor]  # extra ControlNet name -> (count,)
    # The job's text and face K/V projections per attention layer, kept for as long as the job runs.
    projections: dict = field(default_factory=dict, repr=False)


def _cat(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(list(parts))


class StepBatch:
    """The concatenated rows of a fixed list of running jobs, and the caches valid while that list holds.

    ``weights`` memoises IdentityNet's per-row weight (strength x face mask x window) per residual resolution
    and window pattern: the resize and casts then run when the set or a window changes, not 13 residuals x
    every step. The face conditioning keeps per-layer K/V per job (see :class:`FaceConditioning`'s parts).
    """

    def __init__(self, blocks: Sequence[JobRows], num_face_tokens: int) -> None:
        self.blocks = list(blocks)
        self.counts = [b.count for b in blocks]
        self.text = _cat([b.text for b in blocks])
        self.pooled = _cat([b.pooled for b in blocks])
        self.face = _cat([b.face for b in blocks])
        self.control_image = _cat([b.control_image for b in blocks])
        self.mask = None
        if any(b.mask is not None for b in blocks):
            ones = [torch.ones_like(b.control_image[:, :1]) for b in blocks]
            self.mask = _cat([b.mask if b.mask is not None else one for b, one in zip(blocks, ones, strict=True)])
        self.identity_strength = _cat([b.identity_strength for b in blocks])
        self.time_ids = _cat([b.time_ids for b in blocks])
        names = list(blocks[0].maps)
        self.maps = {name: _cat([b.maps[name] for b in blocks]) for name in names}
        self.map_strengths = {name: _cat([b.map_strengths[name] for b in blocks]) for name in names}
        self.context = torch.cat([self.text, self.face], dim=1)
        self.conditioning = FaceConditioning(
            _cat([b.adapter_strength for b in blocks]),
            num_face_tokens,
            self.mask,
            parts=[(b.count, b.projections) for b in blocks],
        )
        self._weights: dict[tuple, torch.Tensor] = {}

    @property
    def rows(self) -> int:
        return sum(self.counts)

    def row_values(self, per_job: Sequence[float]) -> torch.Tensor:
        """A per-job value repeated over each job's rows: shape (rows,), on the rows' device and dtype."""
        values = [torch.full((count,), float(v)) for count, v in zip(self.counts, per_job, strict=True)]
        return _cat(values).to(device=self.text.device, dtype=self.text.dtype)

    def identitynet_weight(self, size: tuple[int, int], keep: tuple[float, ...], dtype: torch.dtype) -> torch.Tensor:
        """IdentityNet's residual weight at ``size``: strength x (resized face mask) x each job's window ``keep``."""
        cache_key = (size, keep, dtype)
        weight = self._weights.get(cache_key)
        if weight is None:
            weight = (self.identity_strength * self.row_values(keep)).view(-1, 1, 1, 1)
            if self.mask is not None:
                weight = weight * F.interpolate(self.mask, size=size, mode="bilinear")
            weight = self._weights[cache_key] = weight.to(dtype)
        return weight

    def map_weight(self, name: str, keep: tuple[float, ...]) -> torch.Tensor:
        """An extra ControlNet's residual weight per row: its strength x each job's window ``keep``."""
        cache_key = (name, keep)
        weight = self._weights.get(cache_key)
        if weight is None:
            weight = self._weights[cache_key] = (self.map_strengths[name] * self.row_values(keep)).view(-1, 1, 1, 1)
        return weight
