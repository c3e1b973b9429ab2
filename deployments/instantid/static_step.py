"""A capturable denoising forward: fixed buffers per (rows, height, width) bucket, rows padded to the bucket.

The eager step (:meth:`InstantIDDenoiser.step`) is cheap on the host because it remembers what does not change
between steps (the K/V projections of each job's tokens, the resized weights), filling those caches lazily on the
first step of a set of jobs. A CUDA graph cannot do that: it replays the kernels it recorded, reading and writing
the same addresses, with no Python in between. So this step

- keeps every tensor the forward reads in buffers fixed per bucket: the set's rows (text + face context, pooled
  embeddings, time ids, keypoint image, face-region mask, strengths) are copied in when the running set changes,
  and the per-step values (scaled latents, each row's timestep, each row's IdentityNet window) before each step;
- pads the rows to the bucket's row count with rows of zero strength; every layer of the UNet and IdentityNet
  works row by row (group norms, attention, convolutions), so what a padding row holds cannot reach a real row;
- computes in the forward what the eager step caches (the K/V projections, the weights: see
  :class:`~.attention.StaticFaceConditioning`), and always runs IdentityNet (a closed window is a zero weight);
- makes no host sync and no allocation whose size depends on data.

With ``capture`` (CUDA only) each bucket's forward is recorded once as a CUDA graph (after a warm-up that also
triggers any ``torch.compile`` of the blocks) and replayed at every later step of that bucket; the graphs share
one memory pool. Without it (and on the CPU, where tests check it) the same forward runs from the same buffers.

What does not fit a bucket runs the eager step: another size, more rows than the largest bucket, several
identities in one image, extra ControlNets, prompts longer than one 77-token chunk.

LoRA sets change the weights in place (fused into the base weights, restored exactly from a copy: see
``loras.LoraAdapters``), so a recorded graph reads the new weights at its next replay; when adapters are loaded
or removed (new modules in the UNet) the graphs are dropped and recorded again (:meth:`invalidate`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .attention import CONDITIONING_KWARG, StaticFaceConditioning
from .batch_rows import StepBatch

if TYPE_CHECKING:
    from .denoiser import InstantIDDenoiser

TEXT_TOKENS = 77  # one CLIP chunk: longer prompts step eagerly
WARMUP_STEPS = 2  # forwards before a capture: compiles, cuBLAS workspaces and autotuning happen outside it


@dataclass
class _Buffers:
    """One bucket's tensors; their addresses never change while the bucket lives."""

    sample: torch.Tensor  # (R, C, h, w) scaled latents
    t: torch.Tensor  # (R,) float32 timesteps
    context: torch.Tensor  # (R, text + face tokens, dim): the UNet's encoder_hidden_states
    pooled: torch.Tensor  # (R, pooled dim)
    time_ids: torch.Tensor  # (R, 6)
    control_image: torch.Tensor  # (R, 3, H, W)
    mask: torch.Tensor  # (R, 1, H, W): the face-region mask, ones for jobs without one, zeros for padding
    identity_strength: torch.Tensor  # (R,): zero for padding rows
    adapter_strength: torch.Tensor  # (R,): zero for padding rows
    keep: torch.Tensor  # (R,): 1 where the row's IdentityNet window is open at this step
    rows: int  # the bucket's row count
    filled_for: StepBatch | None = None  # the running set whose rows the buffers hold
    out: torch.Tensor | None = None  # the captured forward's output
    graph: torch.cuda.CUDAGraph | None = field(default=None, repr=False)
    forwards: int = 0  # forwards run from these buffers (a capture waits for the warm-up)


