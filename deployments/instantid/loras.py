"""LoRAs on a replica: checked against the model when the replica starts, loaded once, switched per batch.

Files in either published layout (kohya/A1111 or diffusers/PEFT) are read with diffusers' own LoRA loader
(``lora_state_dict``, which converts kohya keys) and injected as PEFT adapters, one per LoRA name, into the
modules that have parts for them: the UNet on the denoiser, the two text encoders on the prompt encoder.
:class:`LoraAdapters` keeps a bounded set loaded (least recently used out) and activates a batch's set with
its scales; an empty set disables every adapter, which runs the base layers exactly as before any LoRA.

Two ways to apply the active set (``fuse``): unfused, each adapted layer also runs its two small LoRA matmuls
every step and switching sets is a flag change; fused, the set is merged into the base weights (no extra work
per step) and a switch restores the base weights from an exact copy taken before merging, so a later batch
without LoRAs (or with another set) computes bit for bit what it would have computed before. Fusing costs a
merge per switch and a copy of the adapted layers' base weights in host memory; measured per image it wins
whenever a set serves more than about one image in a row (see README, LoRAs).
"""

from __future__ import annotations

import contextlib
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

from .catalogue import LoraSpec
from .construction import constructs_modules
from .errors import WeightsError
from .weights import resolve_hub, resolve_source

# Which model each key prefix of a LoRA state dict (after diffusers' conversion) belongs to.
PARTS = ("unet", "text_encoder", "text_encoder_2")


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """transformers reports the base layers as "MISSING" when an adapter loads into a text encoder: noise (nothing
    is re-initialised), so its loading report is silenced while adapters load."""
    import transformers

    logger = transformers.utils.logging.get_logger("transformers")
    level = logger.level
    transformers.utils.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():  # PEFT warns that a model holding one adapter gets another: by design here
            warnings.filterwarnings("ignore", message=".*multiple adapters.*")
            yield
    finally:
        logger.setLevel(level)


def read_lora(path: Path, unet_config: Mapping | None = None) -> tuple[dict[str, torch.Tensor], dict | None]:
    """``(state_dict, network_alphas)`` of a LoRA file in either layout, keys prefixed by ``unet.`` /
    ``text_encoder.`` / ``text_encoder_2.`` (diffusers' conversion; kohya files need the UNet's ``config``, which
    maps their original block names)."""
    from diffusers import StableDiffusionXLPipeline

    try:
        state, alphas = StableDiffusionXLPipeline.lora_state_dict(str(path), unet_config=unet_config)
    except Exception as exc:  # safetensors/diffusers raise several types for a broken or foreign file
        raise WeightsError(f"{path} is not a LoRA file diffusers can read: {type(exc).__name__}: {exc}") from exc
    if not state or not all("lora" in key for key in state):
        raise WeightsError(f"{path} is not a LoRA file (its tensors are not named as LoRA layers)")
    return state, alphas


def _module_names(part: str, state: Mapping[str, torch.Tensor], model: nn.Module) -> set[str]:
    """The modules of ``model`` that ``state``'s ``part`` keys address, named as PEFT will look them up."""
    from diffusers.utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    own = {k.removeprefix(part + "."): v for k, v in state.items() if k.startswith(part + ".")}
    if part == "unet":
        peft = convert_unet_state_dict_to_peft(own)
    else:
        peft = convert_state_dict_to_peft(convert_state_dict_to_diffusers(own))
        if not hasattr(model, "text_model"):  # transformers' flattened CLIPTextModel: no text_model level
            peft = {k.removeprefix("text_model."): v for k, v in peft.items()}
    return {key.split(".lora_")[0] for key in peft if ".lora_" in key}


