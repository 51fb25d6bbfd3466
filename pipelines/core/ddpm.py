"""DDPM's reverse transition, the one formula both the explicit step (pipelines/core/denoiser.py) and
speculative sampling (pipelines/sampling/speculative.py) use."""

from __future__ import annotations

import math

import torch


def posterior_coefficients(alpha_bar: float, alpha_bar_prev: float, *, last: bool) -> tuple[float, float, float]:
    """DDPM's reverse transition q(x_{t-1} | x_t, x̂_0) = N(mu_t, beta~_t I) (Ho et al. 2020, eq. 7):

        mu_t     = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x̂_0 + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t
        beta~_t  = (1 - abar_{t-1}) / (1 - abar_t) beta_t

    where t-1 is the previous timestep of the sampler's (possibly strided) schedule (abar_{t-1} = 1 past the
    last step) and alpha_t = abar_t / abar_{t-1}. Returns (x̂_0's coefficient, x_t's, beta~_t); at the `last`
    step (t = 0) the transition is the point mu_t (variance 0).
    """
    alpha = alpha_bar / alpha_bar_prev
    beta = 1.0 - alpha
    coef_x0 = math.sqrt(alpha_bar_prev) * beta / (1 - alpha_bar)
    coef_xt = math.sqrt(alpha) * (1 - alpha_bar_prev) / (1 - alpha_bar)
    variance = 0.0 if last else max((1 - alpha_bar_prev) / (1 - alpha_bar) * beta, 1e-20)
    return coef_x0, coef_xt, variance


def ddpm_posterior(scheduler, x0_pred: torch.Tensor, x_t: torch.Tensor, t: int) -> tuple[torch.Tensor, float]:
    """`posterior_coefficients` at timestep t of `scheduler`'s schedule, applied: (mu_t, beta~_t)."""
    previous_t = scheduler.previous_timestep(t)
    previous_t = int(previous_t) if not isinstance(previous_t, int) else previous_t
    alpha_bar = float(scheduler.alphas_cumprod[t])
    alpha_bar_prev = float(scheduler.alphas_cumprod[previous_t]) if previous_t >= 0 else 1.0
    coef_x0, coef_xt, variance = posterior_coefficients(alpha_bar, alpha_bar_prev, last=t <= 0)
    return coef_x0 * x0_pred + coef_xt * x_t, variance
