"""Speculative sampling's exactness, on a toy where the answer is known in closed form.

Data x_0 ~ N(mu, diag(s²)): the exact noise prediction is affine in x_t, so DDPM's chain is a
linear-Gaussian one and the law of its output is N(m, diag(v)) with m and v computed exactly by
pushing mean and variance through the transitions. Speculative sampling with a deliberately wrong
draft must give that same law; the draft alone must not (which shows the test can fail).

The statistical check: per coordinate a z-score for the mean and for the variance, and one for each
covariance, all against the exact law; |z| < 4.5 for each of the 14 (Bonferroni: a false alarm
probability below 1e-4 for a correct sampler). Every draw is seeded, so a run cannot flake.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from pipelines.speculative import DDPMTransitions, SpeculativeDDPM, reflection_coupling

MU = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
S = torch.tensor([0.5, 1.0, 0.2, 2.0], dtype=torch.float64)
Z_LIMIT = 4.5


def toy_transitions(steps: int = 20) -> DDPMTransitions:
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False)
    scheduler.set_timesteps(steps)
    return DDPMTransitions.from_scheduler(scheduler)


def exact_eps(transitions: DDPMTransitions):
    def eps(x: torch.Tensor, positions: torch.Tensor, chains: torch.Tensor) -> torch.Tensor:
        a = transitions.sqrt_abar[positions].view(-1, 1)
        s = transitions.sqrt_one_minus_abar[positions].view(-1, 1)
        return s * (x - a * MU) / (a ** 2 * S ** 2 + s ** 2)
    return eps


def wrong_eps(transitions: DDPMTransitions):
    exact = exact_eps(transitions)
    return lambda x, positions, chains: 1.3 * exact(x, positions, chains) + 0.3


def exact_law(transitions: DDPMTransitions) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance per coordinate of plain DDPM's output with the exact noise prediction."""
    mean, var = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    eps = exact_eps(transitions)
    for n in range(len(transitions)):
        position = torch.tensor([n])
        # the transition's mean is affine in x: slope from two points
        at_zero = transitions.mean(torch.zeros(1, 4, dtype=torch.float64), eps(torch.zeros(1, 4, dtype=torch.float64),
                                   position, position), position)[0]
        at_one = transitions.mean(torch.ones(1, 4, dtype=torch.float64), eps(torch.ones(1, 4, dtype=torch.float64),
                                  position, position), position)[0]
        slope = at_one - at_zero
        mean = slope * mean + at_zero
        var = slope ** 2 * var + float(transitions.sigma[n]) ** 2
    return mean, var


def z_scores(samples: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> list[float]:
    n = samples.shape[0]
    sample_mean = samples.mean(0)
    centred = samples - mean
    sample_var = centred.square().mean(0)
    scores = ((sample_mean - mean) / (var / n).sqrt()).tolist()
    scores += ((sample_var - var) / (var * math.sqrt(2 / n))).tolist()
    for i in range(4):
        for j in range(i + 1, 4):
            covariance = (centred[:, i] * centred[:, j]).mean()
            scores.append(float(covariance / (var[i] * var[j] / n).sqrt()))
    return scores


def run_chains(sampler: SpeculativeDDPM, count: int, seed: int):
    generators = [torch.Generator().manual_seed(seed * 100_000 + i) for i in range(count)]
    x = torch.stack([torch.randn(4, generator=g, dtype=torch.float64) for g in generators])
    return sampler.sample(x, generators)


def plain_ddpm(transitions: DDPMTransitions, eps, count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(count, 4, generator=generator, dtype=torch.float64)
    for n in range(len(transitions)):
        positions = torch.full((count,), n)
        mean = transitions.mean(x, eps(x, positions, positions), positions)
        x = mean + transitions.sigmas(positions, x) * torch.randn(count, 4, generator=generator, dtype=torch.float64)
    return x


@pytest.mark.parametrize("draft", ["wrong model", "frozen target"])
def test_speculative_samples_have_plain_ddpm_law(draft):
    transitions = toy_transitions()
    mean, var = exact_law(transitions)
    # the exact law really is plain DDPM's: a direct simulation agrees with it
    assert max(abs(z) for z in z_scores(plain_ddpm(transitions, exact_eps(transitions), 4000, 1), mean, var)) < Z_LIMIT
    sampler = SpeculativeDDPM(transitions, exact_eps(transitions), draft_length=4,
                              draft=wrong_eps(transitions) if draft == "wrong model" else None)
    samples, stats = run_chains(sampler, 3000, seed=2)
    scores = z_scores(samples, mean, var)
    assert max(abs(z) for z in scores) < Z_LIMIT, scores
    # not vacuous: drafts were both accepted and rejected, and fewer target calls than steps
    rate = sum(s.accepted for s in stats) / sum(s.proposed for s in stats)
    assert 0.1 < rate < 0.97
    assert sum(s.target_calls for s in stats) / len(stats) < len(transitions)


def test_the_statistical_check_catches_a_wrong_sampler():
    transitions = toy_transitions()
    mean, var = exact_law(transitions)
    samples = plain_ddpm(transitions, wrong_eps(transitions), 3000, 3)   # the draft alone
    assert max(abs(z) for z in z_scores(samples, mean, var)) > 3 * Z_LIMIT


def test_acceptance_rate_is_one_minus_total_variation():
    generator = torch.Generator().manual_seed(5)
    draft_mean = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64)
    target_mean = torch.tensor([-0.4, 0.6, 0.1], dtype=torch.float64)
    sigma = 0.7
    delta = float((draft_mean - target_mean).norm()) / sigma
    expected = 2 * 0.5 * math.erfc(delta / 2 / math.sqrt(2))      # 1 - TV = 2 Φ(-δ/2)
    count = 20000
    draws, accepted = [], 0
    for _ in range(count):
        noise = torch.randn(3, generator=generator, dtype=torch.float64)
        uniform = float(torch.rand((), generator=generator, dtype=torch.float64))
        state, ok, _ = reflection_coupling(draft_mean, target_mean, sigma, noise, uniform)
        draws.append(state)
        accepted += ok
    rate = accepted / count
    assert abs(rate - expected) < 5 * math.sqrt(expected * (1 - expected) / count), (rate, expected)
    draws = torch.stack(draws)
    # what comes out is the target's Gaussian, accepted or reflected
    assert ((draws.mean(0) - target_mean).abs() < 5 * sigma / math.sqrt(count)).all()
    assert ((draws.var(0) / sigma ** 2 - 1).abs() < 5 * math.sqrt(2 / count)).all()


def test_same_seed_same_samples_and_counted_target_calls():
    transitions = toy_transitions(30)
    calls = []

    def target(x, positions, chains):
        calls.append(len(x))
        return exact_eps(transitions)(x, positions, chains)

    sampler = SpeculativeDDPM(transitions, target, draft=wrong_eps(transitions), draft_length=5)
    first, stats = run_chains(sampler, 1, seed=7)
    calls_first = list(calls)
    second, _ = run_chains(sampler, 1, seed=7)
    assert torch.equal(first, second)
    assert stats[0].target_calls == len(calls_first)        # every target call is counted, once
    assert stats[0].target_calls == len(stats[0].rounds)
    # each round verifies at most L states and advances by its verified steps
    assert all(1 <= n <= 5 for n in calls_first)
    assert sum(len(r.probabilities) for r in stats[0].rounds) == len(transitions)
    # the draft drafts L steps ahead each round (fewer at the end), used or not
    assert stats[0].draft_calls == sum(min(5, len(transitions) - r.start) for r in stats[0].rounds)
