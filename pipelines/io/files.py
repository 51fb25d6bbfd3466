"""Hashes of files, as A1111 prints them (model hashes, Lora hashes)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_hex(path: Path) -> str:
    """The file's SHA-256 as hex, read in 4-MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
