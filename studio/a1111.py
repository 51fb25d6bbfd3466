"""AUTOMATIC1111's API shapes, translated: its JSON bodies into the studio's requests, and results back.

Pure functions, no server (studio/rest_api.py serves them). The names are A1111's (modules/api/models.py,
modules/processing.py: `cfg_scale`, `n_iter`, `denoising_strength`, `inpainting_fill`…) and sd-webui-controlnet's
for its units (scripts/external_code.py: `module`, `guidance_start`, `control_mode` as 0/1/2 or text…). What A1111
can do and this studio cannot (Hires fix, face restoration, tiling, variation seeds, styles, scripts) is refused
with the field named, never silently dropped.
"""

from __future__ import annotations

import base64
import io
import re
import time
from dataclasses import dataclass, field, replace
from typing import Any

from PIL import Image, ImageOps

from pipelines.core.checks import MAX_INPUT_PIXELS
from pipelines.core.images import decode_image
from pipelines.core.requests import SamplingSettings
from pipelines.core.results import GenerationDone
from pipelines.core.samplers import SAMPLER_NAMES
from pipelines.generation.generator import STUDIO_VERSION
from pipelines.io.metadata import parse_infotext, read_png_metadata
from pipelines.models.embeddings import EmbeddingInfo
from pipelines.tasks.control_units import (A1111_CONTROL, A1111_MODULES, A1111_RESIZE, BALANCED, CONTROL_FIRST,
                                           CROP_AND_RESIZE, JUST_RESIZE, MAX_CONTROL_PIXELS, PROMPT_FIRST,
                                           RESIZE_AND_FILL, UNIT_FIELDS, ControlUnit)
from pipelines.tasks.controlnet import ControlNetRequest
from pipelines.tasks.img2img import Img2ImgRequest
from pipelines.tasks.inpaint import InpaintRequest
from pipelines.tasks.preprocessors import CANNY_HIGH, CANNY_LOW, PREPROCESSORS
from pipelines.tasks.txt2img import Txt2ImgRequest

# A1111's API takes `sampler_name`, else `sampler_index`, whose default is "Euler"
A1111_DEFAULT_SAMPLER = "Euler"
# A1111's names and k-diffusion aliases for our samplers (modules/sd_samplers_*.py); PLMS is our PNDM
SAMPLER_ALIASES = {"PLMS": "PNDM", "plms": "PNDM", "k_euler": "Euler", "k_euler_a": "Euler a",
                   "k_euler_ancestral": "Euler a", "k_heun": "Heun", "k_lms": "LMS", "k_dpmpp_2m": "DPM++ 2M",
                   "k_dpmpp_2m_ka": "DPM++ 2M Karras", "k_dpmpp_sde_ka": "DPM++ SDE Karras", "k_lcm": "LCM"}
# Since A1111 1.9 the schedule is chosen apart from the sampler; "automatic" is the sampler's own default, which is
# Karras for these two (their `{'scheduler': 'karras'}` option there)
KARRAS_BY_DEFAULT = {"DPM++ 2M": "DPM++ 2M Karras", "DPM++ SDE": "DPM++ SDE Karras"}
SCHEDULES = ("automatic", "uniform", "karras", "align_your_steps")
# A1111's schedule ids that are a schedule of ours (pipelines/core/schedules.py), run with the plain sampler
OUR_SCHEDULES = {"align_your_steps": "Align Your Steps"}
# Our request fields under A1111's names, so that an error names what the client sent
A1111_FIELD_NAMES = {"guidance_scale": "cfg_scale", "distilled_guidance": "distilled_cfg_scale",
                     "batch_count": "n_iter", "sampler": "sampler_name",
                     "strength": "denoising_strength", "init_image": "init_images[0]", "mask_blur": "mask_blur",
                     "only_masked_padding": "inpaint_full_res_padding", "preprocessor": "module",
                     "start": "guidance_start", "end": "guidance_end", "processor_resolution": "processor_res"}
