"""What the Explorer tab writes beside its pictures: each process in words, with its equation in LaTeX.

`FORMULAS` explains the forward (noising) process (pipelines/explorer/forward.py), `FORMULAS_REVERSE` the
reverse one (pipelines/explorer/reverse.py); `LATEX_DELIMITERS` tells gr.Markdown where their math is.
"""

from __future__ import annotations

# For gr.Markdown(latex_delimiters=...): display math between $$, inline math between $.
LATEX_DELIMITERS: list[dict] = [
    {"left": "$$", "right": "$$", "display": True},
    {"left": "$", "right": "$", "display": False},
]

FORMULAS: dict[str, str] = {
    "forward_closed_form": (
        "Any noise level can be reached in one jump: the noisy image is a shrunken copy of the "
        "clean image plus Gaussian noise, "
        r"$$q(x_t \mid x_0) = \mathcal{N}\!\left(\sqrt{\bar\alpha_t}\,x_0,\ (1-\bar\alpha_t)\,I\right),"
        r"\qquad \bar\alpha_t = \prod_{s=1}^{t} (1-\beta_s).$$"
    ),
    "markov_step": (
        "Each step shrinks the previous image slightly and adds a little fresh noise, "
        r"$$x_t = \sqrt{1-\beta_t}\,x_{t-1} + \sqrt{\beta_t}\,z, \qquad z \sim \mathcal{N}(0, I).$$"
    ),
    "snr": (
        "The signal-to-noise ratio compares the power of the remaining image to that of the noise, "
        "and falls as $t$ grows, "
        r"$$\mathrm{SNR}(t) = \frac{\bar\alpha_t}{1-\bar\alpha_t}, "
        r"\qquad \log\mathrm{SNR}(t) = \log\bar\alpha_t - \log(1-\bar\alpha_t).$$"
    ),
}

FORMULAS_REVERSE: dict[str, str] = {
    "ddpm_update": (
        "DDPM takes one small step back: it removes the share of noise the model predicts for this step "
        "and then adds a little fresh noise, "
        r"$$x_{t-1} = \frac{1}{\sqrt{\alpha_t}}"
        r"\left(x_t - \frac{\beta_t}{\sqrt{1-\bar\alpha_t}}\,\hat\varepsilon\right)"
        r" + \sigma_t z, \qquad z \sim \mathcal{N}(0, I).$$"
    ),
    "ddim_update": (
        "DDIM jumps deterministically: it rebuilds the next, less noisy image from the predicted clean image "
        "and the predicted noise, mixed at the next noise level, "
        r"$$x_{t-1} = \sqrt{\bar\alpha_{t-1}}\,\hat x_0 + \sqrt{1-\bar\alpha_{t-1}}\,\hat\varepsilon.$$"
    ),
    "x0_from_eps": (
        "Undoing the forward process with the predicted noise gives the model's current guess of the clean "
        "image, "
        r"$$\hat x_0 = \frac{x_t - \sqrt{1-\bar\alpha_t}\,\hat\varepsilon}{\sqrt{\bar\alpha_t}}"
        r"\qquad\left(\text{sigma samplers: } \hat x_0 = x - \sigma\,\hat\varepsilon\right).$$"
    ),
    "cfg": (
        "Classifier-free guidance asks the model twice, with and without the prompt, and pushes the "
        "prediction further in the direction the prompt pulls it, "
        r"$$\hat\varepsilon = \varepsilon_u + w\,(\varepsilon_c - \varepsilon_u),$$"
        r"so $w = 1$ is the plain conditional prediction and needs no second pass."
    ),
}
