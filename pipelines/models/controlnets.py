"""ControlNet files: the shipped ones (assets/emoji-controlnet-*), the user's under models/controlnet/ (a
diffusers folder or one `.safetensors` file, in diffusers' keys or the original `control_model.…` layout A1111
uses) and hub ids already in the local cache; and whether one fits the base model.

The manager holds a ControlNet in its slot; reading it is here, through the one path and pickle policy
(sources.py): names are confined to models/controlnet/ with links resolved, weights are `.safetensors`.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from pipelines.core.families import family_of_pipeline
from pipelines.core.paths import ASSETS_DIR, ModelLoadError, check_weights_file, confined, inside, use_safetensors
from pipelines.models.checkpoints import cached_snapshot
from pipelines.models.sources import HUB_ID, ModelSource

SHIPPED_CONTROLNETS = {path.name: path for path in sorted(ASSETS_DIR.glob("emoji-controlnet-*"))
                       if (path / "config.json").exists()}
FAMILY_BY_TEXT_WIDTH = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL", 256: "the embedded model"}
# A ControlNet folder's class (its config's `_class_name`) -> the transformer family it steers; ControlNetModel
# steers the UNet families
TRANSFORMER_CONTROLNETS = {"SD3ControlNetModel": "SD 3.x", "FluxControlNetModel": "Flux", "SanaControlNetModel": "Sana"}


def available_controlnets(models_dir: Path) -> list[str]:
    """The shipped ControlNets, then the user's under models/controlnet/ (folders and .safetensors files); a
    link that leads out of models/controlnet/ is not listed, as it would not be loaded."""
    names = list(SHIPPED_CONTROLNETS)
    folder = Path(models_dir) / "controlnet"
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            if ((path / "config.json").is_file() or path.suffix == ".safetensors") and inside(path, (folder,)):
                names.append(path.name)
    return names


def read_controlnet(name: str, base, *, models_dir: Path, dtype, allow_pickle: bool):
    """The ControlNet `name` read into RAM, with its source: shipped, under models/controlnet/, or a cached hub
    id. `base` (the loaded base model) shapes a single file in the original layout."""
    from diffusers import ControlNetModel

    if name in SHIPPED_CONTROLNETS:
        folder = SHIPPED_CONTROLNETS[name]
        return (ControlNetModel.from_pretrained(folder, dtype=dtype, use_safetensors=True),
                ModelSource("embedded", str(folder), name))
    root = Path(models_dir) / "controlnet"
    if (root / name).exists() or "/" not in name or name.startswith((".", "/", "~")):
        path = confined(root / name, (root,), what="The ControlNet", into="models/controlnet/",
                        advice=" (a diffusers folder or a .safetensors file)")
        if not path.exists():
            raise ModelLoadError(f"No ControlNet {name!r}: it is not shipped and not in {root.resolve()}. Put a "
                                 "diffusers ControlNet folder or a .safetensors file there.")
        if path.is_file():
            model = controlnet_file(path, base, dtype=dtype, allow_pickle=allow_pickle)
            return model, ModelSource("file", str(path), name)
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{path} is not a diffusers ControlNet folder (it has no config.json).")
        try:
            model = controlnet_class(path).from_pretrained(path, dtype=dtype,
                                                           use_safetensors=use_safetensors(allow_pickle))
        except Exception as error:
            raise ModelLoadError(f"Could not load the ControlNet in {path}: {type(error).__name__}: {error}") \
                from error
        return model, ModelSource("folder", str(path), name)
    if not HUB_ID.match(name):
        raise ModelLoadError(f"{name!r} is neither a ControlNet under models/controlnet/ nor a hub id.")
    snapshot = cached_snapshot(name)            # its class (SD 3's, Flux's...) is in the cached config
    kind = controlnet_class(snapshot) if snapshot and (snapshot / "config.json").exists() else ControlNetModel
    try:
        model = kind.from_pretrained(name, dtype=dtype, use_safetensors=use_safetensors(allow_pickle),
                                     local_files_only=True)
    except Exception as error:
        raise ModelLoadError(f"The ControlNet {name!r} is not in the local Hugging Face cache, and nothing is "
                             "downloaded here: copy it into models/controlnet/ (a folder with config.json and "
                             "its .safetensors weights).") from error
    return model, ModelSource("hub", name, name)


def controlnet_class(folder: Path):
    """The diffusers class a ControlNet folder's config names: the UNet families' ControlNetModel, or SD 3's, Flux's
    or Sana's transformer ControlNet."""
    import diffusers

    try:
        name = json.loads((folder / "config.json").read_text()).get("_class_name", "ControlNetModel")
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"{folder / 'config.json'} is not a readable config: {error}") from error
    if name != "ControlNetModel" and name not in TRANSFORMER_CONTROLNETS:
        raise ModelLoadError(f"{folder.name} is a {name}; the studio runs ControlNetModel (SD 1.x/2.x, SDXL), "
                             f"{', '.join(TRANSFORMER_CONTROLNETS)} ControlNets.")
    return getattr(diffusers, name)


