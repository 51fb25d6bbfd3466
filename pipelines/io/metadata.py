"""Generation metadata: A1111-style infotext, PNG text chunks, and atomic saving.

An infotext is the text AUTOMATIC1111 stores in a PNG's `parameters` chunk:

    a photo of a cat, (studio lighting:1.2)
    Negative prompt: blurry
    Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 1234, Emphasis: Original

We write it as A1111 >= 1.9 does (pipelines/generation/generator.py `infotext_parameters`) and parse it with
A1111's own regex, so images move both ways between the two tools; reading names what it could not
restore. A second chunk, `studio`, holds the full request and library versions as JSON, for exact
reproduction.

Saved images go to `outputs/<YYYY-MM-DD>/<counter>-<seed>.png`. A file with a final name
is always complete: the bytes go to a temporary file that is renamed into place, and a
per-counter reservation keeps concurrent saves from taking the same counter. Nothing is saved
when the disk would be left with less than `MIN_FREE_DISK_MB` free.

An infotext is text anyone can write ("Steps: 99999999, Size: 99999x99999"): what PNG Info
restores is clamped to what a request takes (`clamp_to_request_limits`), and the clamps are named.
"""

from __future__ import annotations

import io
import json
import math
import os
import platform
import re
import shutil
from datetime import datetime
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import BinaryIO

from PIL import Image, PngImagePlugin, UnidentifiedImageError

from pipelines.core.checks import MAX_INPUT_PIXELS, MAX_SEED, NUMBER_RANGES, WHOLE_NUMBER_RANGES
from pipelines.core.prompts import EMPHASIS
from pipelines.core.registry import SHARED_INFOTEXT_FIELDS
from pipelines.core.schedules import sampler_and_schedule
from pipelines.tasks import TASKS
from pipelines.tasks.control_units import MAX_UNITS as MAX_CONTROLNET_UNITS
from pipelines.tasks.controlnet import read_units

PARAMETERS_CHUNK = "parameters"   # A1111's chunk name
STUDIO_CHUNK = "studio"
NEGATIVE_PROMPT_PREFIX = "Negative prompt:"

# A1111, modules/infotext_utils.py: one `Key: value` pair of the params line.
PARAM_PATTERN = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
# Keys that PARAM_PATTERN can read back, as a whole string.
KEY_PATTERN = re.compile(r"\w[\w \-/]+")
SIZE_PATTERN = re.compile(r"(\d+)x(\d+)")
# A1111 treats the last line as params only when it holds at least this many pairs.
MIN_PARAMS_ON_LAST_LINE = 3
# Keys that describe an image rather than set anything (the hashes: the prompt's <lora:…> tags and names set it).
DESCRIPTIVE_KEYS = frozenset({"Version", "Lora hashes", "TI hashes", "Batch pos", "Stopped at step",
                              "Target calls", "Draft acceptance"})
# A1111 settings whose value here is the only one this studio has: no clip skip, noise drawn on the CPU, A1111's
# original emphasis (pipelines/core/prompts.py).
OUR_ONLY_VALUES = {"Clip skip": "1", "RNG": "CPU", "Emphasis": EMPHASIS}
CONTROLNET_KEY = re.compile(r"ControlNet (\d+)")

VERSIONED_PACKAGES = ("torch", "diffusers", "transformers", "peft", "gradio")

# Saved names: `00012-1234.png`; reservations: `.00012.reserved`.
SAVED_NAME_PATTERN = re.compile(r"(\d+)-.*\.png")
RESERVATION_PATTERN = re.compile(r"\.(\d+)\.reserved")
MAX_SAVE_ATTEMPTS = 100
# Free disk space a save leaves at least (launch.py --min-free-disk-mb): a full disk breaks more than the studio.
MIN_FREE_DISK_MB = 200
MB = 1024 ** 2
# The ranges of the settings an infotext restores, in the infotext's order: those every request checks
# (pipelines/core/checks.py).
RESTORED_RANGES = {name: (WHOLE_NUMBER_RANGES | NUMBER_RANGES)[name] for name in (
    "steps", "width", "height", "batch_size", "guidance_scale", "distilled_guidance", "guidance_rescale", "strength",
    "draft_length", "cfg_start", "cfg_end", "pag_scale", "pag_adaptive_scale", "classifier_scale")}


