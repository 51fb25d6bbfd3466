"""Animations for the Diffusion Explorer tab: frames written as a looping GIF or an H.264 MP4, and a recorded
trace's frames of one kind (x_t, x̂_0 or a noise prediction) exported that way."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from pipelines.explorer.trace import Trace

# Exported MP4s are upscaled (nearest neighbour) until the shorter side reaches this.
MIN_VIDEO_SIDE_PX = 256


def export_animation(frames: Sequence[Image.Image], path: Path, *, fps: int = 10) -> Path:
    """Write `frames` as a looping GIF (Pillow) or an H.264 MP4 (imageio-ffmpeg), chosen by suffix.

    The file appears atomically: it is written under a temporary name in the same folder and
    then moved into place. MP4 frames are upscaled (nearest neighbour, integer factor) until the
    shorter side is at least 256 px and padded to even sizes, as yuv420p requires.
    Pillow merges identical consecutive GIF frames, so a GIF of repeated frames has fewer frames.
    """
    # 1. Check inputs
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".gif", ".mp4"):
        raise ValueError(f"Animations can be saved as .gif or .mp4 but the path ends in {path.suffix!r}.")
    if len(frames) == 0:
        raise ValueError("`frames` is empty; pass at least one image.")
    sizes = {frame.size for frame in frames}
    if len(sizes) != 1:
        raise ValueError(f"All frames have to have the same size but sizes are {sorted(sizes)}.")
    if not 1 <= fps <= 60:
        raise ValueError(f"`fps` has to be in [1, 60] but is {fps}.")
    frames = [frame.convert("RGB") for frame in frames]

    # 2. Write under a temporary name next to the target, then move it into place
    path.parent.mkdir(parents=True, exist_ok=True)
    file_descriptor, temporary_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=suffix)
    os.close(file_descriptor)
    try:
        if suffix == ".gif":
            frames[0].save(
                temporary_name,
                format="GIF",
                save_all=True,
                append_images=frames[1:],
                duration=round(1000 / fps),
                loop=0,
            )
        else:
            _write_mp4(frames, temporary_name, fps=fps)
        os.replace(temporary_name, path)
    except BaseException:
        Path(temporary_name).unlink(missing_ok=True)
        raise
    return path


def _write_mp4(frames: list[Image.Image], filename: str, *, fps: int) -> None:
    import imageio.v2 as imageio  # deferred: loads the ffmpeg plugin machinery

    width, height = frames[0].size
    factor = max(1, math.ceil(MIN_VIDEO_SIDE_PX / min(width, height)))
    scaled_width, scaled_height = width * factor, height * factor
    padded_size = (scaled_width + scaled_width % 2, scaled_height + scaled_height % 2)
    writer = imageio.get_writer(
        filename,
        format="FFMPEG",
        fps=fps,
        codec="libx264",
        pixelformat="yuv420p",
        macro_block_size=1,  # we pad to even sizes ourselves; don't let imageio resize
    )
    with writer:
        for frame in frames:
            frame = frame.resize((scaled_width, scaled_height), Image.Resampling.NEAREST)
            canvas = Image.new("RGB", padded_size)
            canvas.paste(frame, (0, 0))
            writer.append_data(np.asarray(canvas))


def export_trace(trace: Trace, kind: str, path: Path, *, fps: int = 8) -> Path:
    """A GIF or MP4 (by suffix) of the trace's frames of `kind`."""
    return export_animation(trace.frames(kind), Path(path), fps=fps)
