"""The app's own folders (where it is installed, what ships with it in assets/, the default models/), and the
one policy for what a request may read.

Every path a request names, whatever it is for (a model, a draft, a ControlNet, a LoRA file, a training
dataset), goes through `confined`: `..` and symbolic links are resolved first, so no link inside models/
leads a request outside the app's folders (`inside` asks the same question for a listing); every weights
file through `check_weights_file`, and every weights folder is read with `use_safetensors(allow_pickle)`:
`.safetensors` only, pickled checkpoints (which can run code when loaded) refused unless the studio was
started with --allow-pickle.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

APP_ROOT = Path(__file__).resolve().parents[2]
ASSETS_DIR = APP_ROOT / "assets"
LORA_FOLDER_WEIGHTS = "pytorch_lora_weights.safetensors"   # the weights file of a diffusers LoRA folder
DEFAULT_MODELS_DIR = APP_ROOT / "models"


PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


class ModelLoadError(ValueError):
    """A model could not be loaded; the message says why and what to do."""


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