def check_lora(name: str, path: Path, targets: Mapping[str, nn.Module], unet_config: Mapping | None) -> set[str]:
    """The parts of ``targets`` LoRA ``name`` has layers for; a WeightsError naming the file when any of its
    layers is not a Linear or Conv2d of the model (a LoRA for another architecture)."""
    state, _ = read_lora(path, unet_config)
    parts: set[str] = set()
    for part in PARTS:
        if not any(key.startswith(part + ".") for key in state):
            continue
        if part not in targets:
            continue  # a part another deployment loads (the text encoders' parts on the denoiser)
        model = targets[part]
        modules = dict(model.named_modules())
        names = _module_names(part, state, model)
        # (a module that holds adapters already is PEFT's wrapper around the original layer)
        layers = {n: getattr(modules.get(n), "base_layer", modules.get(n)) for n in names}
        unknown = sorted(n for n, layer in layers.items() if not isinstance(layer, (nn.Linear, nn.Conv2d)))
        if unknown:
            raise WeightsError(
                f"LoRA {name} ({path}): {len(unknown)} of its {len(names)} {part} layers are not in this model, "
                f"e.g. {unknown[:3]} (a LoRA made for another architecture than SDXL?)"
            )
        parts.add(part)
    if not parts and not any(key.split(".")[0] in PARTS for key in state):
        raise WeightsError(f"LoRA {name} ({path}) has no UNet or text-encoder layers")
    return parts


class LoraAdapters:
    """The LoRAs loaded into one base's ``targets`` (``{"unet": unet}`` or the two text encoders), by name.

    ``files`` maps every catalogue name to its local file. At most ``capacity`` adapters stay loaded; the least
    recently used one not needed by the set being activated is deleted first. Not thread-safe: one batch at a
    time activates and uses a set (the deployments run a base's batches one after another).
    """

    def __init__(
        self,
        targets: Mapping[str, nn.Module],
        files: Mapping[str, Path],
        *,
        capacity: int,
        unet_config: Mapping | None = None,
        fuse: bool = False,
    ) -> None:
        self.targets = dict(targets)
        self.files = dict(files)
        self.capacity = capacity
        self.unet_config = unet_config
        self.fuse = fuse
        self._loaded: OrderedDict[str, set[str]] = OrderedDict()  # name -> the parts it has layers in
        self._base_weights: dict[nn.Module, torch.Tensor] = {}  # adapted layer -> its weight before merging
        self.active: tuple[tuple[str, float], ...] = ()
        self.loads = 0  # how many adapter loads happened (cold loads are worth knowing about)
        # Called after every switch that touched the weights, with True when adapter modules were added or removed:
        # the denoiser refreshes what holds copies of them (fused projections, recorded graphs).
        self.on_change: Callable[[bool], None] | None = None

    @property
    def loaded(self) -> list[str]:
        return list(self._loaded)

    def activate(self, loras: tuple[tuple[str, float], ...]) -> float:
        """Make exactly ``loras`` (name, scale) active; returns the seconds spent loading adapters (0 if warm)."""
        import time

        if len({name for name, _ in loras}) > self.capacity:
            raise ValueError(f"{len(loras)} LoRAs at once; this replica keeps at most {self.capacity} loaded")
        started = time.perf_counter()
        if self.fuse and tuple(sorted(loras)) == tuple(sorted(self.active)):
            return 0.0  # already merged into the weights
        self._restore()
        loaded_any = unloaded_any = False
        for name, _ in loras:
            if name in self._loaded:
                self._loaded.move_to_end(name)
                continue
            while len(self._loaded) >= self.capacity:
                victim = next(n for n in self._loaded if n not in dict(loras))
                self._unload(victim)
                unloaded_any = True
            self._load(name)
            loaded_any = True
        self._set(loras)
        if self.fuse and loras:
            self._merge(loras)
        if self.on_change is not None:
            self.on_change(loaded_any or unloaded_any)
        return time.perf_counter() - started if loaded_any else 0.0

    def _adapted_layers(self, names: set[str]) -> list[nn.Module]:
        from peft.tuners.tuners_utils import BaseTunerLayer

        return [
            module
            for model in self.targets.values()
            for module in model.modules()
            if isinstance(module, BaseTunerLayer) and names & set(getattr(module, "lora_A", {}))
        ]

    def _merge(self, loras: tuple[tuple[str, float], ...]) -> None:
        """Merge the active set into the base weights, keeping an exact copy of what each layer held before."""
        names = {name for name, _ in loras}
        for layer in self._adapted_layers(names):
            base = layer.get_base_layer()
            self._base_weights[layer] = base.weight.detach().to("cpu", copy=True)
            layer.merge(adapter_names=[n for n in names if n in layer.lora_A])

    def _restore(self) -> None:
        """Undo :meth:`_merge` exactly: PEFT's unmerge (its bookkeeping), then the saved weights (no float drift)."""
        if not self._base_weights:
            return
        with torch.no_grad():
            for layer, weight in self._base_weights.items():
                layer.unmerge()
                layer.get_base_layer().weight.copy_(weight)
        self._base_weights = {}

    @constructs_modules
    def _load(self, name: str) -> None:
        from diffusers import StableDiffusionXLPipeline

        path = self.files.get(name)
        if path is None:
            raise WeightsError(f"LoRA {name} is not in this replica's catalogue")
        state, alphas = read_lora(path, self.unet_config)
        parts: set[str] = set()
        try:
            with _quiet_loading():
                for part, model in self.targets.items():
                    if not any(key.startswith(part + ".") for key in state):
                        continue
                    parts.add(part)  # before the load: a load failing halfway leaves layers to remove
                    if part == "unet":
                        StableDiffusionXLPipeline.load_lora_into_unet(state, alphas, model, adapter_name=name)
                    else:
                        StableDiffusionXLPipeline.load_lora_into_text_encoder(
                            state, alphas, model, prefix=part, adapter_name=name
                        )
        except BaseException:
            self._remove_layers(name, parts)  # else every later load of it fails: "adapter ... already exists"
            raise
        self._loaded[name] = parts
        self.loads += 1

    def _unload(self, name: str) -> None:
        self._restore()  # never delete an adapter that is merged into the weights
        self._remove_layers(name, self._loaded.pop(name))
        self.active = tuple((n, s) for n, s in self.active if n != name)

    def _remove_layers(self, name: str, parts: set[str]) -> None:
        """Delete adapter ``name``'s layers from ``parts`` (those a load reached, perhaps only partly)."""
        from diffusers.utils.peft_utils import delete_adapter_layers

        for part in parts:
            model = self.targets[part]
            if part == "unet" and name in getattr(model, "peft_config", {}):
                model.delete_adapters(name)
            else:
                delete_adapter_layers(model, name)

    def _set(self, loras: tuple[tuple[str, float], ...]) -> None:
        from diffusers.utils.peft_utils import set_adapter_layers, set_weights_and_activate_adapters

        for part, model in self.targets.items():
            if not any(part in self._loaded[n] for n in self._loaded):
                continue  # no adapter layers in this model at all: nothing to switch
            mine = [(n, s) for n, s in loras if part in self._loaded[n]]
            if not mine:
                set_adapter_layers(model, enabled=False)  # the base layers alone, exactly
                continue
            set_adapter_layers(model, enabled=True)
            set_weights_and_activate_adapters(model, [n for n, _ in mine], [s for _, s in mine])
        self.active = tuple(loras)


