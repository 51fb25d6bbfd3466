"""Emoji art and captions for the embedded model.

The only network step of the whole recipe is `fetch()`: `npm pack` of two emoji-datasource
packages from the npm registry into a cache folder that is never committed. Everything
after that is offline and deterministic.

Each image is a 64x64 RGBA PNG; we composite it on white. One record per image:
the base emoji (its class, shared by both art styles and all skin tones), the art style
and the skin tone, from which `caption()` builds prompts that read naturally:
"red apple", "waving hand, medium skin tone", "dog face, twemoji style".
"""

from __future__ import annotations

import json
import random
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

PACKAGES = {"noto": ("emoji-datasource-google", "16.0.0", "google"),
            "twemoji": ("emoji-datasource-twitter", "16.0.0", "twitter")}
# Art no model of the recipe trains on: the held-out style the VAE's reconstructions are measured on
HELD_OUT_PACKAGES = {"facebook": ("emoji-datasource-facebook", "16.0.0", "facebook")}
SKIN_TONES = {"1F3FB": "light skin tone", "1F3FC": "medium-light skin tone",
              "1F3FD": "medium skin tone", "1F3FE": "medium-dark skin tone",
              "1F3FF": "dark skin tone"}
DEFAULT_CACHE = Path(__file__).resolve().parent.parent / ".cache" / "emoji"


@dataclass(frozen=True)
class EmojiRecord:
    class_index: int      # index of the base emoji (same for both styles and all skin tones)
    name: str             # "father christmas"
    short_names: tuple    # ("santa",)
    category: str         # "people & body"
    style: str            # "noto" or "twemoji"
    skin_tone: str | None  # "medium skin tone" or None
    image_path: Path

    @property
    def prompt(self) -> str:
        """The canonical prompt: the Unicode name, plus the skin tone when there is one."""
        return self.name if self.skin_tone is None else f"{self.name}, {self.skin_tone}"


def fetch(cache_dir: Path = DEFAULT_CACHE, packages: dict = PACKAGES) -> Path:
    """Download (npm pack) and unpack the emoji packages (by default the two the model trains on) into cache_dir,
    once."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    for style, (package, version, _) in packages.items():
        target = cache_dir / style
        if (target / "package" / "emoji.json").exists():
            continue
        tarball = cache_dir / f"{package}-{version}.tgz"
        if not tarball.exists():
            subprocess.run(["npm", "pack", f"{package}@{version}", "--silent"],
                           cwd=cache_dir, check=True, stdout=subprocess.DEVNULL)
        partial = cache_dir / f"{style}.partial"
        partial.mkdir(exist_ok=True)
        with tarfile.open(tarball) as archive:
            members = [m for m in archive.getmembers()
                       if m.name.endswith(("emoji.json", "LICENSE")) or "/64/" in m.name]
            archive.extractall(partial, members=members, filter="data")
        partial.rename(target)
    return cache_dir


def _readable(text: str) -> str:
    return text.replace("_", " ").replace("’", "'").lower().strip()


def load_records(cache_dir: Path = DEFAULT_CACHE, packages: dict = PACKAGES) -> tuple[list[EmojiRecord], list[str]]:
    """All images of the packages' styles (by default the two the model trains on), and the class names (one per
    base emoji)."""
    records: list[EmojiRecord] = []
    class_names: list[str] = []
    class_of: dict[str, int] = {}
    for style, (_, _, folder) in packages.items():
        root = cache_dir / style / "package"
        entries = json.loads((root / "emoji.json").read_text())
        for entry in sorted(entries, key=lambda e: e["sort_order"]):
            name = _readable(entry["name"] or entry["short_name"])
            if entry["category"] == "Component":
                continue  # bare skin-tone swatches and hair components
            if entry["unified"] not in class_of:
                class_of[entry["unified"]] = len(class_names)
                class_names.append(name)
            variants = [(None, entry)]
            for key, variant in entry.get("skin_variations", {}).items():
                tones = set(key.split("-"))
                if len(tones) == 1:  # mixed-tone couples are left out: no caption says who is which
                    variants.append((SKIN_TONES[tones.pop()], variant))
            for skin_tone, variant in variants:
                path = root / "img" / folder / "64" / variant["image"]
                if not variant.get(f"has_img_{folder}") or not path.exists():
                    continue
                records.append(EmojiRecord(
                    class_index=class_of[entry["unified"]], name=name,
                    short_names=tuple(_readable(s).replace("-", " ") for s in entry["short_names"]),
                    category=_readable(entry["category"]), style=style,
                    skin_tone=skin_tone, image_path=path))
    return records, class_names


def load_image(path: Path, size: int = 64) -> np.ndarray:
    """RGBA emoji composited on white, as HxWx3 uint8."""
    rgba = Image.open(path).convert("RGBA")
    if rgba.size != (size, size):
        rgba = rgba.resize((size, size), Image.Resampling.LANCZOS)
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))


def load_images(records: list[EmojiRecord], size: int = 64) -> np.ndarray:
    return np.stack([load_image(r.image_path, size) for r in records])


def caption(record: EmojiRecord, rng: random.Random) -> str:
    """A randomised training caption for one image; the canonical prompt is the most common form."""
    subject = record.name if rng.random() < 0.75 else rng.choice(record.short_names)
    parts = [subject]
    if record.skin_tone and rng.random() < 0.85:
        parts.append(record.skin_tone)
    if rng.random() < 0.3:
        parts.append(f"{record.style} style")
    if rng.random() < 0.1:
        parts.append(record.category)
    return ", ".join(parts)


def all_caption_words(records: list[EmojiRecord]) -> list[str]:
    """Every phrase a caption can be made of: the corpus for the tokenizer."""
    phrases = set()
    for record in records:
        phrases.update([record.name, *record.short_names, record.category, f"{record.style} style"])
        if record.skin_tone:
            phrases.add(record.skin_tone)
    return sorted(phrases)
