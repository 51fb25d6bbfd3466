"""Training settings saved by name (kohya users' presets), and the settings file the command line reads.

A preset is `models/training-presets/<preset>.json`: every setting of a `TrainingRequest` but the data (the
images, their captions and repeats), which a preset never carries. The same JSON is the settings file that
`python -m pipelines.training --settings FILE --data FOLDER` reads: the same settings, on the folder's images
with their `.txt` captions (captions edited in the tab's table and per-image repeats stay in the tab).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import fields
from pathlib import Path

from pipelines.core.paths import confined
from pipelines.training.request import TrainingRequest

PRESET_NAME = re.compile(r"^[A-Za-z0-9][\w .-]{0,63}$")
FORMAT = "diffusion-studio training settings"
DATA_FIELDS = ("images", "captions", "repeats")
SETTING_FIELDS = tuple(field.name for field in fields(TrainingRequest) if field.name not in DATA_FIELDS)


def settings_document(settings: dict) -> dict:
    """The JSON a preset or a settings file holds: the format's name and version, and the settings."""
    unknown = sorted(set(settings) - set(SETTING_FIELDS))
    if unknown:
        raise ValueError(f"Not training settings: {', '.join(unknown)}. Known: {', '.join(SETTING_FIELDS)}.")
    return {"format": FORMAT, "version": 1, "settings": dict(settings)}


def read_settings(text: str, *, source: str) -> dict:
    """The settings of a preset or settings file, checked: every key a `TrainingRequest` setting."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{source} is not JSON ({error.msg}, line {error.lineno}).") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT or not isinstance(document.get("settings"),
                                                                                            dict):
        raise ValueError(f"{source} is not a training settings file (it must hold "
                         f'{{"format": "{FORMAT}", "settings": {{…}}}}).')
    return settings_document(document["settings"])["settings"]


def preset_folder(models_dir: Path) -> Path:
    return models_dir / "training-presets"


def preset_names(models_dir: Path) -> list[str]:
    folder = preset_folder(models_dir)
    return sorted(path.stem for path in folder.glob("*.json")) if folder.is_dir() else []


def _preset_path(models_dir: Path, name: str) -> Path:
    if not isinstance(name, str) or not PRESET_NAME.match(name):
        raise ValueError(f"A preset's name must be 1 to 64 letters, digits, spaces, '.', '-' or '_' but is {name!r}.")
    return confined(preset_folder(models_dir) / f"{name}.json", [models_dir], what="The preset")


def save_preset(models_dir: Path, name: str, settings: dict) -> Path:
    """`settings` (a request's `settings()`) as the preset `name`, written whole (a .partial file, then renamed)."""
    path = _preset_path(models_dir, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(settings_document(settings), indent=2) + "\n")
    os.replace(partial, path)
    return path


def load_preset(models_dir: Path, name: str) -> dict:
    path = _preset_path(models_dir, name)
    if not path.is_file():
        known = ", ".join(preset_names(models_dir)) or "none yet"
        raise ValueError(f"No training preset {name!r} (presets: {known}).")
    return read_settings(path.read_text(), source=f"The preset {name!r}")
