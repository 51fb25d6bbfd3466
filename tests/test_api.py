"""The public Gradio API as a script sees it: readable parameter names, and every endpoint answering with only
what it cannot do without."""

from __future__ import annotations

import numpy as np
from PIL import Image

from tests.test_server import server  # noqa: F401  (the launched studio, tiny model)


def test_the_forward_process_has_an_endpoint_with_the_plots_numbers(server, tmp_path):  # noqa: F811
    from gradio_client import Client, handle_file

    url, _ = server
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "x0.png")
    client = Client(url, verbose=False)
    parameters = {p["parameter_name"]: p for p in
                  client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/explorer_forward"][
                      "parameters"]}
    assert list(parameters) == ["image", "schedule", "T", "t", "seed"]
    pixel, latent, caption, numbers = client.predict(image=handle_file(str(tmp_path / "x0.png")), schedule="cosine",
                                                     T=100, t=99, api_name="/explorer_forward")
    assert Image.open(pixel).width == Image.open(pixel).height >= 64 and "t = 99" in caption.replace("t=", "t = ")
    curve = numbers["schedules"]["cosine"]
    assert len(curve["betas"]) == len(curve["alphas_cumprod"]) == 100 and numbers["t"] == 99
    abar = curve["alphas_cumprod"][99]
    assert abs(numbers["signal_coefficient"] ** 2 - abar) < 1e-9 and abs(numbers["noise_coefficient"] ** 2 - (1 - abar)) < 1e-9
    assert np.all(np.diff(curve["alphas_cumprod"]) < 0)          # ᾱ_t falls with t