# What A1111 does and this studio does not: (field, what it is, whether a value asks for it)
UNSUPPORTED = (("enable_hr", "Hires fix", bool), ("restore_faces", "face restoration", bool),
               ("tiling", "tiling", bool), ("subseed_strength", "variation seeds", bool),
               ("seed_resize_from_w", "seed resize", lambda value: value is not None and value > 0),
               ("seed_resize_from_h", "seed resize", lambda value: value is not None and value > 0),
               ("styles", "saved prompt styles", bool), ("script_name", "scripts", bool),
               ("refiner_checkpoint", "a refiner", lambda value: value not in (None, "", "None")))
# img2img's `inpainting_fill` (0..3) and `resize_mode` (0..3), as A1111 numbers them
MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")
# sd-webui-controlnet's: control modes by number, resize-mode aliases, and its UI names of our preprocessors
CONTROL_MODE_NUMBERS = (BALANCED, PROMPT_FIRST, CONTROL_FIRST)
RESIZE_MODE_NUMBERS = (JUST_RESIZE, CROP_AND_RESIZE, RESIZE_AND_FILL, JUST_RESIZE)   # 3: just resize (latent upscale)
RESIZE_ALIASES = {"inner fit (scale to fit)": CROP_AND_RESIZE, "scale to fit (inner fit)": CROP_AND_RESIZE,
                  "outer fit (shrink to fit)": RESIZE_AND_FILL, "envelope (outer fit)": RESIZE_AND_FILL}
MODULE_ALIASES = {"invert (from white bg & black line)": "invert", "lineart_standard (from white bg & black line)":
                  "lineart_standard", "t2ia_color_grid": "color", "depth": "depth_midas"}
UNIT_KEY_ALIASES = {"input_image": "image", "guidance": "guidance_end"}   # sd-webui-controlnet's old names
CONTROLNET_SCRIPT = "controlnet"


def in_a1111_terms(message: str) -> str:
    """A pipeline error with our field names replaced by A1111's (`guidance_scale` -> `cfg_scale`)."""
    for ours, theirs in A1111_FIELD_NAMES.items():
        message = message.replace(f"`{ours}`", f"`{theirs}`")
    return message


def read_image(value, name: str, *, max_pixels: int = MAX_INPUT_PIXELS) -> Image.Image:
    """An image sent as base64 (or a data URL), decoded only when its header declares at most `max_pixels`
    pixels; the error names the field and how the text begins."""
    try:
        return decode_image(value, name, max_pixels=max_pixels)
    except ValueError as error:
        if not isinstance(value, str):
            raise
        shown = value if len(value) <= 24 else value[:24] + "…"
        raise ValueError(f"{error} It begins {shown!r}.") from None


# ----------------------------------------------------------------------------- samplers


def resolve_sampler(name: str | None, schedule: str | None) -> str:
    """Our sampler for A1111's sampler name and (1.9+) schedule type. No schedule: the name as older clients
    mean it; "automatic": the sampler's default schedule; "uniform": the plain one; "karras": its Karras form."""
    name = SAMPLER_ALIASES.get((name or A1111_DEFAULT_SAMPLER).strip(), (name or A1111_DEFAULT_SAMPLER).strip())
    if schedule in (None, ""):
        return name
    schedule = schedule.strip().lower()
    if schedule not in SCHEDULES:
        raise ValueError(f"Unknown `scheduler` {schedule!r}; this studio has {', '.join(SCHEDULES)}.")
    base = name.removesuffix(" Karras")
    if schedule == "automatic":
        return KARRAS_BY_DEFAULT.get(name, name)
    if schedule == "uniform" or schedule in OUR_SCHEDULES:
        if base != name:
            raise ValueError(f"`sampler_name` {name!r} is a Karras sampler but `scheduler` is {schedule!r}; send "
                             f"{base!r} with {schedule!r}, or 'karras'.")
        return name
    karras = f"{base} Karras"
    if karras not in SAMPLER_NAMES:
        having = ", ".join(sampler.removesuffix(" Karras") for sampler in SAMPLER_NAMES if sampler.endswith(" Karras"))
        raise ValueError(f"`sampler_name` {name!r} has no Karras schedule here; samplers with one: {having}.")
    return karras


