"""Reading a model source into a text-to-image pipeline: a diffusers folder (the embedded model's too), a
single-file checkpoint in the original SD layout, or a hub id from the local cache.

What may be read was decided before (sources.py: `resolve_source`, `use_safetensors`); here every failure
becomes one ModelLoadError that says why and what to do.
"""

from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from pathlib import Path

from diffusers import AutoPipelineForText2Image, DiffusionPipeline

from pipelines.core.families import (SUPPORTED, check_family, family_of_checkpoint, family_of_folder,
                                     family_of_pipeline, with_article)
from pipelines.core.paths import ModelLoadError, use_safetensors
from pipelines.models.memory import is_out_of_memory
from pipelines.models.sources import ModelSource

HUB_PROBE_TIMEOUT_S = 3.0


def read_pipeline(source: ModelSource, *, dtype, allow_pickle: bool, config: str | None = None) -> DiffusionPipeline:
    """The pipeline `source` holds, read into RAM (placing it on the device is the manager's); a family the tabs do
    not run is refused (families.py), from its folder's index before any weight is read where it can be."""
    pipeline = _read(source, dtype=dtype, allow_pickle=allow_pickle, config=config)
    check_family(family_of_pipeline(pipeline), source.name)
    return pipeline


def _read(source: ModelSource, *, dtype, allow_pickle: bool, config: str | None) -> DiffusionPipeline:
    if source.kind == "folder":      # what the folder says it holds, before its weights are read
        check_family(family_of_folder(Path(source.location)), source.name)
    try:
        if source.kind in ("embedded", "folder"):
            return AutoPipelineForText2Image.from_pretrained(
                source.location, dtype=dtype, use_safetensors=use_safetensors(allow_pickle),
                **folder_arguments(Path(source.location)))
        if source.kind == "hub":
            return from_hub(source, dtype=dtype, use_safetensors=use_safetensors(allow_pickle))
        return from_single_file(Path(source.location), dtype=dtype, config=config)
    except ModelLoadError:
        raise
    except Exception as error:  # diffusers/hf_hub raise many kinds; translate them once, here
        if is_out_of_memory(error):
            raise ModelLoadError(f"Not enough memory to load {source.name}: {error}. "
                                 "Try --memory low, or a smaller model.") from error
        raise ModelLoadError(explain_load_failure(source, error)) from error


# a component's weights: plain, or a variant's ("fp16", "bf16"), whole or in shards
_WEIGHTS = re.compile(r"(?:diffusion_pytorch_model|model)(?:\.(?P<variant>\w+?))?(?:-\d+-of-\d+)?\.safetensors")


def weights_variant(folder: Path) -> str | None:
    """The variant a folder's weights were saved as ("fp16": `unet/diffusion_pytorch_model.fp16.safetensors`, as
    `huggingface-cli download --include "*fp16*"` fetches them) where a component has that variant and no plain
    weights: diffusers reads only the plain files unless told the variant. None: plain weights. Several variants
    and no plain files are refused, naming them."""
    variants = set()
    for component in (path for path in folder.iterdir() if path.is_dir()) if folder.is_dir() else ():
        found = [match["variant"] for match in map(_WEIGHTS.fullmatch, (path.name for path in
                                                                           component.glob("*.safetensors"))) if match]
        if found and None not in found:
            variants.update(found)
    if len(variants) > 1:
        raise ModelLoadError(f"{folder.name} holds its weights as several variants ({', '.join(sorted(variants))}) "
                             "and not as plain files; keep one variant's files (or the plain ones) and load it again.")
    return variants.pop() if variants else None


def folder_arguments(folder: Path) -> dict:
    """What diffusers' `from_pretrained` must be told to read `folder` as it is: its weights' variant, and the
    components it lists as absent."""
    variant = weights_variant(folder)
    return {**({"variant": variant} if variant else {}), **absent_components(folder)}


def absent_components(folder: Path) -> dict[str, None]:
    """The components a folder's model_index.json lists as absent ([null, null]) that its pipeline does not count as
    optional (an SD 3 saved without its T5: `text_encoder_3`), passed as None, as diffusers' loader wants them
    given (`from_pretrained(..., text_encoder_3=None)`); it refuses the folder otherwise."""
    import diffusers

    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        return {}
    optional = set(getattr(getattr(diffusers, str(index.get("_class_name")), None), "_optional_components", ()) or ())
    return {name: None for name, value in index.items() if not name.startswith("_") and isinstance(value, list)
            and value[:1] == [None] and name not in optional}


