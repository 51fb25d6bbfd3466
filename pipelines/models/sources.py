"""Where models come from, and the one policy for what may be read.

A model is the embedded one (assets/), a local diffusers folder, a single `.safetensors` checkpoint, or a
Hugging Face hub id from the local cache (read by checkpoints.py). Every path a request names, whatever it
is for (a model, a draft, a ControlNet, a LoRA file, a training dataset), goes through `confined`: `..`
and symbolic links are resolved first, so no link inside models/ leads a request outside the app's
folders (`inside` asks the same question for a listing); every weights file through `check_weights_file`,
and every weights folder read with `use_safetensors(allow_pickle)`: `.safetensors` only, pickled
checkpoints (which can run code when loaded) refused unless the studio was started with --allow-pickle.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipelines.core.paths import ASSETS_DIR
from pipelines.io.files import sha256_hex

EMBEDDED_MODEL = ASSETS_DIR / "emoji-ldm"
EMBEDDED_NAME = "embedded"


PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelLoadError(ValueError):
    """A model could not be loaded; the message says why and what to do."""


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


def confined(path: str | Path, roots: Sequence[Path], *, what: str = "", into: str = "models/",
             advice: str = "") -> Path:
    """`path` with `..` and every symbolic link resolved, refused unless it then lies under one of `roots`
    (resolved too). `what` names the thing in the message ("The LoRA 'x'"); `into` is where it belongs and
    `advice` adds a way out."""
    resolved = Path(path).expanduser().resolve()
    if not inside(resolved, roots):
        folders = ", ".join(str(root) for root in roots)
        raise ModelLoadError(f"{what + ' ' if what else ''}{str(path)!r} is {resolved}, outside the app's model "
                             f"folders ({folders}); requests never read outside them (links out of models/ "
                             f"included). Move or copy it into {into}{advice}.")
    return resolved


def inside(path: str | Path, roots: Sequence[Path]) -> bool:
    """Whether `path`, links and `..` resolved, lies under one of `roots`: what `confined` accepts."""
    resolved = Path(path).expanduser().resolve()
    return any(resolved.is_relative_to(Path(root).resolve()) for root in roots)


def check_weights_file(path: Path, *, allow_pickle: bool) -> None:
    """Weights are read from `.safetensors` files; a pickled checkpoint only when the user opted in."""
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise ModelLoadError(f"{path.name} is a pickled checkpoint, which can run arbitrary code when "
                             "loaded. Convert it to .safetensors, or start the studio with --allow-pickle "
                             "if you trust its source.")
    if suffix not in PICKLE_SUFFIXES + (".safetensors",):
        raise ModelLoadError(f"{path.name} is not a model checkpoint: expected a .safetensors file.")


def use_safetensors(allow_pickle: bool) -> bool | None:
    """diffusers' `use_safetensors` for reading a folder (or a hub id): True reads `.safetensors` weights only,
    refusing a folder that has only pickled `.bin` ones; None, with --allow-pickle, takes either."""
    return None if allow_pickle else True
