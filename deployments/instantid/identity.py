"""One identity from several photos of a person, and the CFG negative the resampler sees.

InstantID's resampler reads one or more 512-d ArcFace vectors as its input tokens and always gives 16 face tokens.
Several photos of one person make a steadier identity than one: their raw embeddings are averaged (``mean``), or
averaged as directions and rescaled to the photos' mean norm (``normalized_mean``: no photo dominates because its
vector happens to be longer), or handed to the resampler side by side (``concat``: N input tokens, which the
resampler's attention pools itself). One photo is passed through untouched in every mode.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .options import DEFAULT_IDENTITY_COMBINE, IDENTITY_COMBINE_MODES, MAX_FACE_PHOTOS, IdentityCombine

__all__ = [
    "DEFAULT_IDENTITY_COMBINE",
    "IDENTITY_COMBINE_MODES",
    "MAX_FACE_PHOTOS",
    "IdentityCombine",
    "combine_embeddings",
    "negative_identity",
]


def combine_embeddings(embeddings: Sequence[np.ndarray], how: str = DEFAULT_IDENTITY_COMBINE) -> np.ndarray:
    """The identity of several photos: (512,) for ``mean``/``normalized_mean``, (N, 512) for ``concat``.

    One photo gives its own embedding back, the very array (bit-identical to a one-photo request).
    """
    if how not in IDENTITY_COMBINE_MODES:
        raise ValueError(f"unknown identity_combine {how!r}; known: {', '.join(IDENTITY_COMBINE_MODES)}")
    if not embeddings:
        raise ValueError("combine_embeddings needs at least one embedding")
    if len(embeddings) == 1:
        return embeddings[0]
    stacked = np.stack([np.asarray(e, dtype=np.float32).reshape(-1) for e in embeddings])
    if how == "concat":
        return stacked
    if how == "mean":
        return stacked.mean(axis=0, dtype=np.float64).astype(np.float32)
    norms = np.linalg.norm(stacked.astype(np.float64), axis=1, keepdims=True)
    if np.any(norms == 0):
        raise ValueError("an embedding of norm 0 has no direction to average")
    direction = (stacked / norms).mean(axis=0)
    length = np.linalg.norm(direction)
    if length == 0:  # directions that cancel out exactly: no identity is left to keep
        raise ValueError("the photos' embeddings point in opposite directions and cancel out")
    return (direction / length * norms.mean()).astype(np.float32)


def negative_identity(shape: tuple[int, ...], face_noise: float, seed: int) -> torch.Tensor | None:
    """The resampler's input for the CFG negative: None (zeros, as published) when ``face_noise`` is 0, else
    ``face_noise x U(0, 1)`` per element from a CPU generator seeded with the request's seed (the same noise on
    every device; the latents' own generator is untouched)."""
    if face_noise == 0:
        return None
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=generator, dtype=torch.float32) * face_noise
