"""The steps a sampler takes, drawn for the Diffusion Explorer: for one sampler and step count, the noise level
at each model call under each schedule (pipelines/core/schedules.py), overlaid.

Two views of one process. DDPM's: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, abar_t the share of signal
power left. The variance-exploding view the k-diffusion samplers (Euler, Heun, LMS, DPM++) step in:
x_t / sqrt(abar_t) = x_0 + sigma_t eps with sigma_t = sqrt((1 - abar_t) / abar_t), from about 14.6 down to
0.03 for SD's schedule, so it is drawn on a log scale.

Figures are built with `matplotlib.figure.Figure()` directly, so importing this module selects no backend.
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pipelines.core.schedules import ALIGN_YOUR_STEPS, AYS_TABLE_STEPS, ays_family

# What the plot's y axis can show (the schedule table's keys) -> its label in the UI
SIGMA, ALPHA_CUMPROD = "sigmas", "alphas_cumprod"
QUANTITIES = {SIGMA: "σ_t (log scale)", ALPHA_CUMPROD: "ᾱ_t"}


def check_quantity(quantity: str) -> None:
    if quantity not in QUANTITIES:
        raise ValueError(f"Unknown quantity {quantity!r}; valid ones are {', '.join(QUANTITIES)}.")


def sampling_schedule_plot(table: dict[str, dict], *, quantity: str = SIGMA, sampler: str, steps: int) -> Figure:
    """sigma_t (log scale) or abar_t at each of `sampler`'s model calls, one line per schedule in `table`
    (schedules.schedule_table's answer)."""
    check_quantity(quantity)
    if not table:
        raise ValueError("`table` is empty; pass at least one schedule's numbers.")
    figure = Figure(figsize=(8, 3.8), layout="constrained")
    axes = figure.add_subplot()
    for schedule, numbers in table.items():
        values = np.asarray(numbers[quantity])
        axes.plot(np.arange(len(values)), values, marker="o", markersize=3, label=f"{schedule} ({len(values)} calls)")
    if quantity == SIGMA:
        axes.set_yscale("log")
        axes.set_ylabel(r"$\sigma_t = \sqrt{(1-\bar\alpha_t)/\bar\alpha_t}$")
    else:
        axes.set_ylim(0, 1)
        axes.set_ylabel(r"$\bar\alpha_t$")
    axes.set_xlabel("model call")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_title(f"{sampler}, {steps} steps")
    axes.grid(True, which="major", alpha=0.3)
    axes.legend(fontsize="small")
    return figure


def sampling_schedule_caption(table: dict[str, dict], *, quantity: str, sampler: str, steps: int,
                              unet_config=None, prediction_type: str | None = None,
                              left_out: dict[str, str] | None = None) -> str:
    """What the plot shows, which process it is drawn in, and where each schedule comes from."""
    check_quantity(quantity)
    process = ("σ_t = √((1 − ᾱ_t)/ᾱ_t): the variance-exploding view k-diffusion samplers step in, "
               "x_t/√ᾱ_t = x_0 + σ_t ε" if quantity == SIGMA else
               "DDPM's ᾱ_t, the share of signal power left: x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε")
    lines = [(f"**{sampler}**, {steps} steps. y: {process}. Second-order samplers call the model twice a step, "
              "so their timesteps repeat.")]
    for schedule, numbers in table.items():
        timesteps = numbers["timesteps"]
        line = (f"**{schedule}**: t from {timesteps[0]:.0f} to {timesteps[-1]:.0f}, σ from "
                f"{numbers['sigmas'][0]:.3g} to {numbers['sigmas'][-1]:.3g}")
        if "flow_t" in numbers:       # a flow-matching model: its own t, drawn as DDPM's σ and ᾱ of the same SNR
            line = (f"**{schedule}**: flow matching, x_t = (1 − t)·x_0 + t·ε, t from {numbers['flow_t'][0]:.3g} to "
                    f"{numbers['flow_t'][-1]:.3g} (the model's shift applied); drawn as DDPM's σ = t/(1 − t) and "
                    "ᾱ of the same signal-to-noise ratio")
        if schedule == ALIGN_YOUR_STEPS:
            family = ays_family(unet_config)
            line += (f"; NVIDIA's {family} table" + (" as published" if steps == AYS_TABLE_STEPS else
                                                     f" ({AYS_TABLE_STEPS} steps) log-linearly interpolated"))
            if prediction_type == "v_prediction":
                line += " (optimised for SD 1.5's ε-prediction; this model predicts v)"
        lines.append(line)
    lines += [f"**{schedule}** left out: {reason}" for schedule, reason in (left_out or {}).items()]
    return "  \n".join(lines)