# ---------------------------------------------------------------------------------------
# Infotext


def _format_value(value: object) -> str:
    if isinstance(value, float):
        # repr is the shortest text that reads back as the same float: 7.5, 0.1, 1e-05.
        return str(int(value)) if value.is_integer() else repr(value)
    return str(value)


def _quote(text: str) -> str:
    """A1111's `quote`: JSON-quote a value that would otherwise break the params line."""
    if any(character in text for character in ',:"\n'):
        return json.dumps(text, ensure_ascii=False)
    return text


def _unquote(text: str) -> str:
    """A1111's `unquote`: a JSON-quoted value back to its text; anything else as it is."""
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def build_infotext(prompt: str, negative_prompt: str, params: dict[str, object]) -> str:
    """The infotext A1111 would write: prompt, `Negative prompt: ...` if any, params line.

    `params` keeps its order; None values are left out. Like A1111, the result is
    stripped of leading and trailing whitespace.
    """
    pairs = []
    for key, value in params.items():
        if value is None:
            continue
        if not isinstance(key, str) or KEY_PATTERN.fullmatch(key) is None:
            raise ValueError(
                f"Infotext key {key!r} cannot be read back: keys are a letter, digit or `_` "
                f"followed by letters, digits, spaces, `_`, `-` or `/`."
            )
        pairs.append(f"{key}: {_quote(_format_value(value))}")

    text = prompt
    if negative_prompt:
        text += f"\n{NEGATIVE_PROMPT_PREFIX} {negative_prompt}"
    text += "\n" + ", ".join(pairs)
    return text.strip()


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, params) from an infotext, the way A1111 reads it.

    The last line is the params line only if A1111's regex finds at least three pairs in
    it; otherwise there are no params. As in A1111, each prompt line is stripped.
    Values stay text (see `infotext_to_settings` for typed values).
    """
    *lines, last_line = text.strip().split("\n")
    if len(PARAM_PATTERN.findall(last_line)) < MIN_PARAMS_ON_LAST_LINE:
        lines.append(last_line)
        last_line = ""

    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    for line in lines:
        line = line.strip()
        if not negative_lines and line.startswith(NEGATIVE_PROMPT_PREFIX):
            negative_lines.append(line[len(NEGATIVE_PROMPT_PREFIX):].strip())
        elif negative_lines:
            negative_lines.append(line)
        else:
            prompt_lines.append(line)

    params = {key: _unquote(value) for key, value in PARAM_PATTERN.findall(last_line)}
    return "\n".join(prompt_lines), "\n".join(negative_lines), params


def _typed(params: dict[str, str], key: str, convert: type):
    text = params[key]
    if convert is str:
        return text
    if convert is bool:
        if text not in ("True", "False"):
            raise ValueError(f"Infotext field `{key}` should be True or False but is {text!r}.")
        return text == "True"
    try:
        return convert(text)
    except ValueError:
        kind = {int: "a whole number", float: "a number"}[convert]
        raise ValueError(f"Infotext field `{key}` should be {kind} but is {text!r}.") from None


def infotext_to_settings(params: dict[str, str]) -> dict:
    """Typed settings from parsed infotext params; see `infotext_to_settings_and_dropped`."""
    return infotext_to_settings_and_dropped(params)[0]


def infotext_to_settings_and_dropped(params: dict[str, str]) -> tuple[dict, dict[str, str]]:
    """Typed settings from parsed infotext params (ours or A1111's), and the `Key: value`s that restore nothing.

    Settings are a subset of: steps, sampler, schedule, guidance_scale, seed, width, height, batch_size, the
    guidance settings, the tasks' own fields (strength, mask_blur, …), draft, draft_length, controlnet_units,
    model, model_hash. The sampler is read in A1111 >= 1.9's form (`Sampler` + `Schedule type`, which may be a
    schedule of ours: Align Your Steps) and the older one-name form.

    Dropped are the keys this studio has no setting for (`Clip skip: 2`, `Hires upscale`, an `RNG` other than
    CPU, a schedule type the sampler doesn't run with here, …), for the caller to name to the user. Keys that
    only describe the image (`Version`, `Lora hashes`, `TI hashes`, …) and values that are this studio's
    only ones (`Clip skip: 1`, `RNG: CPU`, `Emphasis: Original`) are neither.
    """
    settings: dict[str, object] = {}
    read: set[str] = set()
    for item in (*SHARED_INFOTEXT_FIELDS, *(item for task in TASKS.values() for item in task.infotext_fields)):
        if item.key in params:
            settings[item.field] = _typed(params, item.key, item.kind)
            read.add(item.key)

    dropped: dict[str, str] = {}
    if "Sampler" in params:
        chosen, dropped_schedule = sampler_and_schedule(params["Sampler"], params.get("Schedule type"))
        settings |= chosen
        read |= {"Sampler", "Schedule type"}
        if dropped_schedule is not None:
            dropped["Schedule type"] = dropped_schedule

    if "Size" in params:
        size = SIZE_PATTERN.fullmatch(params["Size"])
        if size is None:
            raise ValueError(f"Infotext field `Size` should look like 512x768 but is {params['Size']!r}.")
        settings["width"], settings["height"] = int(size.group(1)), int(size.group(2))
        read.add("Size")

    units = read_units(params)
    if units:
        settings["controlnet_units"] = units
    if "Model" in params:
        settings["model"] = params["Model"]
    if "Model hash" in params:
        settings["model_hash"] = params["Model hash"]
    read |= {"Model", "Model hash"} | {key for key in params if _is_read_controlnet_key(key)}

    for key, value in params.items():
        if key in read or key in DESCRIPTIVE_KEYS or OUR_ONLY_VALUES.get(key) == value:
            continue
        dropped[key] = value
    return settings, dropped


def infotext_key(field: str) -> str:
    """The infotext key a setting from `infotext_to_settings_and_dropped` was read from (for messages)."""
    keys = {item.field: item.key
            for item in (*SHARED_INFOTEXT_FIELDS, *(item for task in TASKS.values() for item in task.infotext_fields))}
    keys |= {"sampler": "Sampler", "width": "Size", "height": "Size", "controlnet_units": "ControlNet units",
             "model": "Model", "model_hash": "Model hash"}
    return keys.get(field, field)


def clamp_to_request_limits(settings: dict) -> tuple[dict, list[str]]:
    """`settings` (from `infotext_to_settings_and_dropped`) with every value inside the range a request takes, and
    a note for each value that was moved or left out: a number past its range is clamped to the nearest end, a
    NaN or infinite one and a seed outside 0..2**63-1 are not restored."""
    clamped, notes = dict(settings), []
    for name, (low, high) in RESTORED_RANGES.items():
        value = clamped.get(name)
        if value is None:
            continue
        key = f"Size ({name})" if name in ("width", "height") else infotext_key(name)
        if isinstance(value, float) and not math.isfinite(value):
            del clamped[name]
            notes.append(f"{key}: {value} is not a number; not restored.")
        elif not low <= value <= high:
            clamped[name] = min(max(value, low), high)
            notes.append(f"{key}: {value} is outside {low:g} to {high:g}; restored as {clamped[name]:g}.")
    seed = clamped.get("seed")
    if seed is not None and not -1 <= seed <= MAX_SEED:
        del clamped["seed"]
        notes.append(f"Seed: {seed} is outside 0 to 2**63-1; not restored.")
    return clamped, notes


def _is_read_controlnet_key(key: str) -> bool:
    """`ControlNet N` for a unit `read_units` reads (pipelines/tasks/controlnet.py)."""
    match = CONTROLNET_KEY.fullmatch(key)
    return match is not None and int(match.group(1)) < MAX_CONTROLNET_UNITS


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape the output, for the `studio` chunk."""
    versions = {}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = importlib_metadata.version(package)
        except importlib_metadata.PackageNotFoundError:
            continue   # not installed: nothing to record
    versions["python"] = platform.python_version()
    return versions


# ---------------------------------------------------------------------------------------
# PNG text chunks


def _add_text_chunk(png_info: PngImagePlugin.PngInfo, key: str, text: str) -> None:
    # tEXt chunks are Latin-1 only; iTXt carries UTF-8.
    try:
        text.encode("latin-1")
    except UnicodeEncodeError:
        png_info.add_itxt(key, text)
    else:
        png_info.add_text(key, text)


def png_bytes_with_metadata(image: Image.Image, infotext: str, extra: dict) -> bytes:
    """`image` encoded as PNG with a `parameters` chunk (the infotext, as A1111 writes
    it) and a `studio` chunk (`extra` as JSON)."""
    png_info = PngImagePlugin.PngInfo()
    _add_text_chunk(png_info, PARAMETERS_CHUNK, infotext)
    _add_text_chunk(png_info, STUDIO_CHUNK, json.dumps(extra))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=png_info)
    return buffer.getvalue()