def resolve_lora_files(loras: Mapping[str, LoraSpec], cache_dir: str | Path | None = None) -> dict[str, Path]:
    """Every catalogue LoRA as a local file (copied from S3 or the hub cache once)."""
    files = {}
    for name, spec in loras.items():
        if spec.repo is not None:
            files[name] = resolve_hub(spec.repo, spec.file, what=f"LoRA {name}")
        else:
            files[name] = resolve_source(str(spec.source), cache_dir, what=f"LoRA {name}")
        if not files[name].is_file():
            raise WeightsError(f"LoRA {name}: {files[name]} is not a file (expected one .safetensors)")
    return files


def architecture_skeletons(architecture: Path, parts: tuple[str, ...]) -> dict[str, nn.Module]:
    """Weightless (meta-device) models of ``parts`` from an SDXL folder's configs: enough to check LoRA names."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    classes = {"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection}
    skeletons: dict[str, nn.Module] = {}
    with torch.device("meta"):
        for part in parts:
            if part == "unet":
                config = UNet2DConditionModel.load_config(architecture / part)
                skeletons[part] = UNet2DConditionModel.from_config(config)
            else:
                skeletons[part] = classes[part](CLIPTextConfig.from_pretrained(architecture / part))
    return skeletons


def check_loras(files: Mapping[str, Path], skeletons: Mapping[str, nn.Module]) -> None:
    """Check every LoRA against the architecture (a WeightsError naming the file for the first misfit)."""
    unet = skeletons.get("unet")
    unet_config = unet.config if unet is not None else None
    for name, path in files.items():
        check_lora(name, path, skeletons, unet_config)