def from_single_file(path: Path, *, dtype, config: str | None) -> DiffusionPipeline:
    """A single `.safetensors` (or, allowed, pickled) checkpoint: SD 1.x/2.x, SDXL, SD 3.x, Flux or Flux 2, told apart
    by its keys. `config` (--model-config) is a diffusers folder of the same architecture, for offline reading, and
    where the components the file does not hold come from (SD 3 and Flux files often hold the transformer alone)."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type, load_single_file_checkpoint

    try:
        checkpoint = load_single_file_checkpoint(str(path))
    except Exception as error:   # before diffusers' config lookup, whose offline error would hide this one
        raise ModelLoadError(f"{path.name} is not a readable checkpoint ({type(error).__name__}: {error}); it "
                             "may be truncated or not a model at all. Download or export it again.") from error
    model_type = infer_diffusers_model_type(checkpoint)
    keys = list(checkpoint)
    del checkpoint  # from_single_file reads the file again; don't hold two copies
    scaled = sorted({key.rsplit(".", 1)[-1] for key in keys if key.endswith(QUANTIZATION_KEYS)})
    if scaled:
        raise ModelLoadError(f"{path.name} holds quantized weights with their scales ({', '.join(scaled)}: ComfyUI's "
                             "scaled fp8 layout), which diffusers' single-file readers take as plain weights. Load a "
                             "bf16 or fp16 file of it, or the diffusers folder.")
    family = _single_file_family(path, family_of_checkpoint(model_type), config, keys)
    if family == "Flux 2":
        return _flux2_from_single_file(path, keys, dtype=dtype, config=config)
    classes = {"SD 1.x/2.x": StableDiffusionPipeline, "SDXL": StableDiffusionXLPipeline, "SD 3.x":
               StableDiffusion3Pipeline, "Flux": FluxPipeline}
    if family is not None and family not in classes:
        raise ModelLoadError(f"{path.name} is a single-file {family} checkpoint; the studio reads {family} models as "
                             "diffusers folders (model_index.json and a folder per component). Load the folder.")
    pipeline_class = classes.get(family, StableDiffusionPipeline)
    kwargs = {"dtype": dtype, **_borrowed_components(path, family, keys, config, dtype)}
    if config:
        kwargs["config"] = config
    if pipeline_class is StableDiffusionPipeline:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    return pipeline_class.from_single_file(str(path), **kwargs)


@contextmanager
def _explained(what: str, advice: str):
    """Any failure inside as a ModelLoadError: `what` (the error in brackets), then `advice`; running out of memory
    passes through, for `_read` to say so with what to do."""
    try:
        yield
    except Exception as error:
        if is_out_of_memory(error):
            raise
        raise ModelLoadError(f"{what} ({type(error).__name__}: {error}). {advice}") from error


# the keys of quantized files' scales (ComfyUI's scaled fp8: `scaled_fp8`, `*.scale_weight`; others' `*.weight_scale`)
QUANTIZATION_KEYS = ("scaled_fp8", ".scale_weight", ".weight_scale", ".scale_input", ".input_scale", ".comfy_quant")


def _flux2_from_single_file(path: Path, keys: list[str], *, dtype, config: str | None) -> DiffusionPipeline:
    """A Flux 2 file: the transformer alone in Black Forest Labs' layout (as `flux2-dev.safetensors` and the [klein]
    files are released), read by diffusers' `Flux2Transformer2DModel.from_single_file` with the --model-config
    folder's transformer config; the pipeline ([dev] or [klein], its text encoder and VAE) is that folder's. diffusers
    names every such file [dev], so only the folder can say which it is."""
    from diffusers import AutoPipelineForText2Image, Flux2Transformer2DModel

    others = sorted({key.split(".")[0] for key in keys if key.startswith(("vae.", "first_stage_model.",
                                                                            "text_encoders.", "conditioner."))})
    if others:
        raise ModelLoadError(f"{path.name} holds more than Flux 2's transformer ({', '.join(others)}); the studio "
                             "reads Flux 2 files of the transformer alone, as Black Forest Labs releases them. Load "
                             "the diffusers folder instead.")
    if not config:
        raise ModelLoadError(f"{path.name} is Flux 2's transformer alone. Pass --model-config with a diffusers folder "
                             "of the Flux 2 model it was made from ([dev] or [klein]): its text encoder, VAE and "
                             "transformer config.")
    from diffusers.loaders.single_file_utils import load_single_file_checkpoint

    folder, prefix = Path(config), "model.diffusion_model."   # ComfyUI's checkpoints name it so; diffusers' reader not
    with _explained(f"{path.name} could not be read as the transformer of --model-config {folder.name}",
                    "Pass the folder of the Flux 2 model the file was made from."):
        state = {key.removeprefix(prefix): tensor for key, tensor in load_single_file_checkpoint(str(path)).items()}
        transformer = Flux2Transformer2DModel.from_single_file(state, config=str(folder), subfolder="transformer",
                                                               dtype=dtype, local_files_only=True)
    return AutoPipelineForText2Image.from_pretrained(str(folder), transformer=transformer, dtype=dtype,
                                                     **folder_arguments(folder))


_VAE = ("first_stage_model.", "vae.")
# where a family's single files hold each component besides the denoiser (always in the file); one the file lacks
# comes from --model-config
FILE_COMPONENTS = {
    "SD 1.x/2.x": {"vae": _VAE}, "SDXL": {"vae": _VAE},
    "SD 3.x": {"vae": _VAE, "text_encoder": ("text_encoders.clip_l.",), "text_encoder_2": ("text_encoders.clip_g.",),
               "text_encoder_3": ("text_encoders.t5xxl.",)},
    "Flux": {"vae": _VAE, "text_encoder": ("text_encoders.clip_l.",), "text_encoder_2": ("text_encoders.t5xxl.",)},
}


def _borrowed_components(path: Path, family: str | None, keys: list[str], config: str | None, dtype) -> dict:
    """The components a single file does not hold (an SD 3 or Flux file of the transformer alone, an SD file without
    its VAE), read from the --model-config folder. diffusers' own `from_single_file` reads only a diffusers model's
    weights from the config folder (never a text encoder's), so they are read here and passed in."""
    places = FILE_COMPONENTS.get(family, {})
    held = {name for name, prefixes in places.items() if any(key.startswith(prefixes) for key in keys)}
    # a component the config lists as absent (an SD 3 saved without its T5) is passed as None, with its tokenizer;
    # one the file holds needs the config's architecture
    absent = absent_components(Path(config)) if config else {}
    if held & set(absent):
        raise ModelLoadError(f"{path.name} holds a {' and a '.join(sorted(held & set(absent)))}, which --model-config "
                             f"{Path(config).name} lists as absent, so it has no configuration to read it with. Pass "
                             "a diffusers folder of the same model that has it.")
    wanted = [name for name in places if name not in held]
    if not wanted:
        return {}
    if not config:
        raise ModelLoadError(f"{path.name} holds no {' and no '.join(wanted)}. Pass --model-config with a diffusers "
                             f"folder of the {family} model it was made from, with those weights.")
    from diffusers import DiffusionPipeline

    # what the file holds is not read twice: the denoiser (by either name) and the components found in it
    skip = {name: None for name in ("unet" if family in ("SD 1.x/2.x", "SDXL") else "transformer", *held)}
    with _explained(f"{path.name} holds no {' and no '.join(wanted)}, so they are read from --model-config "
                    f"{Path(config).name}, which could not give them",
                    "Pass a diffusers folder of the same model with those weights."):
        base = DiffusionPipeline.from_pretrained(config, dtype=dtype, **{**folder_arguments(Path(config)), **skip})
    return {**absent, **{name: getattr(base, name, None) for name in wanted}}


# the keys that name a family where diffusers' guess falls back to SD 1.x: it names SDXL by its second encoder's
# 10th layer and SD 3 by its blocks' width, which a small model lacks
STRUCTURE = {"SDXL": "conditioner.embedders.1.", "SD 3.x": "joint_blocks."}


def _single_file_family(path: Path, guessed: str | None, config: str | None, keys: list[str]) -> str | None:
    """The family of a single file: diffusers' guess from its keys, or where that is its SD 1.x fallback and the keys
    have another family's structure, that family. A family no tab runs is refused (families.py), and then a
    --model-config folder of another family than the file's, naming both."""
    if guessed == "SD 1.x/2.x":
        guessed = next((family for family, marker in STRUCTURE.items() if any(marker in key for key in keys)), guessed)
    check_family(guessed, path.name)     # first: a refiner's file with its base's config is a refiner, not a mismatch
    named = family_of_folder(Path(config)) if config else None
    if named is None or named == guessed:
        return guessed
    family = f"the {guessed} family" if guessed else "an unknown family"
    raise ModelLoadError(f"{path.name} is a checkpoint of {family}, but --model-config {Path(config).name} is a "
                         f"folder of the {named} family. Pass a diffusers folder of the file's own family.")


def from_hub(source: ModelSource, *, dtype, use_safetensors) -> DiffusionPipeline:
    """A hub id from the local cache; downloaded only when it is not cached and the hub answers. Offline
    (HF_HUB_OFFLINE, or the hub not reachable within a few seconds) an uncached id fails at once with the
    reason, instead of after the hub client's retries."""
    snapshot = cached_snapshot(source.location)       # what the cached folder holds, as for a folder
    if snapshot:   # its index, before a weight is read (a refiner's flag does not survive the text-to-image class)
        check_family(family_of_folder(snapshot), source.name)
    cached = folder_arguments(snapshot) if snapshot else {}
    try:
        return AutoPipelineForText2Image.from_pretrained(source.location, dtype=dtype, use_safetensors=use_safetensors,
                                                         local_files_only=True, **cached)
    except Exception as not_cached:
        if hub_offline() or not _hub_reachable():
            raise ModelLoadError(explain_load_failure(source, OSError(f"offline: {not_cached}"))) from not_cached
    return AutoPipelineForText2Image.from_pretrained(source.location, dtype=dtype, use_safetensors=use_safetensors)


def cached_snapshot(repo_id: str) -> Path | None:
    """The local cache's folder of `repo_id` (its snapshot of the main revision), or None when it is not cached."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):     # not cached, or not a valid id
        return None


def _hub_reachable() -> bool:
    """Whether the hub answers within a few seconds (through the hub client's own session and proxies)."""
    from huggingface_hub import constants, get_session
    try:
        get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT_S)
        return True
    except Exception:  # any failure to get an answer means: do not wait for the download to fail
        return False


def hub_offline() -> bool:
    from huggingface_hub import constants
    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def explain_load_failure(source: ModelSource, error: Exception) -> str:
    text = f"{type(error).__name__}: {error}"
    offline = hub_offline() or any(word in text for word in (
        "offline", "LocalEntryNotFound", "Cannot reach", "couldn't connect", "Connection", "resolve",
        "outgoing traffic has been disabled"))
    if source.kind == "hub" and offline:
        return (f"{source.location!r} is not in the local Hugging Face cache and cannot be downloaded (no network). "
                f"On a connected machine run `huggingface-cli download {source.location}` (then copy the cache), "
                "or put the model's folder under models/ and load it from there.")
    if source.kind == "hub" and ("404" in text or "not found" in text.lower() or "RepositoryNotFound" in text):
        return f"No model {source.location!r} on the Hugging Face hub (or it is private). Check the id."
    if source.kind == "file" and offline:
        return (f"{Path(source.location).name} needs its architecture's diffusers config, which is not cached and "
                "cannot be downloaded offline. Pass --model-config with a diffusers folder of the same "
                "architecture (for example the embedded model's for SD 1.x-shaped checkpoints).")
    if "AutoPipeline can't find a pipeline linked to" in text:     # a folder whose pipeline has no text-to-image form
        kind = text.split("linked to ", 1)[1].split(" ", 1)[0]
        return (f"{source.name} is {with_article(kind)} model, which has no text-to-image form in diffusers, so no "
                f"tab runs it. The studio's tabs run {', '.join(SUPPORTED)} models; load a model of one of those "
                "families.")
    if "safetensors" in text and source.kind != "file":
        return (f"{source.name} has no .safetensors weights (only pickled .bin files?). Convert them, or start "
                "the studio with --allow-pickle if you trust the source.")
    return f"Could not load {source.name}: {text}"
