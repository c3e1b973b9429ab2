"""Style presets: a prompt template with a ``{prompt}`` slot and a negative prompt each.

The names are the public demo's; the texts are our own.
"""

from __future__ import annotations

from typing import Literal

StyleName = Literal["none", "watercolor", "film_noir", "neon", "jungle", "mars", "vibrant_color", "snow", "line_art"]

DEFAULT_STYLE: StyleName = "watercolor"  # the public demo's default

_COMMON_NEGATIVE = "lowres, blurry, deformed face, extra limbs, bad anatomy, watermark, text, signature"

STYLES: dict[str, tuple[str, str]] = {
    "none": ("{prompt}", ""),
    "watercolor": (
        "watercolor painting of {prompt}, soft washes of colour, visible paper texture, loose brush strokes",
        "photograph, 3d render, hard edges, oversaturated, " + _COMMON_NEGATIVE,
    ),
    "film_noir": (
        "film noir still of {prompt}, black and white, hard low-key lighting, deep shadows, 1940s cinema",
        "colour, bright daylight, cartoon, " + _COMMON_NEGATIVE,
    ),
    "neon": (
        "{prompt} lit by neon signs at night, magenta and cyan glow, rain reflections, cyberpunk city",
        "daylight, muted colours, " + _COMMON_NEGATIVE,
    ),
    "jungle": (
        "{prompt} in a dense tropical jungle, lush green foliage, shafts of sunlight through mist",
        "desert, snow, urban, " + _COMMON_NEGATIVE,
    ),
    "mars": (
        "{prompt} on the surface of Mars, red dust, rocky plains, thin pale sky, science fiction film still",
        "green plants, ocean, " + _COMMON_NEGATIVE,
    ),
    "vibrant_color": (
        "{prompt}, vivid saturated colours, bold contrast, colourful background, editorial photography",
        "black and white, dull, washed out, " + _COMMON_NEGATIVE,
    ),
    "snow": (
        "{prompt} in a snowy winter landscape, falling snowflakes, cold blue light, frosty breath",
        "summer, beach, heat, " + _COMMON_NEGATIVE,
    ),
    "line_art": (
        "clean line art drawing of {prompt}, black ink outlines on white, minimal shading, illustration",
        "photograph, colour, painterly, noisy background, " + _COMMON_NEGATIVE,
    ),
}


def apply_style(style: str, prompt: str, negative_prompt: str | None) -> tuple[str, str | None]:
    """The styled prompt and negative: the user's negative goes first, then the style's."""
    template, style_negative = STYLES[style]
    styled = template.replace("{prompt}", prompt)
    parts = [p for p in (negative_prompt, style_negative) if p]
    return styled, ", ".join(parts) if parts else negative_prompt
