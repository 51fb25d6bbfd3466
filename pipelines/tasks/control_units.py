"""ControlNet units: one ControlNet with its control image and sd-webui-controlnet's settings (what each
does is in pipelines/tasks/controlnet.py's docstring), how a control image takes the generation's shape,
and the names sd-webui-controlnet gives them."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from PIL import Image, ImageOps

from pipelines.core.checks import NUMBER_RANGES, check_choice, check_flag, check_number, check_whole
from pipelines.core.images import decode_image, fit_image
from pipelines.tasks.preprocessors import PREPROCESSORS, preprocess

DEFAULT_CONTROLNET = "emoji-controlnet-canny"


BALANCED, PROMPT_FIRST, CONTROL_FIRST = "balanced", "my prompt is more important", "controlnet is more important"


CONTROL_MODES = (BALANCED, PROMPT_FIRST, CONTROL_FIRST)


JUST_RESIZE, CROP_AND_RESIZE, RESIZE_AND_FILL = "just resize", "crop and resize", "resize and fill"


RESIZE_MODES = (JUST_RESIZE, CROP_AND_RESIZE, RESIZE_AND_FILL)


MAX_UNITS = 3


SOFT_INJECTION = 0.825


MAX_CONTROL_PIXELS = 4096 * 4096


# sd-webui-controlnet's names for our preprocessors, and for its resize and control modes
A1111_MODULES = {"none": "none", "invert": "invert", "canny": "canny", "colour grid": "color",
                 "lineart standard": "lineart_standard", "content shuffle": "shuffle", "hed": "softedge_hed",
                 "pidinet": "softedge_pidinet", "midas depth": "depth_midas", "openpose": "openpose",
                 "lineart": "lineart_realistic", "mlsd": "mlsd", "normal bae": "normal_bae"}


A1111_RESIZE = {JUST_RESIZE: "Just Resize", CROP_AND_RESIZE: "Crop and Resize", RESIZE_AND_FILL: "Resize and Fill"}


A1111_CONTROL = {BALANCED: "Balanced", PROMPT_FIRST: "My prompt is more important",
                 CONTROL_FIRST: "ControlNet is more important"}


@dataclass(kw_only=True)
class UnitSettings:
    """A unit's settings, as sd-webui-controlnet names them (what each does: pipelines/tasks/controlnet.py). The
    ControlNet request holds its first unit's as fields of its own."""
    preprocessor: str = "canny"
    model: str = DEFAULT_CONTROLNET
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    control_mode: str = BALANCED
    resize_mode: str = CROP_AND_RESIZE
    pixel_perfect: bool = True
    processor_resolution: int = 512


UNIT_FIELDS = tuple(item.name for item in fields(UnitSettings))


@dataclass(kw_only=True)
class ControlUnit(UnitSettings):
    """One ControlNet and its control image, with sd-webui-controlnet's settings."""
    image: Image.Image = field(repr=False)
    _control: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        self.image = decode_image(self.image, "control image", max_pixels=MAX_CONTROL_PIXELS)
        width, height = self.image.size
        if width < 8 or height < 8 or width * height > MAX_CONTROL_PIXELS:
            raise ValueError(f"The control image is {width}×{height}; it must be at least 8×8 and at most "
                             f"{MAX_CONTROL_PIXELS:,} pixels.")
        check_choice("preprocessor", self.preprocessor, tuple(PREPROCESSORS))
        check_choice("control_mode", self.control_mode, CONTROL_MODES)
        check_choice("resize_mode", self.resize_mode, RESIZE_MODES)
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError("`model` must name a ControlNet (see the ControlNet tab's model list).")
        for name in ("weight", "start", "end"):     # start and end: shares of the steps
            check_number(name, getattr(self, name), *NUMBER_RANGES[name])
        if self.start > self.end:
            raise ValueError(f"`start` ({self.start}) must not be after `end` ({self.end}).")
        check_whole("processor_resolution", self.processor_resolution, 64, 2048, unit="px")
        check_flag("pixel_perfect", self.pixel_perfect)

    def acts_at(self, index: int, total: int) -> bool:
        """Whether the unit adds its residuals at step `index` of `total` (diffusers' control_guidance rule)."""
        return self.weight > 0 and not (index / total < self.start or (index + 1) / total > self.end)

    def block_scales(self, blocks: int) -> list[float]:
        """The weight per residual (down blocks, then the middle): soft injection outside balanced mode."""
        if self.control_mode == BALANCED:
            return [float(self.weight)] * blocks
        return [float(self.weight) * SOFT_INJECTION ** (blocks - 1 - k) for k in range(blocks)]

    def control_image(self, width: int, height: int, *, seed: int = 0) -> Image.Image:
        """The preprocessed control image at width×height (cached per size)."""
        key = (width, height, seed)
        if key not in self._control:
            if self.pixel_perfect:
                image = preprocess(self.preprocessor, resize_for(self.image, width, height, self.resize_mode),
                                   seed=seed)
            else:
                scale = self.processor_resolution / min(self.image.size)
                detect = self.image.convert("RGB").resize((max(8, round(self.image.width * scale)),
                                                           max(8, round(self.image.height * scale))))
                image = resize_for(preprocess(self.preprocessor, detect, seed=seed), width, height, self.resize_mode)
            self._control[key] = image.convert("RGB")
        return self._control[key]

    def to_json(self) -> dict:
        return {"image_size": list(self.image.size), "preprocessor": self.preprocessor, "model": self.model,
                "weight": self.weight, "start": self.start, "end": self.end, "control_mode": self.control_mode,
                "resize_mode": self.resize_mode, "pixel_perfect": self.pixel_perfect,
                "processor_resolution": self.processor_resolution}


def resize_for(image: Image.Image, width: int, height: int, mode: str) -> Image.Image:
    """`image` at width×height by A1111's resize modes: stretched, cropped to the shape then resized, or resized
    to fit inside and padded with black (nothing, for edge and scribble maps)."""
    image = image.convert("RGB")
    if mode == JUST_RESIZE:
        return image.resize((width, height), Image.Resampling.LANCZOS)
    if mode == CROP_AND_RESIZE:
        return fit_image(image, width, height)
    fitted = ImageOps.contain(image, (width, height), Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (width, height))
    canvas.paste(fitted, ((width - fitted.width) // 2, (height - fitted.height) // 2))
    return canvas


def unit_from_json(values: dict, position: int) -> ControlUnit:
    """A further unit from the API's JSON list: the same names as the first unit's, the image as `image`
    (base64 or a data URL; never a path on the server)."""
    if not isinstance(values, dict):
        raise ValueError(f"`more_units[{position}]` must be an object like {{\"image\": …, \"model\": …}} but is "
                         f"{type(values).__name__}.")
    unknown = set(values) - {"image", "enabled", *UNIT_FIELDS}
    if unknown:
        raise ValueError(f"`more_units[{position}]` has unknown keys {sorted(unknown)}; allowed: image, "
                         f"{', '.join(UNIT_FIELDS)}.")
    if "image" not in values:
        raise ValueError(f"`more_units[{position}]` needs its control `image`.")
    return ControlUnit(**{key: value for key, value in values.items() if key != "enabled"})


def _enabled(values) -> bool:
    return not (isinstance(values, dict) and values.get("enabled") is False)
