"""recipe/vae_eval.py's measures on pictures of known colours: the hue error is the circular hue distance over the
saturated, lit pixels only, and PSNR is over every pixel."""

from __future__ import annotations

import colorsys
import math

import numpy as np

from recipe.vae_eval import hue_error, psnr


def _picture(hue_degrees: float, *, saturation: float = 0.9, value: float = 0.9) -> np.ndarray:
    r, g, b = colorsys.hsv_to_rgb(hue_degrees / 360, saturation, value)
    image = np.full((1, 8, 8, 3), 255, dtype=np.uint8)          # white around it, as emoji are composited
    image[0, 2:6, 2:6] = np.round(np.array([r, g, b]) * 255)
    return image


def test_the_hue_error_is_the_circular_distance_over_saturated_pixels():
    purple = _picture(280)
    assert hue_error(purple, purple) == 0 and psnr(purple, purple) == math.inf
    assert abs(hue_error(purple, _picture(250)) - 30) < 2            # purple turned blue: 30°
    assert abs(hue_error(_picture(350), _picture(10)) - 20) < 2      # across red: 20°, not 340°
    grey = _picture(280, saturation=0.1)
    assert math.isnan(hue_error(grey, _picture(100, saturation=0.1)))  # nothing saturated to measure
    assert psnr(purple, _picture(250)) < 30
