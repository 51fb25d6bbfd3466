"""The emoji judge, inference side: the small CNN that recipe/evaluate.py trains on real emoji (and ships as
assets/eval/emoji-classifier.safetensors), loaded and run here, so the app can score a LoRA's effect
without the recipe. Its 256-d feature layer is the space the LoRA training's feature distance is measured
in (`feature_distances`, the `EffectScore` the studio passes to `train`, pipelines/training/loop.py)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from pipelines.core.paths import ASSETS_DIR

SHIPPED_JUDGE = ASSETS_DIR / "eval" / "emoji-classifier.safetensors"


class EmojiClassifier(nn.Module):
    """Four conv blocks (32-64-128-256, BatchNorm + ReLU + 2x2 max pool), global average pool, a
    256-d feature layer (the space the Fréchet distance is measured in) and a linear head."""

    def __init__(self, num_classes: int, image_size: int = 64, widths: tuple = (32, 64, 128, 256),
                 feature_dim: int = 256):
        super().__init__()
        self.num_classes = num_classes
        self.image_size = image_size
        layers, channels = [], 3
        for width in widths:
            layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            channels = width
        self.trunk = nn.Sequential(*layers)
        self.feature = nn.Sequential(nn.Linear(channels, feature_dim, bias=False), nn.BatchNorm1d(feature_dim),
                                     nn.ReLU(inplace=True))
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(feature_dim, num_classes))
        self.provenance: dict = {}  # how it was trained and what it scored on held-out images

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1], NCHW -> the 256-d features."""
        return self.feature(self.trunk(pixels).mean(dim=(2, 3)))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(pixels))


def load_judge(path: Path = SHIPPED_JUDGE) -> tuple[EmojiClassifier, list[str]]:
    """The judge in `path` (weights as safetensors; class names and provenance in its metadata) and its
    class names."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise ValueError(f"No emoji judge at {path}: it ships with the app (assets/eval/); restore it, or make it "
                         "with `python -m recipe.evaluate`.")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    classifier = EmojiClassifier(int(metadata["num_classes"]), image_size=int(metadata["image_size"]))
    classifier.load_state_dict(load_file(str(path)))
    classifier.provenance = json.loads(metadata["provenance"])
    return classifier.eval(), json.loads(metadata["class_names"])


def to_pixels(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1]."""
    images = torch.as_tensor(images)
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def check_images(images: np.ndarray, name: str = "images") -> None:
    if not (isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4
            and images.shape[3] == 3 and images.shape[1] == images.shape[2]):
        shape = getattr(images, "shape", None)
        dtype = getattr(images, "dtype", type(images).__name__)
        raise ValueError(f"`{name}` must be a uint8 array of square RGB images (N, H, H, 3) but is {dtype} "
                         f"with shape {shape}.")


@torch.no_grad()
def _in_batches(classifier: EmojiClassifier, images: np.ndarray, method, batch_size: int) -> np.ndarray:
    check_images(images)
    if images.shape[1] != classifier.image_size:
        raise ValueError(f"The classifier was trained on {classifier.image_size}px images but got "
                         f"{images.shape[1]}px ones; resize them first.")
    classifier.eval()
    outputs = [method(to_pixels(images[start:start + batch_size])).numpy()
               for start in range(0, len(images), batch_size)]
    return np.concatenate(outputs).astype(np.float32)


def classify(classifier: EmojiClassifier, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits (N, classes) for uint8 NHWC images."""
    return _in_batches(classifier, images, classifier, batch_size)


def features(classifier: EmojiClassifier, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """The 256-d feature-layer activations (N, 256) for uint8 NHWC images."""
    return _in_batches(classifier, images, classifier.embed, batch_size)


def as_array(samples: Sequence[Image.Image], size: int) -> np.ndarray:
    """PIL samples as uint8 NHWC at the classifier's size (LANCZOS when the model's native size differs)."""
    return np.stack([np.asarray(s.convert("RGB") if s.size == (size, size)
                                else s.convert("RGB").resize((size, size), Image.Resampling.LANCZOS))
                     for s in samples])


def feature_distances(training: list, before: list, after: list) -> tuple[float, float]:
    """|mean feature(samples) - mean feature(training images)| at weight 0 and at weight 1, in the shipped
    judge's feature space (images resized to its 64 px): a LoRA's `EffectScore`."""
    judge, _ = load_judge()
    size = judge.image_size
    centre = features(judge, as_array(training, size)).mean(axis=0)
    return tuple(float(np.linalg.norm(features(judge, as_array(images, size)).mean(axis=0) - centre))
                 for images in (before, after))
