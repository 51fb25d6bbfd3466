"""Speculative sampling for DDPM: the same images as the DDPM sampler from fewer sequential target calls.

After De Bortoli, Galashov, Gretton and Doucet, "Accelerated Diffusion Models via Speculative
Sampling" (ICML 2025). DDPM's reverse step is a Gaussian, x_{n+1} ~ q = N(m_q(x_n), σ_n² I), whose mean
needs one call of the target model (the loaded UNet, with CFG). A round:

1. **Draft.** A cheap draft proposes L steps ahead, each from its own Gaussian p = N(m_p(x̃_k), σ² I)
   with the same variance: x̃_{k+1} = m_p(x̃_k) + σ_k Z_k. The drafts:
   - *frozen target*: reuse the target's last output (its noise prediction; v for a v-prediction model)
     for every drafted step; no model call at all (the paper's frozen drift, in DDPM's ε form);
   - *frozen target x0*: reuse the target's last prediction of the data x̂_0 instead, so that the drafted
     mean still follows the noise each step adds (ε at a new state carries that noise; x̂_0 hardly moves);
   - *draft model*: a small UNet that imitates the target (recipe/draft.py), with the same CFG;
   - *anchored draft model*: the target's last x̂_0 plus the draft model's estimate of how it has moved.
2. **Verify.** The target evaluates all L drafted states in one batched call, giving m_q(x̃_k).
3. **Accept or reflect**, step by step: accept x̃_{k+1} with probability min(1, q(x̃_{k+1}) / p(x̃_{k+1})).
   At the first rejection the next state is the *reflection maximal coupling*'s other half: the
   draft's noise Z reflected across the hyperplane between the two means,

       e = (m_q - m_p) / |m_q - m_p|,    x_{k+1} = m_q + σ (Z - 2 (e·Z) e),

   which is an exact draw from q (the accepted part has density min(p, q), the reflected part
   (q - p)+), and the round ends there. The chain is therefore exactly DDPM's in law, whatever the draft:
   a bad draft only costs target calls. The acceptance probability of one step is 1 - TV(p, q) =
   2 Φ(-|m_p - m_q| / 2σ), the most any coupling of the two Gaussians achieves.

The target's sequential calls per image ("target NFE") are the rounds (plus one call at the start for
the frozen draft, which has nothing to reuse yet); plain DDPM needs one per step. They only save time
where one batched call on L states costs less than L single calls (bench/speculative.py measures it).

The core (`SpeculativeDDPM`) knows nothing of diffusers: it takes the target and the draft as
functions of (states, step positions, chains), so the tests run it on a Gaussian whose exact noise
prediction is known in closed form. `run_speculative` runs it for a prepared studio call.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pipelines.core.ddpm import posterior_coefficients
from pipelines.core.samplers import DEFAULT_DRAFT_LENGTH, MAX_DRAFT_LENGTH

# (states (M, ...), step positions (M,), chain indices (M,)) -> model outputs (M, ...)
ModelFunction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class DDPMTransitions:
    """DDPM's reverse transitions on a (possibly strided) schedule, as DDPMScheduler.step takes them:
    step n goes from timestep t_n to t_{n+1} (or to the data at the last step) with

        x̂_0 = (x - sqrt(1 - abar_t) eps) / sqrt(abar_t)          (eps-prediction; v and x_0 as well)
        mean = sqrt(abar_prev) beta_t / (1 - abar_t) x̂_0 + sqrt(alpha_t) (1 - abar_prev) / (1 - abar_t) x
        sigma² = (1 - abar_prev) / (1 - abar_t) beta_t           ("fixed_small"; 0 at the last step)
    """

    def __init__(self, timesteps, alphas_cumprod: torch.Tensor, previous: list[int], *,
                 prediction_type: str = "epsilon", clip_sample: float | None = None):
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"Speculative sampling does not know prediction type {prediction_type!r}.")
        self.timesteps = [int(t) for t in timesteps]
        self.prediction_type = prediction_type
        self.clip_sample = clip_sample
        abar = alphas_cumprod.double()
        rows = []
        for t, prev in zip(self.timesteps, previous):
            abar_t = float(abar[t])
            abar_prev = float(abar[prev]) if prev >= 0 else 1.0
            coef_x0, coef_xt, variance = posterior_coefficients(abar_t, abar_prev, last=t <= 0)
            rows.append((math.sqrt(abar_t), math.sqrt(1 - abar_t), coef_x0, coef_xt, math.sqrt(variance)))
        table = torch.tensor(rows, dtype=torch.float64)
        self.sqrt_abar, self.sqrt_one_minus_abar, self.coef_x0, self.coef_xt, self.sigma = table.T

    @classmethod
    def from_scheduler(cls, scheduler) -> "DDPMTransitions":
        """From a DDPMScheduler whose `set_timesteps` has run."""
        config = scheduler.config
        if config.get("thresholding"):
            raise ValueError("Speculative sampling does not support dynamic thresholding; use the DDPM sampler.")
        if config.get("variance_type", "fixed_small") not in ("fixed_small", None):
            raise ValueError(f"Speculative sampling needs DDPM's fixed_small variance, not "
                             f"{config.get('variance_type')!r}; use the DDPM sampler.")
        previous = [int(scheduler.previous_timestep(int(t))) for t in scheduler.timesteps]
        return cls(scheduler.timesteps, scheduler.alphas_cumprod, previous,
                   prediction_type=config.get("prediction_type", "epsilon"),
                   clip_sample=float(config.get("clip_sample_range", 1.0)) if config.get("clip_sample") else None)

    def __len__(self) -> int:
        return len(self.timesteps)

    def _column(self, values: torch.Tensor, positions: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return values[positions.cpu()].to(like.device, like.dtype).view(-1, *([1] * (like.dim() - 1)))

    def x0(self, x: torch.Tensor, output: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The model output at (x, t_n) as a prediction of the data x̂_0."""
        a = self._column(self.sqrt_abar, positions, x)
        s = self._column(self.sqrt_one_minus_abar, positions, x)
        if self.prediction_type == "epsilon":
            x0 = (x - s * output) / a
        elif self.prediction_type == "v_prediction":
            x0 = a * x - s * output
        else:
            x0 = output
        return x0.clamp(-self.clip_sample, self.clip_sample) if self.clip_sample is not None else x0

    def mean(self, x: torch.Tensor, output: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.mean_from_x0(x, self.x0(x, output, positions), positions)

    def mean_from_x0(self, x: torch.Tensor, x0: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self._column(self.coef_x0, positions, x) * x0 + self._column(self.coef_xt, positions, x) * x

    def sigmas(self, positions: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return self._column(self.sigma, positions, like)


def reflection_coupling(draft_mean: torch.Tensor, target_mean: torch.Tensor, sigma: float, noise: torch.Tensor,
                        uniform: float) -> tuple[torch.Tensor, bool, float]:
    """Couple p = N(draft_mean, σ² I) and q = N(target_mean, σ² I) through the draft's sample
    draft_mean + σ·noise: accept it with probability min(1, q/p), else reflect the noise across the
    hyperplane between the means. Returns (a draw from q, accepted, the acceptance probability)."""
    if sigma == 0.0:   # point masses: the draft is right only if it is exactly the target
        same = bool(torch.equal(draft_mean, target_mean))
        return target_mean, same, float(same)
    delta = (draft_mean - target_mean).double() / sigma          # Δ = (m_p - m_q) / σ
    z = noise.double()
    # log q(x)/p(x) at x = m_p + σ z:  (|z|² - |z + Δ|²) / 2
    log_ratio = float((z.square().sum() - (z + delta).square().sum()) / 2)
    probability = math.exp(min(0.0, log_ratio))
    if uniform < probability:
        return draft_mean + sigma * noise, True, probability
    norm = float(delta.norm())
    if norm == 0.0:    # cannot happen when the ratio is 1, but keep the reflection well defined
        return draft_mean + sigma * noise, True, 1.0
    e = delta / norm
    reflected = z - 2 * (e * z).sum() * e
    return target_mean + sigma * reflected.to(noise.dtype), False, probability


@dataclass
class Round:
    """One verification round of one chain (what the explorer draws)."""
    start: int                       # the step position the round started from
    drafted: int                     # steps the draft proposed (verified ones, then any thrown away)
    probabilities: list[float]       # acceptance probability of each verified drafted step, in order
    accepted: int                    # drafted steps accepted
    reflected: bool                  # whether the round ended with a reflection (a rejected step)
    target_calls: int                # the chain's target calls so far, this round's included


@dataclass
class ChainStats:
    target_calls: int = 0            # sequential target calls (NFE) for this chain
    draft_calls: int = 0             # sequential draft model calls (0 for the frozen draft)
    proposed: int = 0                # drafted steps verified
    accepted: int = 0                # ... of which accepted
    rounds: list[Round] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


class SpeculativeDDPM:
    """Speculative DDPM over a batch of independent chains (images); one batched target call per round
    serves every chain still running, each at its own step position.

    `target(states, positions, chains)` returns the target's model output (CFG applied); `draft` is the
    draft model's, or None for the frozen-target draft. Chain i draws its noise and its uniforms from
    `generators[i]` (CPU generators), so a seed gives the same image twice.
    """

    def __init__(self, transitions: DDPMTransitions, target: ModelFunction, *, draft: ModelFunction | None = None,
                 draft_length: int = DEFAULT_DRAFT_LENGTH, frozen: str = "eps", anchored: bool = False):
        if not 1 <= draft_length <= MAX_DRAFT_LENGTH:
            raise ValueError(f"`draft_length` must be a whole number from 1 to {MAX_DRAFT_LENGTH} "
                             f"but is {draft_length!r}.")
        self.transitions = transitions
        self.target = target
        self.draft = draft
        self.draft_length = draft_length
        if frozen not in ("eps", "x0"):
            raise ValueError(f"`frozen` must be 'eps' or 'x0' but is {frozen!r}.")
        self.frozen = frozen     # what the frozen-target draft keeps: the noise prediction or x̂_0
        if anchored and draft is None:
            raise ValueError("An anchored draft needs a draft model.")
        # anchored: the draft model proposes only how x̂_0 changes since the target's last prediction:
        #   x̂_0 draft(x) = x̂_0 target(parent) + x̂_0 model(x) - x̂_0 model(parent)
        self.anchored = anchored
        if anchored:
            self.frozen = "x0"

    def sample(self, x: torch.Tensor, generators: list[torch.Generator], *, start: int = 0,
               on_round: Callable[[torch.Tensor, list[int]], bool] | None = None
               ) -> tuple[torch.Tensor, list[ChainStats]]:
        """Run the chains from states `x` (B, ...) at step position `start` to the end of the schedule.
        `on_round(states, positions)` is called after every round; returning False stops early.
        Returns the final states and each chain's statistics."""
        steps = len(self.transitions)
        x = x.clone()
        count = x.shape[0]
        positions = [start] * count
        stats = [ChainStats() for _ in range(count)]
        # the frozen and anchored drafts keep the target's latest output per chain (the output, or its x̂_0);
        # the anchored one also the draft model's x̂_0 at that same state
        last_output = last_model = None
        if (self.draft is None or self.anchored) and start < steps:
            last_output, last_model = self._first_step(x, positions, generators, stats)
        while True:
            live = [i for i in range(count) if positions[i] < steps]
            if not live:
                break
            self._round(x, positions, live, generators, stats, last_output, last_model)
            if on_round is not None and on_round(x, positions) is False:
                break
        return x, stats

    # -- one round -----------------------------------------------------------------------------
    def _first_step(self, x, positions, generators, stats) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The frozen and anchored drafts have nothing to reuse yet: one plain DDPM step with the target (one
        call); the anchored draft also evaluates its model at that first state (one draft call)."""
        chains = torch.arange(x.shape[0])
        n = torch.tensor(positions)
        output = self.target(x, n, chains)
        kept = self._kept(x, output, n)
        model = None
        if self.anchored:
            model = self.transitions.x0(x, self.draft(x, n, chains), n)
            for i in range(x.shape[0]):
                stats[i].draft_calls += 1
        mean = self.transitions.mean(x, output, n)
        sigma = self.transitions.sigmas(n, x)
        noise = torch.stack([torch.randn(x.shape[1:], generator=g, dtype=x.dtype).to(x.device) for g in generators])
        x.copy_(mean + sigma * noise)
        for i in range(x.shape[0]):
            positions[i] += 1
            stats[i].target_calls += 1
        return kept, model

    def _kept(self, x, output, positions) -> torch.Tensor:
        return self.transitions.x0(x, output, positions) if self.frozen == "x0" else output

    def _round(self, x, positions, live, generators, stats, last_output, last_model) -> None:
        steps = len(self.transitions)
        lengths = {i: min(self.draft_length, steps - positions[i]) for i in live}
        # 1. Draft: L steps ahead per chain (the draft model batched over chains, one call per level)
        states = {i: [x[i]] for i in live}
        draft_means: dict[int, list[torch.Tensor]] = {i: [] for i in live}
        noises: dict[int, list[torch.Tensor]] = {i: [] for i in live}
        model_x0: dict[int, list[torch.Tensor]] = {i: [] for i in live}     # anchored: the model's x̂_0
        for k in range(max(lengths.values())):
            rows = [i for i in live if k < lengths[i]]
            current = torch.stack([states[i][k] for i in rows])
            n = torch.tensor([positions[i] + k for i in rows])
            if self.draft is None:
                kept = torch.stack([last_output[i] for i in rows])
                means = self.transitions.mean_from_x0(current, kept, n) if self.frozen == "x0" else \
                    self.transitions.mean(current, kept, n)
            elif self.anchored:
                x0 = self.transitions.x0(current, self.draft(current, n, torch.tensor(rows)), n)
                anchor = torch.stack([last_output[i] - last_model[i] for i in rows])
                means = self.transitions.mean_from_x0(current, anchor + x0, n)
                for row, i in enumerate(rows):
                    model_x0[i].append(x0[row])
                    stats[i].draft_calls += 1
            else:
                means = self.transitions.mean(current, self.draft(current, n, torch.tensor(rows)), n)
                for i in rows:
                    stats[i].draft_calls += 1
            sigmas = self.transitions.sigmas(n, current)
            for row, i in enumerate(rows):
                z = torch.randn(x.shape[1:], generator=generators[i], dtype=x.dtype).to(x.device)
                draft_means[i].append(means[row])
                noises[i].append(z)
                states[i].append(means[row] + sigmas[row] * z)
        # 2. Verify: the target on every drafted state of every chain, in one batched call
        order = [(i, k) for i in live for k in range(lengths[i])]
        verified = torch.stack([states[i][k] for i, k in order])
        n = torch.tensor([positions[i] + k for i, k in order])
        outputs = self.target(verified, n, torch.tensor([i for i, _ in order]))
        target_means = self.transitions.mean(verified, outputs, n)
        kept = self._kept(verified, outputs, n) if last_output is not None else None
        sigmas = self.transitions.sigma[n].tolist()
        # 3. Accept or reflect, step by step, per chain
        row = 0
        for i in live:
            stats[i].target_calls += 1
            probabilities = []
            reflected = False
            for k in range(lengths[i]):
                uniform = float(torch.rand((), generator=generators[i], dtype=torch.float64))
                state, accepted, probability = reflection_coupling(
                    draft_means[i][k], target_means[row + k], sigmas[row + k], noises[i][k], uniform)
                probabilities.append(probability)
                if last_output is not None:
                    last_output[i] = kept[row + k]
                if last_model is not None:
                    last_model[i] = model_x0[i][k]
                if not accepted:
                    x[i] = state
                    reflected = True
                    break
            accepted_steps = len(probabilities) - reflected
            if not reflected:
                x[i] = states[i][lengths[i]]
            positions[i] += len(probabilities)
            stats[i].proposed += len(probabilities)
            stats[i].accepted += accepted_steps
            stats[i].rounds.append(Round(start=positions[i] - len(probabilities), drafted=lengths[i],
                                         probabilities=probabilities,
                                         accepted=accepted_steps, reflected=reflected,
                                         target_calls=stats[i].target_calls))
            row += lengths[i]
