"""Shared fixtures: the seeded tiny model (recipe/tiny.py) saved as a folder, and a studio on it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from recipe.tiny import build_tiny_pipeline

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The tiny pipeline saved as a diffusers folder (safetensors), built once per test session."""
    folder = tmp_path_factory.mktemp("tiny") / "tiny-sd"
    build_tiny_pipeline(folder.parent).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture
def studio(tiny_model_dir, tmp_path):
    """A model manager with the tiny model loaded from its folder, and a generator saving to tmp."""
    from pipelines.generate import Generator
    from pipelines.memory import MemoryManager
    from pipelines.models import ModelManager

    manager = ModelManager(MemoryManager(device="cpu"), models_dir=tmp_path / "models")
    manager.load(str(tiny_model_dir))
    return Generator(manager, tmp_path / "outputs")
