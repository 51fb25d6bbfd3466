"""ControlNet preprocessors: an input image -> the control image a ControlNet reads.

The ones that need no weights run here and now (canny, lineart standard, content shuffle, colour grid,
invert, none). The detectors that need weights (HED, PiDiNet, MiDaS, OpenPose, …) are listed too: they
run when the user has put their files under `models/annotators/`, and otherwise say exactly which file
to put where. Nothing is downloaded.

Control images follow the convention of the ControlNets trained on them: white lines on black for edges
and scribbles, colours for the colour grid. A drawing made on the sketch pad (black on white) becomes
a scribble with "invert".

The recipe (recipe/controlnet.py) trains our ControlNets on these same functions, so the studio's canny
is exactly the canny the model learnt.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from pipelines.core.paths import DEFAULT_MODELS_DIR

GRID_CELLS = 8            # the colour grid: 8x8 cells over the image (8 px cells at 64 px)
CANNY_LOW, CANNY_HIGH = 100, 200


def _aux(module: str, name: str):
    """A controlnet_aux detector class, imported quietly: the package's __init__ imports every detector, and
    some warn about optional packages (mediapipe, timm names) we don't use."""
    import importlib
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(importlib.import_module(f"controlnet_aux.{module}".rstrip(".")), name)


def canny(image: Image.Image, *, low_threshold: int = CANNY_LOW, high_threshold: int = CANNY_HIGH) -> Image.Image:
    """Canny edges (controlnet_aux's CannyDetector), white on black, at the image's own size."""
    CannyDetector = _aux("canny", "CannyDetector")
    side = max(image.size)
    return CannyDetector()(image.convert("RGB"), low_threshold=low_threshold, high_threshold=high_threshold,
                           detect_resolution=side, image_resolution=side, output_type="pil").resize(image.size)


def colour_grid(image: Image.Image, *, cells: int = GRID_CELLS) -> Image.Image:
    """The image's mean colour over a cells×cells grid, shown at the image's size (blocks of colour)."""
    small = image.convert("RGB").resize((cells, cells), Image.Resampling.BOX)
    return small.resize(image.size, Image.Resampling.NEAREST)


def invert(image: Image.Image) -> Image.Image:
    """Black lines on white (a drawing, the sketch pad) -> white on black, as scribble ControlNets read."""
    return ImageOps.invert(image.convert("RGB"))


def lineart_standard(image: Image.Image) -> Image.Image:
    """controlnet_aux's weight-free line art (a difference of Gaussians), white on black."""
    LineartStandardDetector = _aux("lineart_standard", "LineartStandardDetector")
    side = max(image.size)
    return LineartStandardDetector()(image.convert("RGB"), detect_resolution=side, output_type="pil").resize(image.size)


def content_shuffle(image: Image.Image, *, seed: int = 0) -> Image.Image:
    """controlnet_aux's content shuffle (a random warp that keeps colours and textures, not layout), seeded."""
    ContentShuffleDetector = _aux("shuffle", "ContentShuffleDetector")
    side = max(image.size)
    state = np.random.get_state()
    np.random.seed(seed % 2 ** 32)
    try:
        shuffled = ContentShuffleDetector()(image.convert("RGB"), detect_resolution=side, image_resolution=side,
                                            output_type="pil")
    finally:
        np.random.set_state(state)
    return shuffled.resize(image.size)