def read_png_metadata(path_or_file: str | os.PathLike | BinaryIO, *, name: str | None = None
                      ) -> tuple[str | None, dict | None]:
    """(infotext, studio JSON) from a PNG; each None when its chunk is missing.

    Works on A1111 images, which only have `parameters`. Raises ValueError for anything that is not a PNG, for a
    PNG that declares more than MAX_INPUT_PIXELS pixels (reading its text decodes every pixel: a few KB can
    declare gigabytes), or for a `studio` chunk that is not a JSON object. `name` is what messages call it.
    """
    name = name or (os.fspath(path_or_file) if isinstance(path_or_file, (str, os.PathLike))
                    else getattr(path_or_file, "name", "the uploaded file"))
    try:
        with Image.open(path_or_file) as image:
            if image.format != "PNG":
                raise ValueError(f"{name} is not a PNG image (it is {image.format}); "
                                 f"generation parameters are only read from PNG files.")
            # the size is known once the header is read, wherever it stands, and nothing is decoded yet
            width, height = image.size
            if width * height > MAX_INPUT_PIXELS:
                raise ValueError(f"{name} is {width}×{height} ({width * height / 1e6:.1f} megapixels); at most "
                                 f"{MAX_INPUT_PIXELS / 1e6:g} megapixels are taken. Scale it down first.")
            # `.text` also reads text chunks stored after the image data.
            chunks = dict(image.text)
    except UnidentifiedImageError:
        raise ValueError(f"{name} is not a PNG image (not an image PIL can read).") from None
    except Image.DecompressionBombError:     # PIL refuses past 2 × MAX_IMAGE_PIXELS before it tells the size
        raise ValueError(f"{name} declares more than {2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} megapixels; at most "
                         f"{MAX_INPUT_PIXELS / 1e6:g} megapixels are taken. Scale it down first.") from None
    except (OSError, SyntaxError) as error:   # PIL's words for a damaged file
        raise ValueError(f"{name} is a damaged or truncated PNG ({error}); save or export it again.") from None

    infotext = chunks.get(PARAMETERS_CHUNK)
    studio_text = chunks.get(STUDIO_CHUNK)
    if studio_text is None:
        return infotext, None
    try:
        studio = json.loads(studio_text)
    except json.JSONDecodeError as error:
        raise ValueError(f"The `{STUDIO_CHUNK}` chunk of {name} is not valid JSON: {error}.") from None
    if not isinstance(studio, dict):
        raise ValueError(f"The `{STUDIO_CHUNK}` chunk of {name} should hold a JSON object "
                         f"but holds {type(studio).__name__}.")
    return infotext, studio