def sampler_items() -> list[dict]:
    """A1111's /samplers items: name, aliases, options (the schedule a Karras sampler implies)."""
    aliases: dict[str, list[str]] = {}
    for alias, ours in SAMPLER_ALIASES.items():
        aliases.setdefault(ours, []).append(alias)
    return [{"name": name, "aliases": aliases.get(name, []),
             "options": {"scheduler": "karras"} if name.endswith(" Karras") else {}} for name in SAMPLER_NAMES]


def schedule_items() -> list[dict]:
    """A1111's /schedulers items for the schedules `resolve_sampler` takes."""
    return [{"name": name, "label": OUR_SCHEDULES.get(name, name.capitalize()), "aliases": None,
             "default_rho": 7.0 if name == "karras" else -1, "need_inner_model": False} for name in SCHEDULES]


# ----------------------------------------------------------------------------- requests


@dataclass
class Generation:
    """A body translated: the request to submit, and what the client should be told about it."""
    request: SamplingSettings
    notes: list[str] = field(default_factory=list)


def generation_request(body: dict, *, img2img: bool, native_side: int, preview_every: int) -> Generation:
    """The studio's request for A1111's txt2img or img2img body (with ControlNet units, or a mask: inpainting)."""
    # 1. What we cannot do is refused, with the field named
    for name, what, asks in UNSUPPORTED:
        if asks(body.get(name)):
            raise ValueError(f"`{name}` asks for {what}, which this studio does not have (it is {body.get(name)!r}); "
                             "leave it out or at its default.")
    # 2. The settings every task shares, by A1111's names (a size left out: the model's native one)
    width, height = body.get("width"), body.get("height")
    sampler = resolve_sampler(body.get("sampler_name") or body.get("sampler_index"), body.get("scheduler"))
    sampling = {"prompt": body.get("prompt") or "", "negative_prompt": body.get("negative_prompt") or "",
                "sampler": sampler, "steps": body["steps"], "guidance_scale": body["cfg_scale"], "seed": body["seed"],
                "width": native_side if width is None else width, "height": native_side if height is None else height,
                "batch_size": body["batch_size"], "batch_count": body["n_iter"], "preview_every": preview_every,
                "schedule": OUR_SCHEDULES.get((body.get("scheduler") or "").strip().lower(), "Default")}
    if body.get("distilled_cfg_scale") is not None:     # Forge's field: Flux.1 dev's distilled guidance
        sampling["distilled_guidance"] = body["distilled_cfg_scale"]
    # Every size limit is checked before any image is decoded or resized to the size asked for: a 50000×50000
    # img2img once spent 47 s and 9.3 GB resizing its input before the request refused the size
    SamplingSettings(**sampling)
    units, notes = controlnet_units(body.get("alwayson_scripts") or {})
    if not img2img:
        if not units:
            return Generation(Txt2ImgRequest(**sampling), notes)
        return Generation(controlnet_request(sampling, units, init_image=None, strength=0.75), notes)
    # 3. Image-to-Image: one init image (decoded only within the input cap), taken to the checked size as
    #    `resize_mode` says, as A1111 does
    images = body.get("init_images")
    if not images:
        raise ValueError("`init_images` is missing: img2img needs one input image (base64).")
    if len(images) > 1:
        raise ValueError(f"`init_images` holds {len(images)} images; this studio takes one per request.")
    init_image = read_image(images[0], "init_images[0]")
    strength = body["denoising_strength"]
    mask = body.get("mask")
    if not mask:
        init_image = resized(init_image.convert("RGB"), sampling["width"], sampling["height"], body["resize_mode"])
        if units:
            return Generation(controlnet_request(sampling, units, init_image=init_image, strength=strength), notes)
        return Generation(Img2ImgRequest(**sampling, init_image=init_image, strength=strength), notes)
    # 4. A mask: inpainting. "Only masked" works on the image as sent and pastes back into it; "whole picture"
    #    takes image and mask to the size first, so the result is width × height, as in A1111
    if units:
        raise ValueError("ControlNet units with a `mask` (inpainting with ControlNet) are not supported here: send "
                         "the mask without ControlNet, or ControlNet without a mask.")
    mask = read_image(mask, "mask")
    only_masked = bool(body["inpaint_full_res"])
    if not only_masked:
        init_image = resized(init_image.convert("RGB"), sampling["width"], sampling["height"], body["resize_mode"])
        mask = resized(mask if "A" in mask.getbands() else mask.convert("L"), sampling["width"], sampling["height"],
                       body["resize_mode"])
    fill, invert = body["inpainting_fill"], body["inpainting_mask_invert"]
    if isinstance(fill, bool) or fill not in range(len(MASKED_CONTENT)):
        raise ValueError(f"`inpainting_fill` must be 0 (fill), 1 (original), 2 (latent noise) or 3 (latent nothing) "
                         f"but is {fill!r}.")
    if isinstance(invert, bool) or invert not in (0, 1):
        raise ValueError(f"`inpainting_mask_invert` must be 0 (inpaint masked) or 1 (inpaint not masked) but is "
                         f"{invert!r}.")
    return Generation(InpaintRequest(
        **sampling, init_image=init_image, mask=mask, strength=strength, mask_blur=body["mask_blur"],
        masked_content=MASKED_CONTENT[fill], mask_mode=("Inpaint masked", "Inpaint not masked")[invert],
        inpaint_area="Only masked" if only_masked else "Whole picture",
        only_masked_padding=body["inpaint_full_res_padding"]), notes)


