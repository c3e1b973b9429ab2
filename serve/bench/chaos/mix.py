"""The soak's generation requests: a seeded mix over what local.yaml can serve, as JSON or multipart bodies.

Each request draws its features independently (so combinations occur too): a base other than the default, a LoRA
in either layout, a fast mode, extra ControlNets (canny and depth computed from the photo, pose from an uploaded
map), image-to-image, several photos of one person, or two people. Steps stay at 2-4 and the size at 256 px
(twice as wide for two people) so that a 2-core machine serves a few requests a second; a mode's own step count is
overridden by the request's, as the API documents.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageOps

BASES = ("tiny-alt",)  # besides the default (sdxl)
LORAS = ("style-peft", "style-kohya")
MODES = ("lcm", "lightning", "hyper")
FORMATS = ("png", "webp", "jpeg")
PROMPTS = ("a portrait of an astronaut", "a watercolor portrait", "a person on mars, cinematic", "a studio photo")


def _jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@functools.cache
def astronaut() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut()).resize((320, 320), Image.LANCZOS)


@functools.cache
def photos() -> dict[str, bytes]:
    """Real photos (the tiny face detector finds faces in them) and two synthetic inputs, as upload bytes."""
    import insightface

    face = astronaut()
    pose = Image.new("RGB", (256, 256))
    draw = ImageDraw.Draw(pose)
    for points, colour in (([(128, 60), (128, 150)], "red"), ([(80, 100), (176, 100)], "green")):
        draw.line(points, fill=colour, width=6)
    init = Image.effect_mandelbrot((256, 256), (-2.0, -1.5, 1.0, 1.5), 60).convert("RGB")
    return {
        "face": _jpeg(face),
        "face_mirrored": _jpeg(ImageOps.mirror(face)),
        "face_cropped": _jpeg(face.crop((20, 10, 300, 310))),
        "group": (Path(insightface.__file__).parent / "data" / "images" / "t1.jpg").read_bytes(),
        "pose_map": _png(pose),
        "init": _png(init),
    }


@dataclass
class GenerationSpec:
    """One generation request before it is encoded: options, and the pictures that go with them."""

    label: str
    options: dict[str, Any]
    faces: list[bytes] = field(default_factory=list)
    identities: list[tuple[bytes, int]] | None = None  # (photo, face_index) per person
    pose_image: bytes | None = None
    init_image: bytes | None = None
    maps: dict[str, bytes] = field(default_factory=dict)  # uploaded ControlNet maps by name

    def json_body(self) -> dict[str, Any]:
        body = dict(self.options)
        if self.identities is not None:
            body["identities"] = [
                {"images": [{"b64": _b64(photo)}], "face_index": index} for photo, index in self.identities
            ]
        elif len(self.faces) == 1:
            body["face_image_b64"] = _b64(self.faces[0])
        else:
            body["face_images"] = [{"b64": _b64(photo)} for photo in self.faces]
        if self.init_image is not None:
            body["init_image_b64"] = _b64(self.init_image)
        if self.pose_image is not None:
            body["pose_image_b64"] = _b64(self.pose_image)
        if "controlnets" in body:
            body["controlnets"] = [
                {**c, "image_b64": _b64(self.maps[c["name"]])} if c["name"] in self.maps else c
                for c in body["controlnets"]
            ]
        return body

    def multipart(self) -> tuple[dict[str, str], list[tuple[str, tuple[str, bytes, str]]]]:
        """(form fields, file parts) for httpx: lists and objects as JSON fields, every picture a file part."""
        fields = {k: json.dumps(v) if isinstance(v, (list, dict)) else str(v) for k, v in self.options.items()}
        files: list[tuple[str, tuple[str, bytes, str]]] = []
        if self.identities is not None:
            fields["identities"] = json.dumps([{"face_index": index} for _, index in self.identities])
            files += [
                (f"identity_{i}", (f"person{i}.jpg", photo, "image/jpeg"))
                for i, (photo, _) in enumerate(self.identities)
            ]
        else:
            files += [("face_image", (f"face{i}.jpg", photo, "image/jpeg")) for i, photo in enumerate(self.faces)]
        if self.init_image is not None:
            files.append(("init_image", ("init.png", self.init_image, "image/png")))
        if self.pose_image is not None:
            files.append(("pose_image", ("pose.jpg", self.pose_image, "image/jpeg")))
        files += [(f"control_image_{name}", (f"{name}.png", data, "image/png")) for name, data in self.maps.items()]
        return fields, files


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def draw_spec(rng: random.Random) -> GenerationSpec:
    """One request of the mix (every feature drawn on its own, so some requests combine several)."""
    pictures = photos()
    steps = rng.randint(2, 4)
    options: dict[str, Any] = {
        "prompt": rng.choice(PROMPTS),
        "style": "none",
        "num_inference_steps": steps,
        "width": 256,
        "height": 256,
        "seed": rng.randrange(2**31),
        "output_format": rng.choice(FORMATS),
    }
    label: list[str] = []
    if rng.random() < 0.2:
        options["base_model"] = rng.choice(BASES)
        label.append(f"base={options['base_model']}")
    if rng.random() < 0.3:
        name = rng.choice(LORAS)
        options["loras"] = [{"name": name, "scale": round(rng.uniform(0.4, 1.0), 2)}]
        label.append(f"lora={name}")
    if rng.random() < 0.25:
        options["mode"] = rng.choice(MODES)
        label.append(f"mode={options['mode']}")
    spec = GenerationSpec("", options, faces=[pictures["face"]])
    if rng.random() < 0.25:
        names = rng.sample(["canny", "depth", "pose"], rng.randint(1, 2))
        options["controlnets"] = [{"name": n, "strength": round(rng.uniform(0.2, 0.8), 2)} for n in sorted(names)]
        if "pose" in names:
            spec.maps["pose"] = pictures["pose_map"]
        label.append("controlnets=" + "+".join(sorted(names)))
    if rng.random() < 0.15:
        spec.init_image = pictures["init"]
        options["strength"] = round(rng.uniform(0.5, 0.9), 2)
        options["num_inference_steps"] = 4  # int(steps x strength) must leave a step
        label.append("img2img")
    roll = rng.random()
    if roll < 0.12:
        spec.faces = []
        spec.identities = [(pictures["face"], 0), (pictures["group"], 4)]
        spec.pose_image = pictures["group"]  # places the people (and is what computed control maps are made from)
        options["width"] = 512
        label.append("two-people")
    elif roll < 0.3:
        spec.faces = [pictures["face"], pictures["face_mirrored"], pictures["face_cropped"]][: rng.randint(2, 3)]
        label.append(f"photos={len(spec.faces)}")
    if rng.random() < 0.1:
        options["num_images"] = 2
        label.append("images=2")
    spec.label = ",".join(label) or "plain"
    return spec


def warmup_specs() -> list[GenerationSpec]:
    """One request per feature, so that loads of bases, LoRAs and ControlNets happen before anything is measured."""
    rng = random.Random(0)
    pictures = photos()
    plain = {"prompt": "warm-up", "style": "none", "num_inference_steps": 2, "width": 256, "height": 256}
    specs = [GenerationSpec("plain", {**plain, "seed": rng.randrange(2**31)}, faces=[pictures["face"]])]
    specs.append(GenerationSpec("base", {**plain, "base_model": BASES[0], "seed": 1}, faces=[pictures["face"]]))
    for name in LORAS:
        specs.append(GenerationSpec(name, {**plain, "loras": [{"name": name}], "seed": 2}, faces=[pictures["face"]]))
    for mode in MODES:
        specs.append(GenerationSpec(mode, {**plain, "mode": mode, "num_inference_steps": 2}, faces=[pictures["face"]]))
    controls = [{"name": "canny"}, {"name": "depth"}, {"name": "pose"}]
    specs.append(
        GenerationSpec(
            "controls",
            {**plain, "controlnets": controls},
            faces=[pictures["face"]],
            maps={"pose": pictures["pose_map"]},
        )
    )
    specs.append(
        GenerationSpec(
            "img2img",
            {**plain, "num_inference_steps": 4, "strength": 0.7},
            faces=[pictures["face"]],
            init_image=pictures["init"],
        )
    )
    specs.append(
        GenerationSpec(
            "two-people",
            {**plain, "width": 512},
            identities=[(pictures["face"], 0), (pictures["group"], 4)],
            pose_image=pictures["group"],
        )
    )
    return specs
