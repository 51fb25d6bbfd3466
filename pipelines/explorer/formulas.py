"""What the Explorer tab writes beside its pictures: each process in words, with its equation in LaTeX.

`FORMULAS` explains the forward (noising) processes, DDPM's and flow matching's (pipelines/explorer/forward.py), and
`forward_caption` names the one a schedule runs with its numbers at a step; `FORMULAS_REVERSE` explains the
reverse process (pipelines/explorer/reverse.py); `LATEX_DELIMITERS` tells gr.Markdown where their math is.
"""

from __future__ import annotations

from pipelines.explorer.forward import FLOW_MATCHING, NoiseSchedule

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
    "flow_closed_form": (
        "Flow matching (SD 3, Flux, Sana) slides the image along a straight line to the noise, with the time "
        "$t \\in (0, 1]$ shifted by the model's $s$ towards the noisy end, "
        r"$$x_t = (1-t)\,x_0 + t\,\varepsilon, \qquad t' = \frac{s\,t}{1 + (s-1)\,t}.$$"
        r"It has the SNR of the DDPM process with $\bar\alpha_t = \frac{(1-t)^2}{(1-t)^2 + t^2}$, and is that "
        r"process scaled by $\sqrt{(1-t)^2 + t^2}$: the schedule plots show this $\bar\alpha_t$ for it."
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


def forward_caption(schedule: NoiseSchedule, t: int) -> str:
    """One line naming the process `schedule` runs, with its coefficients at step `t` (an index into the schedule)."""
    signal, noise = schedule.signal[t].item(), schedule.noise[t].item()
    alpha_cumprod = schedule.alphas_cumprod[t].item()
    if schedule.process == FLOW_MATCHING:
        # the process's own t is the noise coefficient; the step index is called "step" so the two are not confused
        return (f"**{schedule.name}**, step {t} of T = {schedule.num_steps}: flow matching: x_t = (1 − t)·x_0 + t·ε "
                f"with t = {noise:.4g}, signal × {signal:.3f}, noise × {noise:.3f} "
                f"(the SNR of DDPM's ᾱ_t = {alpha_cumprod:.4g})")
    return (f"**{schedule.name}**, t = {t} of T = {schedule.num_steps}: ᾱ_t = {alpha_cumprod:.4g}, "
            f"signal × {signal:.3f}, noise × {noise:.3f}")