def resized(image: Image.Image, width: int, height: int, resize_mode) -> Image.Image:
    """A1111's img2img `resize_mode`: 0 (and 3) stretch to width × height, 1 crops to its shape then resizes.
    The size is one the request's checks took (`generation_request`)."""
    if resize_mode in (0, 3) and not isinstance(resize_mode, bool):
        return image.resize((width, height), Image.Resampling.LANCZOS)
    if resize_mode == 1 and not isinstance(resize_mode, bool):
        return ImageOps.fit(image, (width, height), Image.Resampling.LANCZOS)
    raise ValueError(f"`resize_mode` must be 0 (just resize), 1 (crop and resize) or 3 (just resize, latent "
                     f"upscale) but is {resize_mode!r}; 2 (resize and fill) is not supported here.")


# ----------------------------------------------------------------------------- ControlNet units


def controlnet_units(scripts: dict) -> tuple[list[dict], list[str]]:
    """The enabled units of `alwayson_scripts.controlnet.args` as our ControlUnit fields (images not yet read:
    an img2img unit without one takes the init image), and notes. Other always-on scripts are refused, as A1111
    refuses scripts it does not have."""
    if not isinstance(scripts, dict):
        raise ValueError(f"`alwayson_scripts` must be an object like {{\"controlnet\": {{\"args\": [...]}}}} but is "
                         f"{type(scripts).__name__}.")
    units, notes = [], []
    for name, script in scripts.items():
        if name.lower() != CONTROLNET_SCRIPT:
            raise ValueError(f"always on script {name!r} not found; this studio has: {CONTROLNET_SCRIPT}.")
        args = script.get("args", []) if isinstance(script, dict) else None
        if not isinstance(args, list):
            raise ValueError(f"`alwayson_scripts.{name}` must be an object with an `args` list of units.")
        for index, values in enumerate(args):
            if values is None:
                continue
            unit = _unit_fields(values, index, notes)
            if unit is not None:
                units.append(unit)
    if len(units) > 3:
        raise ValueError(f"{len(units)} ControlNet units are enabled; this studio runs at most 3 at once.")
    return units, notes


