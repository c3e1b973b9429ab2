"""The denoiser's speed switches as configuration (pydantic, nothing heavy: the app's config imports it).

What each switch does, and when it is applied, is in ``acceleration``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .catalogue import WeightsSource


class SpeedOptions(BaseModel):
    """How the denoiser computes a step (every switch off: the eager step, as measured in the README)."""

    model_config = ConfigDict(extra="forbid")

    compile: bool = Field(
        default=False,
        description="Regional torch.compile of the UNet's and IdentityNet's transformer blocks (bucketed step only).",
    )
    compile_mode: str | None = Field(
        default=None, description="torch.compile mode, e.g. max-autotune-no-cudagraphs (None: inductor's default)."
    )
    compile_backend: str = Field(default="inductor", description="torch.compile backend (aot_eager: debugging).")
    static_step: bool = Field(
        default=False,
        description="Step batches that fit a bucket from fixed buffers with padded rows (implied by compile and "
        "cuda_graphs).",
    )
    cuda_graphs: bool = Field(default=False, description="Record the bucketed step as one CUDA graph per bucket.")
    bucket_rows: list[int] = Field(
        default_factory=lambda: [2, 4, 8, 16, 32],
        description="Row counts of the buckets; a batch is padded to the next one (larger batches step eagerly).",
    )
    bucket_sizes: list[tuple[int, int]] = Field(
        default_factory=lambda: [(1024, 1024)],
        description="Output sizes (width, height) that have buckets; other sizes step eagerly.",
    )
    fuse_qkv: bool = Field(default=False, description="Fused Q/K/V (self) and K/V (cross, face) projections.")
    channels_last: bool = Field(default=False, description="UNet, IdentityNet and VAE in channels-last layout.")
    fp8: Literal["off", "dynamic", "weight_only"] = Field(
        default="off",
        description="torchao float8 Linear layers in the UNet and IdentityNet (dynamic: CUDA capability >= 8.9).",
    )
    vae_dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        default="auto",
        description="VAE decode precision. auto: fp32 when the model is fp16 and the VAE overflows in fp16 "
        "(force_upcast), else the model dtype; bfloat16 has fp32's range and never overflows.",
    )
    vae: WeightsSource | None = Field(
        default=None,
        description="A diffusers AutoencoderKL folder to decode with instead of the base's VAE, e.g. the fp16-fix "
        "SDXL VAE (its config says force_upcast false, so it decodes in fp16).",
    )

    @model_validator(mode="after")
    def _consistent(self) -> SpeedOptions:
        if min(self.bucket_rows, default=0) < 1:
            raise ValueError("bucket_rows must be row counts >= 1")
        if any(w % 8 or h % 8 or w < 8 or h < 8 for w, h in self.bucket_sizes):
            raise ValueError("bucket_sizes must be (width, height) multiples of 8")
        return self

    @property
    def bucketed(self) -> bool:
        return self.static_step or self.compile or self.cuda_graphs
