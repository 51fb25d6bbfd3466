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


def test_the_decoder_fine_tune_weighs_chroma_and_leaves_grey_alone():
    """recipe/vae_decoder.py's loss: a grey shift costs its squared error alone; a hue shift of the same size
    costs more, through the chroma term."""
    import torch

    from recipe.vae_decoder import chroma, loss_of

    grey = torch.zeros(1, 3, 4, 4)
    assert chroma(grey).abs().max() < 1e-6 and chroma(torch.full((1, 3, 4, 4), 0.5)).abs().max() < 1e-6
    lighter = grey + 0.2                                    # the same shift on every channel: no chroma
    tinted = grey + torch.tensor([0.2, -0.2, 0.2]).view(1, 3, 1, 1)     # towards magenta
    assert torch.isclose(loss_of(lighter, grey, 4.0), torch.tensor(0.04))
    assert loss_of(tinted, grey, 4.0) > loss_of(tinted, grey, 0.0) == loss_of(lighter, grey, 0.0)
