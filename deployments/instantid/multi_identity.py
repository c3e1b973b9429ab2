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

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

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
    controlnet: torch.nn.Module, sample: torch.Tensor, t: torch.Tensor, rows: dict, keep: float, weights: dict
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """IdentityNet residuals of a batch whose rows hold k identities (``rows["mask"]`` is (rows, k, H, W)): identity
    i's pass reads its own tokens and the shared keypoint image, its residuals are scaled by strength x its mask
    (bilinear, as the single-identity mask), and the k are summed. ``weights`` caches the per-resolution weights."""
    masks = rows["mask"]
    count = masks.shape[1]
    batch = sample.shape[0]
    face = rows["face"]
    per = face.shape[1] // count
    tokens = torch.cat([face[:, i * per : (i + 1) * per] for i in range(count)])  # identity-major

    def repeat(tensor: torch.Tensor) -> torch.Tensor:
        return torch.cat([tensor] * count)

    down, mid = controlnet(
        repeat(sample),
        t,
        encoder_hidden_states=tokens,
        controlnet_cond=repeat(rows["control_image"]),
        conditioning_scale=keep,
        guess_mode=False,
        added_cond_kwargs={"text_embeds": repeat(rows["pooled"]), "time_ids": repeat(rows["time_ids"])},
        return_dict=False,
    )

    def weigh(residual: torch.Tensor) -> torch.Tensor:
        size = tuple(residual.shape[-2:])
        weight = weights.get(size)
        if weight is None:
            resized = F.interpolate(masks, size=size, mode="bilinear")  # rows, k, h, w
            weight = rows["identity_strength"].view(-1, 1, 1, 1) * resized
            weight = weight.transpose(0, 1).reshape(count * batch, 1, *size)
            weight = weights[size] = weight.to(residual.dtype)
        return (residual * weight).view(count, batch, *residual.shape[1:]).sum(dim=0)

    return [weigh(r) for r in down], weigh(mid)