def controlnet_file(path: Path, base, *, dtype, allow_pickle: bool):
    """A single-file ControlNet: diffusers' own keys (save_pretrained's weights), or the original layout
    (`control_model.…`, as A1111 uses them) converted by diffusers with a config made for the base model."""
    from diffusers import ControlNetModel
    from safetensors.torch import load_file

    check_weights_file(path, allow_pickle=allow_pickle)
    if path.suffix.lower() != ".safetensors":
        raise ModelLoadError(f"{path.name} is not a ControlNet checkpoint the studio reads: single-file ControlNets "
                             "are read from .safetensors files only. Convert it.")
    try:
        state = load_file(str(path))
    except Exception as error:
        raise ModelLoadError(f"{path.name} is not a readable .safetensors file: {error}") from error
    template = ControlNetModel.from_unet(base.pipeline.unet, load_weights_from_unet=False,
                                         **_condition_embedding_config(state))
    if any(key.startswith("controlnet_cond_embedding.") for key in state):
        model_keys = template.state_dict()
        wrong = [key for key, value in state.items() if key in model_keys and value.shape != model_keys[key].shape]
        if wrong or set(model_keys) - set(state):
            raise ModelLoadError(
                f"The ControlNet {path.name} does not fit {base.name}: "
                + (f"{wrong[0]} is {tuple(state[wrong[0]].shape)}, the model needs "
                   f"{tuple(model_keys[wrong[0]].shape)}" if wrong else
                   f"it lacks {len(set(model_keys) - set(state))} of the weights a ControlNet for it has")
                + ". Pick a ControlNet made for this model's family.")
        template.load_state_dict(state)
        return template.to(dtype)
    with tempfile.TemporaryDirectory() as folder:
        template.save_config(folder)
        try:
            return ControlNetModel.from_single_file(str(path), config=folder, dtype=dtype, local_files_only=True)
        except Exception as error:
            raise ModelLoadError(f"Could not read {path.name} as a ControlNet for {base.name} "
                                 f"({type(error).__name__}: {error}). Is it a ControlNet for this model family?") \
                from error


def _condition_embedding_config(state: dict) -> dict:
    """The control-image encoder's shape, read off a diffusers-format state dict (a lone file has no config):
    conv_in, then per level a conv and a strided conv whose output widths are the level's channels."""
    conv_in = state.get("controlnet_cond_embedding.conv_in.weight")
    if conv_in is None:
        return {}
    channels, block = [conv_in.shape[0]], 1
    while f"controlnet_cond_embedding.blocks.{block}.weight" in state:
        channels.append(state[f"controlnet_cond_embedding.blocks.{block}.weight"].shape[0])
        block += 2
    return {"conditioning_embedding_out_channels": tuple(channels), "conditioning_channels": conv_in.shape[1]}


def family_of(config) -> str:
    """The model family a UNet's or a ControlNet's config was made for, as a message names it."""
    if config.get("addition_embed_type") == "text_time":
        return "SDXL"
    return FAMILY_BY_TEXT_WIDTH.get(config.get("cross_attention_dim"), "an SD 1.x/2.x-style model")


def check_controlnet_fits(controlnet, name: str, base) -> None:
    """Refuse a ControlNet whose residuals would not fit the base model's UNet (or transformer), naming the mismatch
    (instead of a shape error in the middle of a generation)."""
    ours_family = family_of_pipeline(base.pipeline) if getattr(base.pipeline, "unet", None) is None else None
    theirs_family = TRANSFORMER_CONTROLNETS.get(type(controlnet).__name__)
    if ours_family or theirs_family:
        if ours_family != theirs_family:
            theirs = theirs_family or family_of(controlnet.config)
            raise ValueError(f"The ControlNet {name} is a ControlNet for {theirs}; {base.name} is a "
                             f"{ours_family or family_of(base.pipeline.unet.config)} model. Pick a ControlNet made "
                             f"for {ours_family or 'its family'}.")
        ours, theirs = base.pipeline.transformer.config, controlnet.config
        text = "joint_attention_dim" if "joint_attention_dim" in ours else "caption_channels"     # Sana's

        def shape(config) -> tuple:    # the text width where the ControlNet reads one (SD 3.5's take the model's)
            return (config.get("num_attention_heads", 0) * config.get("attention_head_dim", 0), config.in_channels,
                    config.get(text) if theirs.get(text) is not None else None)
        if shape(theirs) != shape(ours):
            raise ValueError(f"The ControlNet {name} does not fit {base.name}: its width, latent channels and text "
                             f"width are {shape(theirs)}, the model's {shape(ours)}. Pick a ControlNet made for this "
                             "model.")
        return
    unet, config = base.pipeline.unet.config, controlnet.config
    for key in ("cross_attention_dim", "in_channels", "block_out_channels", "down_block_types", "layers_per_block",
                "addition_embed_type"):
        ours, theirs = unet.get(key), config.get(key)
        if isinstance(ours, (list, tuple)):
            ours, theirs = list(ours), list(theirs or [])
        if ours != theirs:
            family = ""
            if family_of(config) != family_of(unet):
                family = f" (a ControlNet for {family_of(config)}, on {family_of(unet)})"
            raise ValueError(f"The ControlNet {name} does not fit {base.name}: its {key} is {theirs}, the model's is "
                             f"{ours}{family}. Pick a ControlNet made for this model.")
    factor = 2 ** (len(config.conditioning_embedding_out_channels) - 1)
    vae_factor = getattr(base.pipeline, "vae_scale_factor", factor)
    if factor != vae_factor:
        raise ValueError(f"The ControlNet {name} reads its control image at 1/{factor} scale, but {base.name}'s "
                         f"latents are 1/{vae_factor} of the image. Pick a ControlNet made for this model.")