def scribble_from_edges(edges: np.ndarray, rng: np.random.Generator, *, dropout: float = 0.3,
                        jitter_px: float = 1.0) -> np.ndarray:
    """A hand-drawn-looking scribble from an edge map (H×W uint8, 255 = edge): strokes thickened or
    thinned at random, some dropped, the rest bent by a smooth random warp. The recipe trains the
    scribble ControlNet on these, so that a line drawn by hand (thicker, wobblier, incomplete) works."""
    import cv2
    height, width = edges.shape
    strokes = edges.copy()
    thickness = rng.integers(0, 3)           # 0: as is, 1-2: dilated
    if thickness:
        strokes = cv2.dilate(strokes, np.ones((thickness + 1, thickness + 1), np.uint8))
    if rng.random() < 0.3:
        strokes = np.maximum(cv2.erode(strokes, np.ones((2, 2), np.uint8)), edges)
    # drop whole pieces of stroke: a coarse random mask, upsampled
    cells = max(2, width // 8)
    keep = rng.random((cells, cells)) >= dropout * rng.random()
    keep = cv2.resize(keep.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST)
    strokes = strokes * keep
    # jitter: a smooth displacement field
    if jitter_px > 0:
        field = rng.normal(0, jitter_px, (2, 4, 4)).astype(np.float32)
        dx = cv2.resize(field[0], (width, height), interpolation=cv2.INTER_CUBIC)
        dy = cv2.resize(field[1], (width, height), interpolation=cv2.INTER_CUBIC)
        grid_x, grid_y = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
        strokes = cv2.remap(strokes, grid_x + dx, grid_y + dy, cv2.INTER_LINEAR)
    return np.where(strokes > 64, 255, 0).astype(np.uint8)


# ----------------------------------------------------------------------------- the menu


ANNOTATORS = DEFAULT_MODELS_DIR / "annotators"   # beside models/controlnet/


@dataclass(frozen=True)
class Preprocessor:
    name: str
    run: Callable[..., Image.Image] | None   # None: needs weights (see `files`)
    description: str
    files: tuple[str, ...] = ()              # for weight-needing detectors: the files under models/annotators/
    detector: str = ""                       # controlnet_aux class that loads them

    def __call__(self, image: Image.Image, *, annotators: Path = ANNOTATORS, seed: int = 0) -> Image.Image:
        if not isinstance(image, Image.Image):
            raise ValueError(f"The {self.name} preprocessor needs an image but received {type(image).__name__}.")
        if self.run is not None:
            return self.run(image, seed=seed) if self.run is content_shuffle else self.run(image)
        return self._detect(image, annotators)

    def _detect(self, image: Image.Image, annotators: Path) -> Image.Image:
        missing = [name for name in self.files if not (annotators / name).is_file()]
        if missing:
            raise ValueError(f"The {self.name} preprocessor needs its weights, and nothing is downloaded: put "
                             + ", ".join(f"`{name}`" for name in missing) + f" in `{annotators}/` "
                             "(from the lllyasviel/Annotators repository), or pick a preprocessor that needs none "
                             f"({', '.join(OFFLINE_PREPROCESSORS)}).")
        detector = _aux("", self.detector).from_pretrained(str(annotators))
        side = max(image.size)
        return detector(image.convert("RGB"), detect_resolution=side, image_resolution=side,
                        output_type="pil").resize(image.size)


PREPROCESSORS: dict[str, Preprocessor] = {p.name: p for p in (
    Preprocessor("none", lambda image: image.convert("RGB"), "the image is the control image"),
    Preprocessor("invert", invert, "black lines on white (a drawing) -> white on black"),
    Preprocessor("canny", canny, "Canny edges, thresholds 100/200"),
    Preprocessor("colour grid", colour_grid, f"mean colours over a {GRID_CELLS}×{GRID_CELLS} grid"),
    Preprocessor("lineart standard", lineart_standard, "line art by a difference of Gaussians"),
    Preprocessor("content shuffle", content_shuffle, "a random warp keeping colours, not layout (seeded)"),
    Preprocessor("hed", None, "soft edges (HED)", ("ControlNetHED.pth",), "HEDdetector"),
    Preprocessor("pidinet", None, "soft edges (PiDiNet)", ("table5_pidinet.pth",), "PidiNetDetector"),
    Preprocessor("midas depth", None, "depth (MiDaS)", ("dpt_hybrid-midas-501f0c75.pt",), "MidasDetector"),
    Preprocessor("openpose", None, "body pose (OpenPose)", ("body_pose_model.pth", "hand_pose_model.pth",
                                                            "facenet.pth"), "OpenposeDetector"),
    Preprocessor("lineart", None, "line art (learnt)", ("sk_model.pth", "sk_model2.pth"), "LineartDetector"),
    Preprocessor("mlsd", None, "straight lines (M-LSD)", ("mlsd_large_512_fp32.pth",), "MLSDdetector"),
    Preprocessor("normal bae", None, "surface normals (BAE)", ("scannet.pt",), "NormalBaeDetector"),
)}
OFFLINE_PREPROCESSORS = tuple(name for name, p in PREPROCESSORS.items() if p.run is not None)


def preprocess(name: str, image: Image.Image, **options) -> Image.Image:
    if name not in PREPROCESSORS:
        raise ValueError(f"Unknown preprocessor {name!r}; choose one of {', '.join(PREPROCESSORS)}.")
    return PREPROCESSORS[name](image, **options)
