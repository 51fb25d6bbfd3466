"""The app's own folders: where it is installed, what ships with it (assets/), and the default models/."""

from __future__ import annotations

from pathlib import Path

APP_ROOT = Path(__file__).resolve().parents[2]
ASSETS_DIR = APP_ROOT / "assets"
DEFAULT_MODELS_DIR = APP_ROOT / "models"
