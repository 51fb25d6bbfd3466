"""Flow matching in the Diffusion Explorer's forward panel: the schedule "flow matching" and a flow-matching model's
"model" schedule (pipelines/explorer/forward.py), their figures' numbers (plots.py), the Explorer service beside
DDPM (service.py), and `/explorer_forward` taking schedule="flow matching" (studio/tabs/explorer_forward.py).

Flow matching is x_t = (1 - t) x_0 + t eps at t = (i + 1)/T, shifted by the model: t' = s t / (1 + (s - 1) t)."""

import math

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
from scipy.stats import ks_2samp

from pipelines.explorer.forward import (DDPM, FLOW_MATCHING, NoiseSchedule, draw_samples, empirical_moments,
                                        fixed_noise, flow_schedule, forward_frames, forward_sample, image_to_tensor,
                                        make_schedule, markov_chain, tensor_to_image)
from pipelines.explorer.plots import schedule_data, schedule_plot, theoretical_marginal_density, value_histogram
from pipelines.explorer.service import FORWARD_SIDE_PX, MOMENT_DRAWS, Explorer
from tests.test_explorer_forward import gradient_image

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def flow_times(num_steps: int, shift: float = 1.0) -> torch.Tensor:
    """t_i = (i + 1)/T, shifted as diffusers' FlowMatchEulerDiscreteScheduler shifts its sigmas."""
    times = torch.arange(1, num_steps + 1, dtype=torch.float64) / num_steps
    return shift * times / (1 + (shift - 1) * times)


def config_of(scheduler) -> dict:
    """A scheduler's config as the model manager keeps a loaded model's: its class named in it."""
    return {"_class_name": type(scheduler).__name__, **scheduler.config}


@pytest.fixture(scope="module")
def small_x0() -> torch.Tensor:
    return torch.linspace(-1, 1, 3 * 4 * 4, dtype=torch.float64).reshape(3, 4, 4)


# ----------------------------------------------------------------------------- the schedule and its closed form