def _unit_fields(values, index: int, notes: list[str]) -> dict | None:
    where = f"ControlNet unit {index} (`alwayson_scripts.controlnet.args[{index}]`)"
    if not isinstance(values, dict):
        raise ValueError(f"{where} must be an object like {{\"image\": …, \"module\": …, \"model\": …}} but is "
                         f"{type(values).__name__}.")
    values = {UNIT_KEY_ALIASES.get(key, key): value for key, value in values.items()}
    if values.get("enabled", True) is False:
        return None
    image, mask = values.get("image"), values.get("mask")
    if isinstance(image, dict):
        image, mask = image.get("image"), image.get("mask") or mask
    if mask:
        raise ValueError(f"{where} has a `mask`; masked control images are not supported here.")
    model = values.get("model")
    if not model or model == "None":
        raise ValueError(f"{where} names no `model`; GET /controlnet/model_list lists the ControlNets here.")
    module = _preprocessor(values.get("module"), where)
    threshold_a, threshold_b = values.get("threshold_a"), values.get("threshold_b")
    if module == "canny" and threshold_a not in (None, -1, CANNY_LOW) or module == "canny" and \
            threshold_b not in (None, -1, CANNY_HIGH):
        notes.append(f"ControlNet unit {index}: canny runs at its own thresholds ({CANNY_LOW}/{CANNY_HIGH}); "
                     f"threshold_a {threshold_a} and threshold_b {threshold_b} were not used.")
    resolution = values.get("processor_res", 512)
    return {"image": image or None, "where": where, "preprocessor": module,
            # sd-webui-controlnet lists its models as "name [hash]"
            "model": re.sub(r"\s*\[[0-9a-fA-F]+\]$", "", str(model)),
            "weight": values.get("weight", 1.0), "start": values.get("guidance_start", 0.0),
            "end": values.get("guidance_end", 1.0), "control_mode": _control_mode(values.get("control_mode", 0), where),
            "resize_mode": _resize_mode(values.get("resize_mode", 1), where),
            "pixel_perfect": bool(values.get("pixel_perfect", False)),
            "processor_resolution": 512 if resolution in (None, -1) else resolution}


def _preprocessor(module, where: str) -> str:
    """Our preprocessor for sd-webui-controlnet's module name (its key, its UI alias, or ours)."""
    name = (module or "none").strip()
    if name in PREPROCESSORS:
        return name
    ours = {theirs: ours for ours, theirs in A1111_MODULES.items()}
    name = MODULE_ALIASES.get(name, name)
    if name in ours:
        return ours[name]
    raise ValueError(f"{where}: `module` {module!r} is not a preprocessor here; known: "
                     f"{', '.join(A1111_MODULES.values())}.")


def _control_mode(value, where: str) -> str:
    return _numbered_choice("control_mode", value, where, CONTROL_MODE_NUMBERS, A1111_CONTROL, {})


def _resize_mode(value, where: str) -> str:
    return _numbered_choice("resize_mode", value, where, RESIZE_MODE_NUMBERS, A1111_RESIZE, RESIZE_ALIASES)


