"""Several people in one image, on the denoiser's side: per-identity face tokens, masks and IdentityNet residuals.

A multi-identity job's conditioning has the single-identity shapes generalised along one axis, the identity k:

- face tokens: each identity's 16 tokens from the resampler, concatenated (rows, k x 16, dim), so the UNet's
  context is text + k x 16 tokens and the face-token attention (``attention.FaceConditioning``) attends each block
  with its own softmax, weighted by that identity's region mask;
- the region masks: (1, k, H, W), identity i's region (narrowed to its face with ``enhance_face_region``);
- one IdentityNet condition image with every identity's keypoints;
- IdentityNet: each identity's residuals come from its own tokens and are weighted by its own mask. The k passes
  run as ONE IdentityNet forward over k x rows (identity-major), so a step launches the same kernels as a single
  identity's, on k times the rows.

One identity gives exactly the single-identity tensors (same values, same shapes), so it takes the single path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from .errors import InvalidParameterError
from .identity import negative_identity
from .params import GenerationParams
from .regions import PlacedIdentity, identity_masks, shared_keypoint_image
from .resampler import Resampler


def identity_conditioning(
    resampler: Resampler, identities: Sequence[PlacedIdentity], p: GenerationParams
) -> tuple[torch.Tensor, torch.Tensor | None, np.ndarray, torch.Tensor | None]:
    """Positive and CFG-negative face tokens (1, k x tokens, dim), the shared keypoint image (H, W, 3) uint8 and
    the (1, k, H, W) masks (None: one identity covering the whole image, without enhance_face_region)."""
    if len(identities) != p.identities:
        raise InvalidParameterError(f"the job has {len(identities)} identities but its parameters say {p.identities}")
    assert p.width is not None and p.height is not None
    cfg = p.do_classifier_free_guidance
    positives, negatives = [], []
    for identity in identities:
        embedding = torch.tensor(np.asarray(identity.embedding, dtype=np.float32))[None]
        negative = negative_identity(tuple(embedding.shape), p.face_noise, p.seed) if cfg else None
        pos, neg = resampler.face_tokens(embedding, with_negative=cfg, negative=negative)
        positives.append(pos)
        negatives.append(neg)
    face_pos = torch.cat(positives, dim=1)
    face_neg = torch.cat(negatives, dim=1) if cfg else None
    keypoint_image = shared_keypoint_image([identity.keypoints for identity in identities], p.width, p.height)
    masks = identity_masks(
        [identity.region for identity in identities],
        [identity.box for identity in identities],
        p.width,
        p.height,
        p.enhance_face_region,
    )
    return face_pos, face_neg, keypoint_image, None if masks is None else torch.from_numpy(masks)[None]


def per_identity_identitynet(
    controlnet: torch.nn.Module,
    sample: torch.Tensor,
    t: torch.Tensor,
    *,
    face: torch.Tensor,
    control_image: torch.Tensor,
    pooled: torch.Tensor,
    time_ids: torch.Tensor,
    conditioning_scale: float,
    weight: Callable[[tuple[int, int], torch.dtype], torch.Tensor],
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """IdentityNet residuals of rows that hold k identities' face tokens (``face``: (rows, k x tokens, dim)):
    identity i's pass reads its own tokens and the shared keypoint image, its residuals are scaled by its own
    weight, and the k are summed. All k passes are one forward over k x rows (identity-major).

    ``weight(size, dtype)`` gives the (rows, k, h, w) weights at a residual's resolution: strength x identity i's
    mask resized bilinearly (as the single-identity mask), cached by the caller across steps.
    """
    rows = sample.shape[0]
    probe = weight(tuple(sample.shape[-2:]), sample.dtype)
    count = probe.shape[1]
    per = face.shape[1] // count
    tokens = torch.cat([face[:, i * per : (i + 1) * per] for i in range(count)])  # identity-major

    def repeat(tensor: torch.Tensor) -> torch.Tensor:
        return torch.cat([tensor] * count)

    down, mid = controlnet(
        repeat(sample),
        t if t.ndim == 0 else repeat(t),  # one timestep for all rows, or one per row
        encoder_hidden_states=tokens,
        controlnet_cond=repeat(control_image),
        conditioning_scale=conditioning_scale,
        guess_mode=False,
        added_cond_kwargs={"text_embeds": repeat(pooled), "time_ids": repeat(time_ids)},
        return_dict=False,
    )

    def weigh(residual: torch.Tensor) -> torch.Tensor:
        per_identity = weight(tuple(residual.shape[-2:]), residual.dtype)  # rows, k, h, w
        stacked = residual.view(count, rows, *residual.shape[1:])
        return (stacked * per_identity.transpose(0, 1)[:, :, None]).sum(dim=0)

    return [weigh(r) for r in down], weigh(mid)