@pytest.mark.parametrize("num_steps", [1000, 50])
def test_flow_matching_goes_from_x0_to_pure_noise_on_a_straight_line(num_steps):
    schedule = make_schedule("flow matching", num_steps)
    assert schedule.process == FLOW_MATCHING and schedule.name == "flow matching"
    times = flow_times(num_steps)
    torch.testing.assert_close(schedule.signal, 1 - times, rtol=0, atol=1e-12)
    torch.testing.assert_close(schedule.noise, times, rtol=0, atol=1e-12)

    x0 = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    eps = fixed_noise(x0.shape, seed=2)
    first = forward_sample(x0, t=0, schedule=schedule, noise=eps)
    # one step in: moved 1/T of the way from x_0 to eps
    torch.testing.assert_close(first - x0, (eps - x0) / num_steps, rtol=0, atol=1e-6)
    assert ((first - x0).abs() <= (eps - x0).abs() / num_steps + 1e-6).all()
    # the last step is pure noise, exactly
    assert torch.equal(forward_sample(x0, t=num_steps - 1, schedule=schedule, noise=eps), eps)
    middle = forward_sample(x0, t=num_steps // 2 - 1, schedule=schedule, noise=eps)    # t = 1/2
    torch.testing.assert_close(middle, (x0 + eps) / 2, rtol=0, atol=1e-6)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("num_steps", [1000, 50])
def test_flow_matching_equals_diffusers_scale_noise(shift, num_steps):
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_steps, shift=shift)
    ours = flow_schedule(num_steps, shift=shift)
    x0 = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1
    eps = fixed_noise(x0.shape, seed=4)
    for t in (0, 1, num_steps // 4, num_steps - 2, num_steps - 1):
        # diffusers' sigmas run from noisy to clean: sigma (t + 1)/T (shifted) sits at index T - 1 - t
        timestep = scheduler.timesteps[num_steps - 1 - t]
        assert scheduler.sigmas[num_steps - 1 - t].item() == pytest.approx(flow_times(num_steps, shift)[t].item())
        reference = scheduler.scale_noise(x0, timestep.expand(2), eps)
        torch.testing.assert_close(forward_sample(x0, t=t, schedule=ours, noise=eps), reference, rtol=0, atol=1e-6)
    if shift != 1.0:       # the shift moves every step but the last towards the noise
        assert (ours.noise[:-1] > flow_schedule(num_steps).noise[:-1]).all()


def test_flow_matching_is_ddpm_with_the_same_snr_scaled():
    schedule = flow_schedule(100, shift=2.0)
    times = flow_times(100, 2.0)
    signal_power, noise_power = (1 - times) ** 2, times**2
    torch.testing.assert_close(schedule.alphas_cumprod, signal_power / (signal_power + noise_power), rtol=1e-12,
                               atol=1e-14)
    torch.testing.assert_close(schedule.log_snr[:-1], 2 * torch.log((1 - times[:-1]) / times[:-1]))
    assert schedule.log_snr[-1].item() == -math.inf and schedule.betas[-1].item() == 1.0
    assert ((schedule.betas > 0) & (schedule.betas <= 1)).all() and (schedule.log_snr.diff() < 0).all()
    # x_flow = sqrt(a^2 + s^2) x_vp for the variance-preserving process with these betas
    vp = NoiseSchedule(name="vp", betas=schedule.betas)
    assert vp.process == DDPM
    x0, eps = torch.rand(1, 3, 4, 4, dtype=torch.float64), fixed_noise((1, 3, 4, 4), 5).double()
    for t in (0, 40, 99):
        torch.testing.assert_close(forward_sample(x0, t=t, schedule=schedule, noise=eps),
                                   schedule.scale[t].item() * forward_sample(x0, t=t, schedule=vp, noise=eps))


def test_flow_schedule_refuses_what_it_cannot_be():
    with pytest.raises(ValueError, match="positive number but is 0"):
        flow_schedule(10, shift=0)
    with pytest.raises(ValueError, match=r"\[2, 4000\] but is 1"):
        flow_schedule(1)
    with pytest.raises(ValueError, match="only used by"):
        make_schedule("flow matching", scheduler_config={"shift": 3.0})
    with pytest.raises(ValueError, match=r"shape of `betas` \(2,\)"):
        NoiseSchedule(name="bad", betas=torch.tensor([0.1, 0.2], dtype=torch.float64),
                      scale=torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="positive and finite"):
        NoiseSchedule(name="bad", betas=torch.tensor([0.1, 0.2], dtype=torch.float64),
                      scale=torch.tensor([1.0, 0.0], dtype=torch.float64))


# ----------------------------------------------------------------------------- a flow-matching model's schedule


def test_model_schedule_of_a_flow_matching_config_has_its_shift():
    sd3 = make_schedule("model", scheduler_config=config_of(FlowMatchEulerDiscreteScheduler(shift=3.0)))
    assert sd3.name == "model (flow matching, shift 3)" and sd3.num_steps == 1000
    torch.testing.assert_close(sd3.noise, flow_times(1000, 3.0), rtol=0, atol=1e-12)
    # T given explicitly overrides num_train_timesteps; the shift stays
    torch.testing.assert_close(make_schedule("model", 50, scheduler_config=config_of(
        FlowMatchEulerDiscreteScheduler(shift=3.0))).noise, flow_times(50, 3.0), rtol=0, atol=1e-12)
    # Sana's: DPM-Solver on flow sigmas, its shift named `flow_shift`
    sana = make_schedule("model", 100, scheduler_config=config_of(DPMSolverMultistepScheduler(
        use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=4.0)))
    assert sana.name == "model (flow matching, shift 4)"
    torch.testing.assert_close(sana.noise, flow_times(100, 4.0), rtol=0, atol=1e-12)
    # Flux's: shifted by the image size at sampling time, so shown unshifted and named so
    flux = make_schedule("model", 100, scheduler_config=config_of(FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True)))
    assert flux.process == FLOW_MATCHING and "shift from the image size" in flux.name and "unshifted" in flux.name
    torch.testing.assert_close(flux.noise, flow_times(100), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- the Markov chain and the moments


def test_flow_markov_chain_first_step_is_the_straight_line():
    schedule = flow_schedule(50, shift=3.0)
    x0 = torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(1, 3, 2, 2)
    x_first = markov_chain(x0, t=0, schedule=schedule, generator=torch.Generator().manual_seed(5))
    z = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    time = flow_times(50, 3.0)[0].item()
    torch.testing.assert_close(x_first, (1 - time) * x0 + time * z)


@pytest.mark.parametrize("method", ["closed_form", "markov_chain"])
@pytest.mark.parametrize("t", [4, 30, 49])
def test_flow_moments_are_one_minus_t_x0_and_t_squared(small_x0, method, t):
    schedule = flow_schedule(50)
    n_draws = 4000
    mean, variance = empirical_moments(small_x0, t=t, schedule=schedule, n_draws=n_draws, seed=t, method=method)
    time = (t + 1) / 50
    mean_tolerance = 5 * math.sqrt(time**2 / n_draws)
    variance_tolerance = 5 * time**2 * math.sqrt(2 / (n_draws - 1))
    assert (mean - (1 - time) * small_x0).abs().max().item() < mean_tolerance
    assert (variance - time**2).abs().max().item() < variance_tolerance


def test_flow_markov_chain_agrees_with_the_closed_form_in_distribution(small_x0):
    schedule = flow_schedule(50, shift=3.0)
    chain = draw_samples(small_x0, t=20, schedule=schedule, n_draws=4000, seed=11, method="markov_chain")
    closed = draw_samples(small_x0, t=20, schedule=schedule, n_draws=4000, seed=12)
    assert ks_2samp(chain.flatten().numpy(), closed.flatten().numpy()).pvalue > 1e-3
    # and the test has power: DDPM's chain at the same step (unscaled) is told apart
    unscaled = draw_samples(small_x0, t=20, schedule=NoiseSchedule(name="vp", betas=schedule.betas), n_draws=4000,
                            seed=13, method="markov_chain")
    assert ks_2samp(unscaled.flatten().numpy(), closed.flatten().numpy()).pvalue < 1e-3


# ----------------------------------------------------------------------------- figures and numbers


def test_flow_density_histogram_and_plot_use_its_coefficients():
    x0 = image_to_tensor(gradient_image(32, 32))
    schedule = flow_schedule(100)
    grid = np.linspace(-6, 6, 4001)
    density = theoretical_marginal_density(grid, x0=x0, t=99, schedule=schedule)
    assert np.abs(density - np.exp(-(grid**2) / 2) / math.sqrt(2 * math.pi)).max() < 1e-9    # t = 1: N(0, 1)
    x_t = forward_sample(x0, t=29, schedule=schedule, noise=fixed_noise(x0.shape, 0))
    (axes,) = value_histogram(x_t, t=29, schedule=schedule, x0=x0).axes
    theory = axes.get_lines()[0]
    heights = np.array([bar.get_height() for bar in axes.patches])
    centres = np.array([bar.get_x() + bar.get_width() / 2 for bar in axes.patches])
    assert np.abs(heights - np.interp(centres, *theory.get_data())).max() < 0.15
    assert axes.get_title().startswith("flow matching, step 29: t = 0.3") and "(1-t)" in theory.get_label()

    figure = schedule_plot([make_schedule("linear", 100), schedule], t=29)
    labels = [text.get_text() for text in figure.axes[1].get_legend().get_texts()]
    assert labels[:2] == ["linear", "flow matching: as DDPM of the same SNR"]


def test_schedule_data_gives_flow_coefficients_one_minus_t_and_t():
    schedules = [flow_schedule(100, shift=3.0), make_schedule("linear", 100)]
    numbers = schedule_data(schedules, t=24)
    time = flow_times(100, 3.0)[24].item()
    assert numbers["process"] == FLOW_MATCHING and numbers["t"] == 24 and numbers["T"] == 100
    assert numbers["signal_coefficient"] == pytest.approx(1 - time, abs=1e-12)
    assert numbers["noise_coefficient"] == pytest.approx(time, abs=1e-12)
    assert numbers["schedules"]["linear"]["process"] == DDPM
    abar = numbers["schedules"]["flow matching"]["alphas_cumprod"][24]     # DDPM's with the same SNR
    assert abar == pytest.approx((1 - time) ** 2 / ((1 - time) ** 2 + time**2))
    # DDPM's numbers as before
    ddpm = schedule_data(schedules[1:], t=24)
    assert ddpm["signal_coefficient"] ** 2 == pytest.approx(schedules[1].alphas_cumprod[24].item(), rel=1e-12)


# ----------------------------------------------------------------------------- the Explorer service


def test_forward_view_shows_flow_matching_beside_ddpm(studio):
    image = gradient_image(64, 48)
    explorer = Explorer(studio.models)
    view = explorer.forward_view(image, schedule_names=["flow matching", "linear"], num_steps=1000, t=250, seed=3)
    x0 = image_to_tensor(image, size=FORWARD_SIDE_PX)
    eps = fixed_noise(x0.shape, 3)
    flow = forward_sample(x0, t=250, schedule=make_schedule("flow matching"), noise=eps)
    ddpm = forward_sample(x0, t=250, schedule=make_schedule("linear"), noise=eps)
    torch.testing.assert_close(flow, 0.749 * x0 + 0.251 * eps, rtol=0, atol=1e-6)
    assert view.process == FLOW_MATCHING and np.array_equal(np.asarray(view.x_t), np.asarray(tensor_to_image(flow)))
    assert view.beside is not None and view.beside.process == DDPM and view.beside.schedule_name == "linear"
    assert np.array_equal(np.asarray(view.beside.x_t), np.asarray(tensor_to_image(ddpm)))
    assert view.caption.startswith("**flow matching**, step 250 of T = 1000: flow matching: "
                                   "x_t = (1 − t)·x_0 + t·ε with t = 0.251, signal × 0.749, noise × 0.251")
    assert "Beside it (pixel space, the same ε): **linear**, t = 250 of T = 1000: ᾱ_t = " in view.caption
    assert view.histogram.axes[0].get_title().startswith("flow matching")

    # DDPM first: flow matching beside it; two DDPM schedules: nothing beside
    swapped = explorer.forward_view(image, schedule_names=["linear", "cosine", "flow matching"], num_steps=1000,
                                    t=250, seed=3)
    assert swapped.process == DDPM and swapped.beside.process == FLOW_MATCHING
    assert swapped.caption.startswith("**linear**, t = 250 of T = 1000: ᾱ_t = ")
    assert explorer.forward_view(image, schedule_names=["linear", "cosine"], num_steps=1000, t=250,
                                 seed=3).beside is None


def test_markov_check_of_flow_matching_has_theory_one_minus_t_and_t_squared(studio):
    check = Explorer(studio.models).markov_check(gradient_image(64, 64), schedule_names=["flow matching"],
                                                 num_steps=100, t=59, seed=5)
    assert check.process == FLOW_MATCHING
    assert check.signal == pytest.approx(0.4, abs=1e-12) and check.noise == pytest.approx(0.6, abs=1e-12)
    assert check.theory_variance == pytest.approx(0.36)
    for moments in (check.closed_form, check.markov_chain):
        assert moments.variance == pytest.approx(0.36, rel=0.05)
        assert moments.mean_error < 3 * math.sqrt(0.36 / MOMENT_DRAWS)


@pytest.fixture(scope="module")
def sd3_models(tmp_path_factory, worker):
    """A model manager with a tiny SD 3 loaded from its folder, its scheduler shifted by 3 as SD 3's is."""
    from pipelines.models.manager import ModelManager
    from pipelines.models.memory import MemoryManager
    from recipe.tiny import build_tiny_sd3_pipeline

    root = tmp_path_factory.mktemp("sd3")
    pipeline = build_tiny_sd3_pipeline(root / "build")
    pipeline.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipeline.save_pretrained(root / "models" / "sd3")
    models = ModelManager(MemoryManager(device="cpu"), worker=worker, models_dir=root / "models")
    models.load(str(root / "models" / "sd3"))
    return models


def test_with_a_flow_matching_model_model_is_its_shifted_flow(sd3_models):
    explorer = Explorer(sd3_models)
    (schedule,) = explorer.schedules(["model"], 100)
    assert schedule.name == "model (flow matching, shift 3)"
    torch.testing.assert_close(schedule.noise, flow_times(100, 3.0), rtol=0, atol=1e-12)

    image = gradient_image(64, 64)
    view = explorer.forward_view(image, schedule_names=["model", "scaled_linear"], num_steps=100, t=24, seed=1)
    time = flow_times(100, 3.0)[24].item()
    assert view.process == FLOW_MATCHING and view.beside.process == DDPM
    assert view.caption.startswith(f"**model (flow matching, shift 3)**, step 24 of T = 100: flow matching: "
                                   f"x_t = (1 − t)·x_0 + t·ε with t = {time:.4g}")
    # the latent view: the same flow on SD 3's 16-channel latents, decoded by its VAE
    side = sd3_models.current.native_side
    latent_expected = sd3_models.worker.call(
        forward_frames, image_to_tensor(image, size=side), schedule=schedule, timesteps=[24], seed=1,
        vae=sd3_models.current.pipeline.vae)[0]
    assert np.array_equal(np.asarray(view.latent_x_t), np.asarray(latent_expected))


# ----------------------------------------------------------------------------- the page and the view

def test_the_forward_page_and_view_take_flow_matching_and_give_its_coefficients(studio):
    import gradio as gr

    from studio.tabs.explorer_forward import forward_handler, layout_forward, wire_forward

    explorer = Explorer(studio.models)
    with gr.Blocks():
        tab = layout_forward()
        wire_forward(explorer, tab)
    # the page: each picture labelled with its process, flow matching's beside DDPM's when both are ticked
    shown = forward_handler(explorer, tab)(gradient_image(64, 64), schedule_names=["linear", "flow matching"],
                                           num_steps=100, t=29, seed=0)
    assert shown[tab.pixel]["label"] == "x_t in pixel space: DDPM"
    assert shown[tab.beside]["visible"] and shown[tab.beside]["label"] == "x_t in pixel space: flow matching"
    assert "flow matching: x_t = (1 − t)·x_0 + t·ε with t = 0.3" in shown[tab.caption]
    alone = forward_handler(explorer, tab)(gradient_image(64, 64), schedule_names=["cosine"], num_steps=100, t=29,
                                           seed=0)
    assert not alone[tab.beside]["visible"]
    # the endpoint's own answer (through the API on the launched studio: tests/test_api.py)
    from pipelines.explorer.plots import schedule_data

    view = explorer.forward_view(gradient_image(64, 64), schedule_names=["flow matching"], num_steps=100, t=29, seed=0)
    caption, numbers = view.caption, schedule_data(explorer.schedules(["flow matching"], 100), t=29)
    assert caption.startswith("**flow matching**, step 29 of T = 100: flow matching: x_t = (1 − t)·x_0 + t·ε "
                              "with t = 0.3")
    assert numbers["process"] == FLOW_MATCHING
    assert numbers["signal_coefficient"] == pytest.approx(0.7, abs=1e-12)
    assert numbers["noise_coefficient"] == pytest.approx(0.3, abs=1e-12)