def _numbered_choice(field_name: str, value, where: str, numbers: tuple[str, ...], names: dict[str, str],
                     aliases: dict[str, str]) -> str:
    """Our choice for sd-webui-controlnet's number, its display name, our name or an alias (any case)."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(numbers):
        return numbers[value]
    by_name = {name.lower(): ours for ours, name in names.items()} | {ours: ours for ours in names} | aliases
    if isinstance(value, str) and value.strip().lower() in by_name:
        return by_name[value.strip().lower()]
    raise ValueError(f"{where}: `{field_name}` must be a number from 0 to {len(numbers) - 1} or one of "
                     f"{', '.join(names.values())} but is {value!r}.")


def controlnet_request(sampling: dict, units: list[dict], *, init_image: Image.Image | None,
                       strength: float) -> ControlNetRequest:
    """A ControlNetRequest: the first unit's settings as fields, the others as `more_units`. Each unit is checked
    on its own first, so that an error says which unit it is about."""
    checked = []
    for unit in units:
        where, image = unit.pop("where"), unit.pop("image")
        if image is None and init_image is None:
            raise ValueError(f"{where} has no `image`; send the control image as base64.")
        image = init_image if image is None else read_image(image, f"{where}.image", max_pixels=MAX_CONTROL_PIXELS)
        try:
            checked.append(ControlUnit(image=image, **unit))
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
    first, *more = checked
    first_fields = {name: getattr(first, name) for name in UNIT_FIELDS}
    return ControlNetRequest(**sampling, control_image=first.image, **first_fields, more_units=more,
                             init_image=init_image, strength=strength)


# ----------------------------------------------------------------------------- results


# Keys of the infotext that A1111's `info` has fields of its own for; the rest is `extra_generation_params`
CORE_INFOTEXT_KEYS = {"Steps", "Sampler", "CFG scale", "Seed", "Size", "Model hash", "Model", "Version"}


def info(request: SamplingSettings, done: GenerationDone, *, model_name: str | None, model_hash: str | None,
         started: float, messages: list[str]) -> dict:
    """A1111's `info` (Processed.js(): the prompts, seeds, size, sampler, infotexts…) for a finished generation;
    `messages` (not A1111's) holds what the studio wants the client to know."""
    count = request.batch_size * request.batch_count
    resolved = replace(request, seed=done.seed)     # the request's own rule for the seed of image i of batch b
    seeds = [resolved.seed_for(batch, index) for batch in range(request.batch_count)
             for index in range(request.batch_size)]
    texts = [item.infotext for item in done.images]
    extra = {key: value for key, value in parse_infotext(texts[0])[2].items() if key not in CORE_INFOTEXT_KEYS} \
        if texts else {}
    strength = getattr(request, "strength", None) if getattr(request, "init_image", None) is not None else None
    return {
        "prompt": request.prompt, "all_prompts": [request.prompt] * count,
        "negative_prompt": request.negative_prompt, "all_negative_prompts": [request.negative_prompt] * count,
        "seed": done.seed, "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * count, "subseed_strength": 0,
        "width": request.width, "height": request.height, "sampler_name": request.sampler,
        "cfg_scale": request.guidance_scale, "steps": request.steps, "batch_size": request.batch_size,
        "restore_faces": False, "face_restoration_model": None, "sd_model_name": model_name,
        "sd_model_hash": model_hash, "sd_vae_name": None, "sd_vae_hash": None, "seed_resize_from_w": -1,
        "seed_resize_from_h": -1, "denoising_strength": strength, "extra_generation_params": extra,
        "index_of_first_image": 0, "infotexts": texts, "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(started)), "clip_skip": 1,
        "is_using_inpainting_conditioning": False, "version": STUDIO_VERSION,
        "messages": messages}


def embedding_items(embeddings: list[EmbeddingInfo]) -> dict:
    """A1111's /embeddings answer: `loaded` (those that fit the loaded model) and `skipped`, each name -> its `step`,
    `sd_checkpoint`, `sd_checkpoint_name` (as the file says), `shape` (the vectors' width) and `vectors`."""
    def item(info: EmbeddingInfo) -> dict:
        step = str(info.metadata.get("step"))
        return {"step": int(step) if step.isdigit() else None, "sd_checkpoint": info.metadata.get("sd_checkpoint"),
                "sd_checkpoint_name": info.metadata.get("sd_checkpoint_name"), "shape": info.width,
                "vectors": info.vectors}

    return {"loaded": {info.name: item(info) for info in embeddings if info.problem is None},
            "skipped": {info.name: item(info) for info in embeddings if info.problem is not None}}


def parameters(body: dict) -> dict:
    """A1111's `parameters`: the request as received, its images left out unless `include_init_images`."""
    values = dict(body)
    if not values.pop("include_init_images", False) and "init_images" in values:
        values["init_images"], values["mask"] = None, None
    return values


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_png_info(value: str) -> tuple[str | None, dict | None]:
    """(infotext, studio chunk) of a PNG sent as base64, read as the PNG Info tab reads a file (which refuses a
    PNG declaring more pixels than the input cap before it decodes any: its text may follow the pixels)."""
    text = value.strip()
    try:
        data = base64.b64decode(text.split(",", 1)[1] if text.startswith("data:") else text, validate=True)
    except ValueError:
        shown = text if len(text) <= 24 else text[:24] + "…"
        raise ValueError(f"`image` must be a PNG as base64 text, but it is not base64; it begins {shown!r}.") \
            from None
    return read_png_metadata(io.BytesIO(data), name="`image`")


def png_info_parameters(text: str) -> dict:
    """A1111's parsed infotext for /png-info: Prompt, Negative prompt, each key, Size as Size-1 and Size-2."""
    prompt, negative, params = parse_infotext(text) if text else ("", "", {})
    parsed: dict[str, Any] = {"Prompt": prompt, "Negative prompt": negative}
    for key, value in params.items():
        size = re.fullmatch(r"(\d+)x(\d+)", value)
        if size:
            parsed[f"{key}-1"], parsed[f"{key}-2"] = size.group(1), size.group(2)
        else:
            parsed[key] = value
    return parsed
