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

from pipelines.sampling.speculative import DDPMTransitions, SpeculativeDDPM, reflection_coupling

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


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("clip_sample", [False, True])
@pytest.mark.parametrize("spacing, offset", [("leading", 1), ("trailing", 0), ("linspace", 0)])
def test_transitions_are_diffusers_ddpm_steps(prediction_type, clip_sample, spacing, offset):
    """The Gaussian the sampler couples is DDPMScheduler.step's: its mean plus sigma times the same noise."""
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, prediction_type=prediction_type, clip_sample=clip_sample,
                              timestep_spacing=spacing, steps_offset=offset)
    scheduler.set_timesteps(10)
    transitions = DDPMTransitions.from_scheduler(scheduler)
    generator = torch.Generator().manual_seed(0)
    for n, t in enumerate(scheduler.timesteps):
        x, output = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
        expected = scheduler.step(output, t, x, generator=torch.Generator().manual_seed(n)).prev_sample
        noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(n))
        positions = torch.full((2,), n)
        ours = transitions.mean(x, output, positions) + transitions.sigmas(positions, x) * noise
        assert torch.allclose(ours, expected, atol=1e-5), (n, int(t))
        assert math.isclose(float(transitions.sigma[n]), float(scheduler._get_variance(t)) ** 0.5 if t > 0 else 0.0,
                            rel_tol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("draft", ["wrong model", "frozen target", "frozen target x0", "anchored wrong model"])
def test_speculative_samples_have_plain_ddpm_law(draft):
    transitions = toy_transitions()
    mean, var = exact_law(transitions)
    # the exact law really is plain DDPM's: a direct simulation agrees with it
    assert max(abs(z) for z in z_scores(plain_ddpm(transitions, exact_eps(transitions), 4000, 1), mean, var)) < Z_LIMIT
    sampler = SpeculativeDDPM(transitions, exact_eps(transitions), draft_length=4,
                              draft=wrong_eps(transitions) if "wrong model" in draft else None,
                              frozen="x0" if draft == "frozen target x0" else "eps", anchored=draft.startswith("anchored"))
    samples, stats = run_chains(sampler, 2000, seed=2)
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
    assert stats[0].draft_calls == sum(r.drafted for r in stats[0].rounds)
    assert all(r.drafted == min(5, len(transitions) - r.start) for r in stats[0].rounds)


# ----------------------------------------------------------------------------- in the studio (tiny model)


def speculative_request(**overrides):
    from pipelines.tasks.txt2img import Txt2ImgRequest
    values = dict(prompt="red apple", seed=1234, steps=12, width=64, height=64, guidance_scale=5.0,
                  sampler="DDPM speculative", draft_length=4)
    values.update(overrides)
    return Txt2ImgRequest(**values)


def counting_unet_calls(unet):
    calls = []
    handle = unet.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    return calls, handle


@pytest.mark.parametrize("draft", ["frozen target", "frozen target x0"])
def test_studio_run_counts_its_target_calls_and_records_them(studio, draft):
    from pipelines.io.metadata import infotext_to_settings, parse_infotext

    calls, handle = counting_unet_calls(studio.models.current.pipeline.unet)
    try:
        done = studio.generate(speculative_request(draft=draft))
    finally:
        handle.remove()
    image = done.images[0]
    _, _, parameters = parse_infotext(image.infotext)
    assert int(parameters["Target calls"]) == len(calls)          # every UNet call is a counted target call
    assert all(batch <= 2 * 4 for batch in calls)                  # L states with CFG in one call
    assert parameters["Draft"] == draft and parameters["Draft length"] == "4"
    assert 0.0 <= float(parameters["Draft acceptance"]) <= 1.0
    assert any("DDPM speculative" in message and "target calls" in message for message in done.messages)
    settings = infotext_to_settings(parameters)                   # PNG Info restores the sampler's settings
    assert settings["sampler"] == "DDPM speculative" and settings["draft"] == draft and settings["draft_length"] == 4
    assert image.path is not None and image.finished


def test_studio_same_seed_same_image_other_seed_not(studio):
    import numpy as np
    first = np.asarray(studio.generate(speculative_request()).images[0].image, dtype=np.float32)
    torch.manual_seed(99)        # the global RNG must not matter
    again = np.asarray(studio.generate(speculative_request()).images[0].image, dtype=np.float32)
    other = np.asarray(studio.generate(speculative_request(seed=1235)).images[0].image, dtype=np.float32)
    assert np.array_equal(first, again)
    assert np.abs(first - other).mean() > 1.0


def test_a_draft_model_that_is_the_target_is_always_accepted(studio, tmp_path):
    """The draft slot holds a UNet; one identical to the target proposes the target's own steps, so every
    drafted step but the deterministic last one is accepted and the run needs ceil(steps / L) calls."""
    from pipelines.io.metadata import parse_infotext

    folder = tmp_path / "models" / "draft"
    studio.models.current.pipeline.unet.save_pretrained(folder)
    studio.models.load(str(folder), slot="draft")
    done = studio.generate(speculative_request(draft="draft model", steps=12, draft_length=4))
    _, _, parameters = parse_infotext(done.images[0].infotext)
    assert int(parameters["Target calls"]) == 3
    assert float(parameters["Draft acceptance"]) >= 11 / 12 - 1e-9


def test_a_draft_that_does_not_fit_the_model_is_refused_naming_the_mismatch(studio, tmp_path):
    from diffusers import UNet2DConditionModel

    folder = tmp_path / "models" / "other-draft"
    UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
                         norm_num_groups=8).save_pretrained(folder)
    studio.models.load(str(folder), slot="draft")
    with pytest.raises(ValueError, match="cross_attention_dim is 64, the model's is 32"):
        studio.generate(speculative_request(draft="draft model"))
    studio.models.unload("draft")
    with pytest.raises(ValueError, match="needs a draft UNet.*frozen target"):
        studio.generate(speculative_request(draft="draft model"))


