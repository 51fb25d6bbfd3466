"""The forward process drawn and counted, for the Diffusion Explorer tab: the values of x_t against their
theoretical density, and the schedules' beta_t, abar_t and log-SNR curves (as figures, and as numbers for the API).
A flow-matching schedule's curves are those of the DDPM process with its SNR (forward.py), and say so.

Figures are built with `matplotlib.figure.Figure()` directly, so importing this module selects no backend.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

from pipelines.explorer.forward import FLOW_MATCHING, NoiseSchedule, check_timestep

# Theoretical densities are mixtures over at most this many pixel values of x_0.
MAX_MIXTURE_COMPONENTS = 2000


def theoretical_marginal_density(
    grid: np.ndarray,
    *,
    x0: torch.Tensor,
    t: int,
    schedule: NoiseSchedule,
    max_components: int = MAX_MIXTURE_COMPONENTS,
    seed: int = 0,
) -> np.ndarray:
    """Density of one value of x_t at `grid`: (1/M) sum_i N(y; signal_t x0_i, noise_t^2) (DDPM: sqrt(abar_t) and
    sqrt(1 - abar_t); flow matching: 1 - t and t).

    The mixture runs over a seeded random subset of at most `max_components` values of x_0.
    """
    t = check_timestep(t, schedule)
    values = x0.detach().flatten().double().cpu().numpy()
    if values.size > max_components:
        values = np.random.default_rng(seed).choice(values, size=max_components, replace=False)
    means = schedule.signal[t].item() * values
    variance = schedule.noise[t].item() ** 2
    squared_distance = (np.asarray(grid, dtype=np.float64)[:, None] - means[None, :]) ** 2
    return np.exp(-squared_distance / (2 * variance)).mean(axis=1) / math.sqrt(2 * math.pi * variance)


def value_histogram(x_t: torch.Tensor, *, t: int, schedule: NoiseSchedule, x0: torch.Tensor) -> Figure:
    """Histogram (density) of the values of x_t against theory.

    Overlays the marginal of q(x_t | x_0) over the pixels (a mixture of N(signal_t x0_i, noise_t^2)) and the
    standard normal N(0, 1) that x_T approaches; the title names the process.
    """
    t = check_timestep(t, schedule)
    values = x_t.detach().flatten().double().cpu().numpy()
    low, high = min(values.min(), -4.0), max(values.max(), 4.0)
    grid = np.linspace(low, high, 1200)

    figure = Figure(figsize=(6, 3.5), layout="constrained")
    axes = figure.add_subplot()
    axes.hist(values, bins=100, range=(low, high), density=True, color="0.7", label="values of $x_t$")
    flow = schedule.process == FLOW_MATCHING
    axes.plot(
        grid,
        theoretical_marginal_density(grid, x0=x0, t=t, schedule=schedule),
        color="C0",
        label=r"theory: mixture of $\mathcal{N}((1-t)\,x_{0,i},\ t^2)$" if flow else
        r"theory: mixture of $\mathcal{N}(\sqrt{\bar\alpha_t}\,x_{0,i},\ 1-\bar\alpha_t)$",
    )
    axes.plot(grid, np.exp(-(grid**2) / 2) / math.sqrt(2 * math.pi), color="C3", linestyle="--",
              label=r"$\mathcal{N}(0, 1)$")
    if flow:
        axes.set_title(f"flow matching, step {t}: t = {schedule.noise[t].item():.4g}")
    else:
        axes.set_title(f"DDPM, t = {t}   " + r"$\bar\alpha_t$" + f" = {schedule.alphas_cumprod[t].item():.4g}")
    axes.set_xlabel("value")
    axes.set_ylabel("density")
    # below the axes, so it never covers the bars
    axes.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=3, frameon=False)
    figure.tight_layout()
    return figure


def schedule_data(schedules: Sequence[NoiseSchedule], *, t: int) -> dict:
    """The schedule plot's numbers, for the API: per schedule its process and beta_t, abar_t and log-SNR over
    t = 0..T-1 (for flow matching those of the DDPM process with its SNR), and the first schedule's process and
    closed-form coefficients at `t` (x_t = signal x_0 + noise eps: sqrt(abar_t) and sqrt(1 - abar_t) for DDPM,
    1 - t and t for flow matching)."""
    first = schedules[0]
    return {"t": t, "T": first.num_steps, "process": first.process, "signal_coefficient": first.signal[t].item(),
            "noise_coefficient": first.noise[t].item(),
            "schedules": {schedule.name: {"process": schedule.process, "betas": schedule.betas.tolist(),
                                          "alphas_cumprod": schedule.alphas_cumprod.tolist(),
                                          "log_snr": schedule.log_snr.tolist()} for schedule in schedules}}


def _curve_label(schedule: NoiseSchedule) -> str:
    """A schedule's name in the legend; a flow-matching one's curves are those of DDPM with its SNR."""
    return schedule.name if schedule.process != FLOW_MATCHING else f"{schedule.name}: as DDPM of the same SNR"


def schedule_plot(schedules: Sequence[NoiseSchedule], *, t: int | None = None) -> Figure:
    """beta_t, abar_t and log-SNR_t of each schedule against t/T, with a marker at the current t.

    The x axis is the fraction (t + 1)/T, so schedules with different T line up. `t` indexes the
    first schedule (the active one). A flow-matching schedule is drawn as the DDPM process with its SNR
    (abar_t = (1 - t)^2 / ((1 - t)^2 + t^2)), and its legend entry says so.
    """
    if len(schedules) == 0:
        raise ValueError("`schedules` is empty; pass at least one NoiseSchedule.")
    if t is not None:
        t = check_timestep(t, schedules[0])

    figure = Figure(figsize=(12, 3.5), layout="constrained")
    beta_axes, alpha_cumprod_axes, log_snr_axes = figure.subplots(1, 3, sharex=True)
    for schedule in schedules:
        fraction = np.arange(1, schedule.num_steps + 1) / schedule.num_steps
        label = _curve_label(schedule)
        beta_axes.plot(fraction, schedule.betas.numpy(), label=label)
        alpha_cumprod_axes.plot(fraction, schedule.alphas_cumprod.numpy(), label=label)
        log_snr_axes.plot(fraction, schedule.log_snr.numpy(), label=label)

    beta_axes.set_yscale("log")  # cosine betas span 1e-5 .. 0.999
    beta_axes.set_title(r"$\beta_t$ (log scale)")
    alpha_cumprod_axes.set_title(r"$\bar\alpha_t = \prod_{s \leq t}(1-\beta_s)$")
    log_snr_axes.set_title(r"$\log\,\mathrm{SNR} = \log\frac{\bar\alpha_t}{1-\bar\alpha_t}$")
    for axes in (beta_axes, alpha_cumprod_axes, log_snr_axes):
        axes.set_xlabel("t / T")
        axes.set_xlim(0, 1)
        if t is not None:
            axes.axvline((t + 1) / schedules[0].num_steps, color="k", linestyle=":", label=f"t = {t}")
    alpha_cumprod_axes.legend(fontsize="small")
    return figure