class StaticStep:
    """The bucketed forward of one :class:`InstantIDDenoiser` (see the module docstring)."""

    def __init__(
        self,
        denoiser: InstantIDDenoiser,
        bucket_rows: Sequence[int],
        bucket_sizes: Sequence[tuple[int, int]],
        *,
        capture: bool = False,
    ) -> None:
        if capture and denoiser.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; this denoiser runs on {denoiser.device}")
        if not bucket_rows or min(bucket_rows) < 1:
            raise ValueError("bucket_rows needs at least one row count >= 1")
        self.denoiser = denoiser
        self.bucket_rows = sorted(set(bucket_rows))
        self.bucket_sizes = {(int(w), int(h)) for w, h in bucket_sizes}
        self.capture = capture
        self._buckets: dict[tuple[int, int, int], _Buffers] = {}
        self._pool = torch.cuda.graph_pool_handle() if capture else None
        self.static_forwards = 0  # counters, for tests and the benchmark
        self.eager_forwards = 0
        self.captures = 0

    # ------------------------------------------------------------------------------------------ buckets
    def bucket_key(self, batch: StepBatch) -> tuple[int, int, int] | None:
        """``(rows, height, width)`` of the bucket ``batch`` steps in, or None: it runs the eager step."""
        height, width = batch.control_image.shape[-2:]
        if (width, height) not in self.bucket_sizes or batch.maps or batch.text.shape[1] != TEXT_TOKENS:
            return None
        if batch.mask is not None and batch.mask.shape[1] != 1:
            return None
        rows = next((r for r in self.bucket_rows if r >= batch.rows), None)
        return None if rows is None else (rows, height, width)

    def _buffers(self, key: tuple[int, int, int], batch: StepBatch, sample: torch.Tensor) -> _Buffers:
        buffers = self._buckets.get(key)
        if buffers is None:
            rows, height, width = key
            d = self.denoiser
            model = {"device": d.device, "dtype": d.dtype}
            tokens = batch.text.shape[1] + batch.face.shape[1]
            buffers = self._buckets[key] = _Buffers(
                sample=torch.zeros((rows, *sample.shape[1:]), **model),
                t=torch.zeros(rows, device=d.device, dtype=torch.float32),
                context=torch.zeros((rows, tokens, batch.text.shape[2]), **model),
                pooled=torch.zeros((rows, batch.pooled.shape[1]), **model),
                time_ids=torch.zeros((rows, batch.time_ids.shape[1]), **model),
                control_image=torch.zeros((rows, 3, height, width), **model),
                mask=torch.zeros((rows, 1, height, width), **model),
                identity_strength=torch.zeros(rows, **model),
                adapter_strength=torch.zeros(rows, **model),
                keep=torch.zeros(rows, **model),
                rows=rows,
            )
        return buffers

    def _fill(self, buffers: _Buffers, batch: StepBatch) -> None:
        """Copy the running set's rows in (once per set); padding rows get zeros: no strength, no window."""
        n = batch.rows
        text_tokens = batch.text.shape[1]
        copies = [
            (buffers.context[:, :text_tokens], batch.text),
            (buffers.context[:, text_tokens:], batch.face),
            (buffers.pooled, batch.pooled),
            (buffers.time_ids, batch.time_ids),
            (buffers.control_image, batch.control_image),
            (buffers.identity_strength, batch.identity_strength),
            (buffers.adapter_strength, batch.conditioning.scale),
        ]
        for target, source in copies:
            target[:n].copy_(source)
            target[n:].zero_()
        if batch.mask is None:
            buffers.mask[:n].fill_(1.0)
        else:
            buffers.mask[:n].copy_(batch.mask)
        buffers.mask[n:].zero_()
        buffers.keep.zero_()
        buffers.filled_for = batch

    def invalidate(self) -> None:
        """Drop the recorded graphs (the modules changed: adapters loaded or removed); buffers stay."""
        for buffers in self._buckets.values():
            buffers.graph, buffers.out, buffers.forwards = None, None, 0

    # ------------------------------------------------------------------------------------------ forward
    def forward(
        self, batch: StepBatch, sample: torch.Tensor, t_rows: torch.Tensor, identity_keep: tuple[float, ...]
    ) -> torch.Tensor | None:
        """The UNet's noise prediction for ``batch``'s real rows, or None when the batch fits no bucket."""
        key = self.bucket_key(batch)
        if key is None:
            self.eager_forwards += 1
            return None
        buffers = self._buffers(key, batch, sample)
        if buffers.filled_for is not batch:
            self._fill(buffers, batch)
        n = batch.rows
        buffers.sample[:n].copy_(sample)
        buffers.t[:n].copy_(t_rows)
        buffers.keep[:n].copy_(batch.row_values(identity_keep))
        self.static_forwards += 1
        if not self.capture:
            return self._run(buffers)[:n]
        if buffers.graph is None and buffers.forwards >= WARMUP_STEPS:
            self._record(buffers)
        if buffers.graph is None:
            buffers.forwards += 1
            return self._run_aside(buffers)[:n]
        buffers.graph.replay()
        assert buffers.out is not None
        return buffers.out[:n].clone()  # the next replay overwrites the graph's output

    def _run_aside(self, buffers: _Buffers) -> torch.Tensor:
        """A warm-up forward on a side stream (as torch.cuda.graph's recipe asks before a capture)."""
        stream = torch.cuda.Stream(device=self.denoiser.device)
        stream.wait_stream(torch.cuda.current_stream(self.denoiser.device))
        with torch.cuda.stream(stream):
            out = self._run(buffers)
        torch.cuda.current_stream(self.denoiser.device).wait_stream(stream)
        return out

    def _record(self, buffers: _Buffers) -> None:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            buffers.out = self._run(buffers)
        buffers.graph = graph
        self.captures += 1

    def _run(self, b: _Buffers) -> torch.Tensor:
        """IdentityNet + UNet from the buffers alone: what a graph records."""
        d = self.denoiser
        face = b.context[:, b.context.shape[1] - d.num_face_tokens :]
        added = {"text_embeds": b.pooled, "time_ids": b.time_ids}
        down, mid = d.controlnet(
            b.sample,
            b.t,
            encoder_hidden_states=face,
            controlnet_cond=b.control_image,
            conditioning_scale=1.0,
            guess_mode=False,
            added_cond_kwargs=added,
            return_dict=False,
        )
        base = (b.identity_strength * b.keep).view(-1, 1, 1, 1)

        def weigh(residual: torch.Tensor) -> torch.Tensor:  # as StepBatch.identitynet_weight computes it
            weight = base * F.interpolate(b.mask, size=tuple(residual.shape[-2:]), mode="bilinear")
            return residual * weight.to(residual.dtype)

        conditioning = StaticFaceConditioning(b.adapter_strength, d.num_face_tokens, b.mask)
        return d.unet(
            b.sample,
            b.t,
            encoder_hidden_states=b.context,
            cross_attention_kwargs={CONDITIONING_KWARG: conditioning},
            added_cond_kwargs=added,
            down_block_additional_residuals=[weigh(r) for r in down],
            mid_block_additional_residual=weigh(mid),
            return_dict=False,
        )[0]