def test_other_tasks_and_bad_settings_get_clear_errors(studio):
    from PIL import Image

    from pipelines.tasks.img2img import Img2ImgRequest
    with pytest.raises(ValueError, match="Text-to-Image only; use DDPM"):
        studio.generate(Img2ImgRequest(prompt="x", sampler="DDPM speculative", init_image=Image.new("RGB", (64, 64)),
                                       steps=8, width=64, height=64))
    with pytest.raises(ValueError, match="`draft_length` must be a whole number from 1 to 16 but is 0"):
        speculative_request(draft_length=0)
    with pytest.raises(ValueError, match="`draft` must be one of"):
        speculative_request(draft="oracle")


def test_stop_ends_the_run_at_the_next_round(studio, monkeypatch):
    import threading

    from pipelines.sampling.speculative import SpeculativeDDPM
    stop = threading.Event()
    rounds = []
    original = SpeculativeDDPM._round

    def round_then_stop(self, *args):   # Stop pressed during the second round
        original(self, *args)
        rounds.append(1)
        if len(rounds) == 2:
            stop.set()
    monkeypatch.setattr(SpeculativeDDPM, "_round", round_then_stop)
    done = studio.submit(speculative_request(steps=40), stop=stop).result()
    assert done.stopped and not done.images[0].finished and len(rounds) == 2
    assert 2 <= done.images[0].steps_done < 40


def test_verification_rows_are_the_guided_predictions_of_their_images(studio):
    """predict_rows (one call: several images' states at several timesteps) agrees with the plain step's
    prediction for each row, CFG pairing included."""
    from pipelines.core.call import prepare
    from pipelines.core.denoiser import Denoiser

    worker = studio.models.worker
    call = worker.call(prepare, studio.models, speculative_request(batch_size=3))
    denoiser = worker.call(Denoiser, call)
    x = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    rows = torch.tensor([2, 0, 1, 2])
    timesteps = torch.tensor([901, 501, 301, 101])
    together = worker.call(denoiser.predict_rows, x[rows], timesteps, rows)
    for j in range(len(rows)):
        alone = worker.call(denoiser.predict, x, int(timesteps[j])).eps_guided[int(rows[j])]
        assert torch.allclose(together[j], alone, atol=1e-4)


def test_explorer_view_accounts_for_every_step(studio):
    from pipelines.explorer.service import Explorer

    view = Explorer(studio.models).speculative(speculative_request(steps=20, draft_length=5)).result()
    verified = [round_.start + len(round_.probabilities) for round_ in view.chain.rounds]
    assert verified[-1] == 20 and verified == sorted(verified)
    assert len(view.rows) == len(view.chain.rounds) == len(view.round_images)
    assert view.rows[-1][6] == view.chain.target_calls and view.rows[-1][7] == 20
    assert view.timeline.size[0] > 400 and "target calls" in view.summary


def test_an_anchored_draft_that_is_the_target_is_always_accepted():
    """Anchored to the target's own x̂_0, a draft model equal to the target proposes exactly the target's
    steps: everything is accepted (the deterministic last step when the means agree to the bit), and the
    draft is called once per drafted state plus once at the first state."""
    transitions = toy_transitions(20)
    exact = exact_eps(transitions)
    sampler = SpeculativeDDPM(transitions, exact, draft=exact, draft_length=4, anchored=True)
    _, stats = run_chains(sampler, 3, seed=11)
    for chain in stats:
        assert chain.accepted >= chain.proposed - 1 and chain.proposed == 19
        assert chain.draft_calls == sum(r.drafted for r in chain.rounds) + 1
        assert chain.target_calls == 1 + math.ceil(19 / 4)
