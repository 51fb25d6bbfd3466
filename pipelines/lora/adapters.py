"""LoRAs in any prompt: A1111's `<lora:name:weight>`, applied as peft adapters on the loaded model.

- Files live under `models/lora/`: one `.safetensors` file in the kohya / A1111 key format
  (`lora_unet_…lora_down.weight`), diffusers' or peft's; or a diffusers LoRA folder. A link there may
  lead anywhere inside models/, never out of it: the one path policy (pipelines/models/sources.py).
  The app ships LoRAs of its own in assets/ (`SHIPPED_LORAS`: the embedded model's LCM-LoRA, its
  four-step version); they are named like any other, and a file of the same name in models/lora/ wins.
- Each is loaded once per model as a named adapter (ComfyUI's model patcher idea), and chosen per
  request with `set_adapters`; one alone on a CPU runs merged, the originals kept (merged.py). A
  request that names no LoRA turns the adapters off, so its image is the plain one, bit for bit; so is
  a weight of 0.
- Loading counts the modules the file matched on the loaded model. A file that matches nothing, or
  whose shapes differ, is an error that names the base model the file says it was made for.
- The tags stay in the prompt the infotext records (as A1111 does) and are taken out of the text
  the text encoder reads; the infotext adds `Lora hashes`, A1111's short SHA-256 of each file.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from pipelines.core.fast import EMBEDDED_FAST_LORA, EMBEDDED_FAST_LORA_FOLDER
from pipelines.core.paths import ASSETS_DIR, LORA_FOLDER_WEIGHTS, check_weights_file, confined, inside
from pipelines.core.transformers import denoiser_of
from pipelines.io.files import sha256_hex

FOLDER_WEIGHTS = LORA_FOLDER_WEIGHTS
# name -> folder of the LoRAs the app ships (recipe/lcm.py trains the embedded model's LCM-LoRA)
SHIPPED_LORAS = {EMBEDDED_FAST_LORA: EMBEDDED_FAST_LORA_FOLDER}


def lora_files(folder: Path) -> dict[str, Path]:
    """Name -> file of every LoRA under `folder` (models/lora/): `.safetensors` files, and folders holding
    diffusers' `pytorch_lora_weights.safetensors`. An entry may be a link that stays inside models/; one that
    leads outside is not listed, as `load_lora` would refuse it."""
    roots = lora_roots(folder)
    return {name: path for name, path in _entries(folder).items() if inside(path, roots)}


def shown_path(folder: Path, path: Path) -> str:
    """Where LoRA file `path` lies, for a listing: under the LoRA folder `folder`, or the app's shipped one."""
    path = Path(path)
    return str(path.relative_to(folder)) if path.is_relative_to(folder) else str(path.relative_to(ASSETS_DIR.parent))


def lora_roots(folder: Path) -> tuple[Path, ...]:
    """Where the files of the LoRA folder `folder` may lie once links are resolved: the models/ folder it is in,
    and the shipped LoRAs' folders."""
    return (Path(folder).parent, *SHIPPED_LORAS.values())


def find_lora(folder: Path, name: str) -> Path:
    """The file of LoRA `name` under `folder` (to hand to `load_lora`), or an error naming what there is."""
    entry = _entries(folder).get(name)
    if entry is None:
        names = ", ".join(lora_files(folder)) or "none"
        raise ValueError(f"No LoRA named {name!r} in {folder} (available: {names}). Put its .safetensors file "
                         "there, or fix the name in <lora:…>.")
    return entry


def _entries(folder: Path) -> dict[str, Path]:
    found = {name: shipped / FOLDER_WEIGHTS for name, shipped in SHIPPED_LORAS.items()
             if (shipped / FOLDER_WEIGHTS).is_file()}
    if not folder.is_dir():
        return found
    for entry in sorted(folder.iterdir()):
        if entry.suffix == ".safetensors" and entry.is_file():
            found[entry.stem] = entry
        elif entry.is_dir() and (entry / FOLDER_WEIGHTS).is_file():
            found[entry.name] = entry / FOLDER_WEIGHTS
    return found


def short_hash(path: Path) -> str:
    """A1111's `Lora hashes` value: the first 12 hex digits of the file's SHA-256."""
    return sha256_hex(path)[:12]


def made_for(path: Path) -> str:
    """What the file says it was trained on (kohya's and modelspec's metadata), for error messages."""
    with safe_open(str(path), framework="pt") as reader:
        metadata = reader.metadata() or {}
    for key in ("ss_sd_model_name", "modelspec.architecture", "ss_base_model_version", "base_model"):
        if metadata.get(key):
            return str(metadata[key])
    return "a model it does not name"


@dataclass
class LoadedLora:
    adapter: str          # the peft adapter's name on the model
    path: Path            # the file read, links resolved
    hash: str
    modules: int          # UNet and text-encoder modules it patches
    stamp: tuple          # the file's (size, mtime) when loaded: a changed file is loaded again


def adapter_name(name: str) -> str:
    """A peft adapter name for LoRA `name`, distinct for distinct names ("a b" and "a_b" differ)."""
    return "lora_" + re.sub(r"\W", "_", name) + "_" + hashlib.sha1(name.encode()).hexdigest()[:6]


def load_lora(pipeline, name: str, path: Path, *, roots: tuple[Path, ...]) -> LoadedLora:
    """Load `path` onto `pipeline` as an adapter; refuse a file that leads outside `roots` (links resolved), is
    not `.safetensors`, or does not fit the model."""
    path = confined(path, roots, what=f"LoRA {name!r}:", into="models/lora/")
    check_weights_file(path, allow_pickle=False)     # peft's loader reads LoRAs as .safetensors only
    adapter = adapter_name(name)
    if not hasattr(pipeline, "load_lora_weights"):      # PixArt: diffusers reads no LoRA files for it
        raise ValueError(f"LoRA {name!r}: the loaded model's pipeline ({type(pipeline).__name__}) takes no LoRA files "
                         "in diffusers. Use the LoRA with a model of its own family.")
    try:
        pipeline.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=adapter)
    except Exception as error:   # diffusers/peft name a shape or key mismatch in many ways; say it once
        _forget(pipeline, adapter)
        detail = " ".join(str(error).split())[:200]
        raise ValueError(f"LoRA {name!r} does not fit the loaded model ({type(error).__name__}: {detail}…). "
                         f"The file says it was made for {made_for(path)}.") from error
    modules = count_modules(pipeline, adapter)
    if modules == 0:
        _forget(pipeline, adapter)
        raise ValueError(f"LoRA {name!r} matched no module of the loaded model, so it would do nothing. The file "
                         f"says it was made for {made_for(path)}.")
    return LoadedLora(adapter=adapter, path=path, hash=short_hash(path), modules=modules, stamp=file_stamp(path))


def file_stamp(path: Path) -> tuple:
    status = path.stat()
    return status.st_size, status.st_mtime_ns


def count_modules(pipeline, adapter: str) -> int:
    count = 0
    for component in (denoiser_of(pipeline), getattr(pipeline, "text_encoder", None)):
        if component is not None:
            count += sum(1 for module in component.modules()
                         if adapter in getattr(module, "lora_A", {}))
    return count


def _forget(pipeline, adapter: str) -> None:
    listed = pipeline.get_list_adapters() if hasattr(pipeline, "get_list_adapters") else {}
    if any(adapter in names for names in listed.values()):
        pipeline.delete_adapters([adapter])
