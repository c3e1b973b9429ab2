"""Tiny random ControlNets and a tiny depth model in the published formats, for tests, CI and the local demo.

- ``controlnets/{pose,canny,depth}/``: diffusers ControlNet folders made from the tiny SDXL UNet, as the
  community SDXL pose/canny/depth ControlNets are published (they read the text embeddings, not face tokens);
- ``depth/``: a transformers Depth Anything folder (Dinov2 backbone, DPT image processor), as the hub's
  depth-anything repos hold it, loadable by ``AutoModelForDepthEstimation`` and the depth-estimation pipeline.

Every part is deterministic for its seed or generator; only tensor sizes and values differ from the real files.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import ControlNetModel, UNet2DConditionModel

CONTROL_KINDS = ("pose", "canny", "depth")
CONDITIONING_CHANNELS = (8, 16, 32, 32)

# Sized so that every IdentityNet input visibly moves a 64x64 test image (the keypoint image by tens of levels
# out of 255): with default initialisation the eight small conditioning convolutions shrink the keypoint dots to
# nothing, and no test could see a keypoint bug. A test asserts the sensitivity on seed 0 (the tests' and the
# demo's seed); other seeds vary with the random UNet around IdentityNet.
_CONDITIONING_OUT_GAIN = 8.0  # conv_out of the conditioning embedding, x 1/sqrt(fan_in)
_ZERO_CONV_GAIN = 0.3  # the residual ("zero") convolutions, x 1/sqrt(fan_in)
_INIT_NOISE = 0.1
_INIT_BIAS = 0.05

# The tiny depth model: the library's initialisation (std 0.02 whatever the fan-in) shrinks the depth through the
# neck's and head's stacked convolutions to ~1e-7, where float noise would decide the min-max normalised map.
_DEPTH_CONV_GAIN = 1.0  # neck and head convolutions, x 1/sqrt(fan_in)
_DEPTH_HEAD_BIAS = 1.0  # before the final ReLU, so that most pixels keep a depth instead of clipping to zero
_DEPTH_SIZE = 56  # the processor's target side: four 14-pixel patches


def make_controlnet_visible(
    controlnet: ControlNetModel, generator: torch.Generator, *, non_negative_colour_mix: bool = False
) -> None:
    """Give a tiny ControlNet's conditioning path and zero convolutions values its inputs can be seen through.

    A trained ControlNet reacts strongly to its condition image; a randomly initialised one does not (its zero
    convolutions are exactly zero and its conditioning convolutions wash a sparse drawing out). So the
    conditioning convolutions pass their input through (each output channel starts as a copy of one input
    channel at the kernel centre, plus a little noise), the first one mixes the three colour channels at
    random, and the output and residual convolutions are random at the gains above. Only values change:
    names, shapes and formats stay those of ``ControlNetModel.from_unet``. The draws come from ``generator``
    in a fixed order, so a seed always gives the same bytes.

    ``non_negative_colour_mix`` takes the colour mix's absolute values (same draws): a grey map (Canny, depth)
    has equal channels, so a signed mix sends about half the channels negative, where the SiLU after the first
    convolution erases them, and with an unlucky draw almost nothing of the map gets through. IdentityNet keeps
    the signed mix (its keypoint drawing is coloured, and its tiny bytes must not change).
    """

    def normal(shape: torch.Size, std: float) -> torch.Tensor:
        return torch.randn(shape, generator=generator) * std

    embedding = controlnet.controlnet_cond_embedding
    with torch.no_grad():
        for conv in (embedding.conv_in, *embedding.blocks):
            out_channels, in_channels = conv.weight.shape[:2]
            if in_channels == 3:  # the RGB condition image: a random colour mix per channel, centre tap only
                weight = torch.zeros_like(conv.weight)
                mix = normal(torch.Size((out_channels, in_channels)), 1.0)
                weight[:, :, 1, 1] = mix.abs() if non_negative_colour_mix else mix
            else:
                weight = normal(conv.weight.shape, _INIT_NOISE / conv.weight[0].numel() ** 0.5)
                for channel in range(out_channels):
                    weight[channel, channel % in_channels, 1, 1] += 1.0
            conv.weight.copy_(weight)
            conv.bias.copy_(normal(conv.bias.shape, _INIT_BIAS))
        for conv, gain in (
            (embedding.conv_out, _CONDITIONING_OUT_GAIN),
            *((c, _ZERO_CONV_GAIN) for c in (*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block)),
        ):
            conv.weight.copy_(normal(conv.weight.shape, gain / conv.weight[0].numel() ** 0.5))
            conv.bias.copy_(normal(conv.bias.shape, _INIT_BIAS))


def write_tiny_controlnets(folder: Path, unet: UNet2DConditionModel, generator: torch.Generator) -> None:
    """``folder/{pose,canny,depth}/``: one ControlNet per kind, each with its own random values from ``generator``.

    Made from ``unet`` so that they fit it (a plain UNet: ``from_unet`` copies its blocks strictly, so no
    face-token processors may be installed); like the published SDXL ControlNets they cross-attend to the
    prompt's text embeddings (the UNet's cross-attention width), where IdentityNet reads face tokens. Their
    maps are drawings on black (pose) or grey (Canny, depth), so their first convolution mixes colours with
    non-negative weights (see :func:`make_controlnet_visible`). ``from_unet`` draws from the global torch RNG
    for values that are overwritten anyway, so that RNG is restored afterwards.
    """
    with torch.random.fork_rng(devices=[]):
        for kind in CONTROL_KINDS:
            controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=CONDITIONING_CHANNELS)
            make_controlnet_visible(controlnet, generator, non_negative_colour_mix=True)
            controlnet.save_pretrained(Path(folder) / kind, safe_serialization=True)


def write_tiny_depth_model(folder: Path, seed: int) -> None:
    """A tiny Depth Anything with its image processor in ``folder`` (config.json, model.safetensors,
    preprocessor_config.json), seeded from ``seed`` alone: the caller's global torch RNG is left as it was."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling

    backbone = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=_DEPTH_SIZE,
        patch_size=14,
        out_features=["stage1", "stage2", "stage3", "stage4"],
        reshape_hidden_states=False,
    )
    config = DepthAnythingConfig(
        backbone_config=backbone,
        reassemble_hidden_size=32,
        neck_hidden_sizes=[16, 16, 32, 32],
        fusion_hidden_size=16,
        head_hidden_size=8,
        depth_estimation_type="relative",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DepthAnythingForDepthEstimation(config)
        _make_depth_visible(model)
    model.save_pretrained(folder, safe_serialization=True)
    processor = _dpt_processor_class()(
        do_resize=True,
        size={"height": _DEPTH_SIZE, "width": _DEPTH_SIZE},
        keep_aspect_ratio=True,
        ensure_multiple_of=14,
        resample=PILImageResampling.BICUBIC,
        do_rescale=True,
        do_normalize=True,
        image_mean=list(IMAGENET_DEFAULT_MEAN),
        image_std=list(IMAGENET_DEFAULT_STD),
        do_pad=False,
    )
    processor.save_pretrained(folder)


def _dpt_processor_class() -> type:
    """DPT's PIL image processor: no torchvision needed to write it. Either backend saves the same
    ``preprocessor_config.json`` (type ``DPTImageProcessor``), and ``AutoImageProcessor`` picks one when loading."""
    try:
        from transformers import DPTImageProcessorPil  # transformers >= 5.x with separate backends
    except ImportError:
        from transformers import DPTImageProcessor as DPTImageProcessorPil  # the PIL one in earlier releases
    return DPTImageProcessorPil


def _make_depth_visible(model: torch.nn.Module) -> None:
    """Re-draw the neck's and head's convolutions at fan-in scale (global torch RNG, already seeded), so the
    predicted depth is of order one and varies with the image rather than with float noise."""
    with torch.no_grad():
        for module in (*model.neck.modules(), *model.head.modules()):
            if isinstance(module, torch.nn.ConvTranspose2d):
                fan_in = module.weight[:, 0].numel()
            elif isinstance(module, torch.nn.Conv2d):
                fan_in = module.weight[0].numel()
            else:
                continue
            module.weight.normal_(0.0, _DEPTH_CONV_GAIN / fan_in**0.5)
            if module.bias is not None:
                module.bias.normal_(0.0, _INIT_BIAS)
        model.head.conv3.bias.fill_(_DEPTH_HEAD_BIAS)
