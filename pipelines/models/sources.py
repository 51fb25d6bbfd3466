"""Where models come from: the embedded one (assets/), a local diffusers folder, a single `.safetensors`
checkpoint, or a Hugging Face hub id from the local cache (read by checkpoints.py). What a request may read
is the one policy of pipelines/core/paths.py (`confined`, `check_weights_file`), applied here to models.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from pipelines.core.paths import ASSETS_DIR, PICKLE_SUFFIXES, ModelLoadError, check_weights_file, confined
from pipelines.io.files import sha256_hex

EMBEDDED_MODEL = ASSETS_DIR / "emoji-ldm"
EMBEDDED_NAME = "embedded"


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelSource:
    kind: str        # embedded | folder | file | hub
    location: str    # path or hub id
    name: str        # what the UI and the infotext call it


def resolve_source(spec: str, *, allowed_roots: tuple[Path, ...] | None = None,
                   allow_pickle: bool = False) -> ModelSource:
    """Turn what the user typed into a ModelSource, refusing what must not be loaded.

    `allowed_roots`, when given (requests from the UI), confines local paths to the app's folders.
    """
    spec = (spec or "").strip()
    if spec in ("", EMBEDDED_NAME):
        if not (EMBEDDED_MODEL / "model_index.json").exists():
            raise ModelLoadError(f"The embedded model is missing from {EMBEDDED_MODEL}. "
                                 "Re-clone the repository or rebuild it with `python -m recipe.train all`.")
        return ModelSource("embedded", str(EMBEDDED_MODEL), EMBEDDED_NAME)
    path = Path(spec).expanduser()
    looks_local = path.exists() or spec.startswith((".", "/", "~")) or path.suffix in PICKLE_SUFFIXES + (".safetensors",)
    if looks_local:
        path = path.resolve() if allowed_roots is None else \
            confined(spec, allowed_roots, advice=", or start the studio with `--model PATH`")
        if not path.exists():
            raise ModelLoadError(f"No model at {path}: the file or folder does not exist.")
        if path.is_file():
            check_weights_file(path, allow_pickle=allow_pickle)
            return ModelSource("file", str(path), path.stem)
        if not (path / "model_index.json").exists():
            raise ModelLoadError(f"{path} is not a diffusers model folder (it has no model_index.json).")
        return ModelSource("folder", str(path), path.name)
    if HUB_ID.match(spec):
        return ModelSource("hub", spec, spec)
    raise ModelLoadError(f"{spec!r} is neither an existing path nor a hub id like 'owner/model-name'.")


def file_hash(path: Path) -> str:
    """A1111's "Model hash" (AutoV2): the first 10 hex digits of the file's SHA-256."""
    return sha256_hex(path)[:10]