# ---------------------------------------------------------------------------------------
# Saving


def _used_counters(day_dir: Path) -> tuple[set[int], set[int]]:
    """(counters of saved images, counters reserved by saves in progress)."""
    saved, reserved = set(), set()
    for entry in os.scandir(day_dir):
        if match := SAVED_NAME_PATTERN.fullmatch(entry.name):
            saved.add(int(match.group(1)))
        elif match := RESERVATION_PATTERN.fullmatch(entry.name):
            reserved.add(int(match.group(1)))
    return saved, reserved


def _reserve_counter(day_dir: Path) -> tuple[int, Path]:
    """The next free counter in `day_dir`, held by an exclusively created reservation file.

    The reservation is keyed by the counter alone, since two saves with different seeds
    would otherwise both win the same counter under different final names.
    """
    for _ in range(MAX_SAVE_ATTEMPTS):
        saved, reserved = _used_counters(day_dir)
        counter = max(saved | reserved, default=-1) + 1
        reservation = day_dir / f".{counter:05d}.reserved"
        try:
            os.close(os.open(reservation, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            continue   # another save took this counter between our scan and our claim
        # A save that finished (and dropped its reservation) between our scan and our
        # claim left its image behind: look again before using the counter.
        if counter in _used_counters(day_dir)[0]:
            os.remove(reservation)
            continue
        return counter, reservation
    raise RuntimeError(f"Could not reserve an image number in {day_dir} after "
                       f"{MAX_SAVE_ATTEMPTS} attempts; other saves kept taking them.")


class DiskSpaceError(ValueError):
    """Saving would leave the disk with less than the set margin free; the message says how much there is."""


def free_disk_bytes(folder: Path) -> int:
    """Free bytes on the disk that holds `folder` (or its nearest existing parent): what the disk check reads."""
    folder = Path(folder).resolve()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def check_disk_space(outputs_dir: Path, *, image_bytes: int = 0, min_free_mb: float = MIN_FREE_DISK_MB) -> None:
    """Raise DiskSpaceError when writing `image_bytes` into `outputs_dir` would leave less than `min_free_mb` free."""
    free = free_disk_bytes(outputs_dir)
    if free - image_bytes < min_free_mb * MB:
        needed = f"{min_free_mb:,g} MB" + (f" plus the image's {image_bytes / 1024:,.0f} KB" if image_bytes else "")
        raise DiskSpaceError(f"Not saving: the disk holding {outputs_dir} has {free / MB:,.0f} MB free, and the studio "
                             f"keeps at least {needed} free. Free some space, point --outputs at another disk, or "
                             "lower the margin with --min-free-disk-mb.")


def save_image(image: Image.Image, infotext: str, extra: dict, outputs_dir: Path, seed: int,
               now: datetime | None = None, *, min_free_mb: float = MIN_FREE_DISK_MB) -> Path:
    """Save `image` with its metadata as `outputs_dir/<YYYY-MM-DD>/<counter>-<seed>.png`.

    The counter is one more than the highest in that day's folder, starting at 00000.
    The file appears under its final name only when complete; on any error nothing is
    left behind. Refused (DiskSpaceError) when the disk would keep less than `min_free_mb` free.
    """
    # 1. Encode first: a bad image or unserialisable `extra` fails before touching disk; then the disk's margin.
    png_bytes = png_bytes_with_metadata(image, infotext, extra)
    check_disk_space(outputs_dir, image_bytes=len(png_bytes), min_free_mb=min_free_mb)

    # 2. Claim a counter.
    day_dir = Path(outputs_dir) / (now or datetime.now()).strftime("%Y-%m-%d")
    day_dir.mkdir(parents=True, exist_ok=True)
    counter, reservation = _reserve_counter(day_dir)

    # 3. Write a temporary file and rename it into place.
    final_path = day_dir / f"{counter:05d}-{seed}.png"
    temp_path = day_dir / f".{counter:05d}-{seed}.png.tmp"
    temp_created = False
    try:
        write_flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_BINARY", 0)
        file_descriptor = os.open(temp_path, write_flags, 0o666)
        temp_created = True
        with os.fdopen(file_descriptor, "wb") as temp_file:
            temp_file.write(png_bytes)
            temp_file.flush()
            # Flush to disk before the rename, so a crash can't leave a complete name
            # pointing at incomplete data.
            os.fsync(temp_file.fileno())
        os.replace(temp_path, final_path)
    except BaseException:
        if temp_created:
            temp_path.unlink(missing_ok=True)
        raise
    finally:
        reservation.unlink(missing_ok=True)
    return final_path
