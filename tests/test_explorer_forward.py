"""Tests for the forward-process math of the Diffusion Explorer (pipelines/explorer/forward.py, its figures in
plots.py and animations in animation.py) and the Explorer service's forward operations
(pipelines/explorer/service.py)."""

import math

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler
from PIL import Image
from scipy.stats import ks_2samp

from pipelines.core.vae import decode, encode
from pipelines.explorer import forward as explorer_forward
from pipelines.explorer.animation import export_animation
from pipelines.explorer.formulas import FORMULAS
from pipelines.explorer.forward import (SCHEDULE_NAMES, FixedNoise, NoiseSchedule, animation_timesteps, draw_samples,
                                        empirical_moments, fixed_noise, forward_frames, forward_sample, image_to_tensor,
                                        make_schedule, markov_chain, tensor_to_image)
from pipelines.explorer.plots import schedule_plot, theoretical_marginal_density, value_histogram
from pipelines.explorer.service import ANIMATION_FRAMES, FORWARD_SIDE_PX, MOMENT_DRAWS, MOMENT_SIDE_PX, Explorer

DIFFUSERS_ARGS = {
    "linear": {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
    "scaled_linear": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    "cosine": {"beta_schedule": "squaredcos_cap_v2"},
}


@pytest.fixture(scope="module")
def small_x0() -> torch.Tensor:
    """A tiny 'image' in [-1, 1] with distinct pixel values, float64 for statistics."""
    return torch.linspace(-1, 1, 3 * 4 * 4, dtype=torch.float64).reshape(3, 4, 4)


@pytest.fixture(scope="module")
def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=0.5,
    )
    return vae.eval()


def gradient_image(width: int, height: int) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    rgb = np.stack([x + 0 * y, y + 0 * x, (x + y) / 2], axis=-1).round().astype(np.uint8)
    return Image.fromarray(rgb, mode="RGB")


# ----------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("num_steps", [1000, 50])
@pytest.mark.parametrize("name", ["linear", "scaled_linear", "cosine"])
def test_schedule_betas_match_diffusers(name, num_steps):
    schedule = make_schedule(name, num_steps)
    reference = DDPMScheduler(num_train_timesteps=num_steps, **DIFFUSERS_ARGS[name])

    assert schedule.betas.dtype == torch.float64
    assert schedule.num_steps == num_steps
    torch.testing.assert_close(schedule.betas, reference.betas.double(), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(schedule.alphas_cumprod, reference.alphas_cumprod.double(), rtol=1e-4, atol=1e-7)


def test_named_schedules_have_their_published_endpoints():
    linear = make_schedule("linear")
    assert linear.betas[0].item() == pytest.approx(1e-4) and linear.betas[-1].item() == pytest.approx(0.02)
    scaled = make_schedule("scaled_linear")
    assert scaled.betas[0].item() == pytest.approx(0.00085) and scaled.betas[-1].item() == pytest.approx(0.012)
    cosine = make_schedule("cosine")
    assert cosine.betas.max().item() == pytest.approx(0.999)  # Nichol & Dhariwal cap
    # abar(t) = f(t)/f(0), f(t) = cos^2(((t/T + s)/(1 + s)) * pi/2), s = 0.008
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert cosine.alphas_cumprod[499].item() == pytest.approx(f(500 / 1000) / f(0), rel=1e-5)


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "cosine"])
def test_alphas_cumprod_and_log_snr_decrease(name):
    schedule = make_schedule(name)
    assert (schedule.alphas_cumprod.diff() < 0).all()
    assert (schedule.log_snr.diff() < 0).all()
    torch.testing.assert_close(schedule.alphas, 1 - schedule.betas)
    abar = schedule.alphas_cumprod
    torch.testing.assert_close(schedule.log_snr.exp(), abar / (1 - abar))


def test_model_schedule_reads_a_diffusers_config():
    config = dict(DDPMScheduler(num_train_timesteps=800, **DIFFUSERS_ARGS["scaled_linear"]).config)
    config["_class_name"] = "EulerDiscreteScheduler"  # extra keys are ignored

    from_config = make_schedule("model", scheduler_config=config)
    assert from_config.num_steps == 800
    torch.testing.assert_close(from_config.betas, make_schedule("scaled_linear", 800).betas)

    overridden = make_schedule("model", 100, scheduler_config=config)
    torch.testing.assert_close(overridden.betas, make_schedule("scaled_linear", 100).betas)

    trained = make_schedule("model", scheduler_config={"trained_betas": [0.1, 0.2, 0.3]})
    torch.testing.assert_close(trained.betas, torch.tensor([0.1, 0.2, 0.3]).double())

    zero_snr = make_schedule("model", scheduler_config={**config, "rescale_betas_zero_snr": True})
    assert zero_snr.alphas_cumprod[-1].item() == 0.0 and zero_snr.log_snr[-1].item() == -math.inf


def test_schedule_errors_say_what_was_received():
    with pytest.raises(ValueError, match="'sigmoidal'.*linear, scaled_linear, cosine, flow matching, model"):
        make_schedule("sigmoidal")
    with pytest.raises(ValueError, match=r"\[2, 4000\] but is 1"):
        make_schedule("linear", 1)
    with pytest.raises(ValueError, match="but is 4001"):
        make_schedule("cosine", 4001)
    with pytest.raises(ValueError, match="needs a `scheduler_config`"):
        make_schedule("model")
    with pytest.raises(ValueError, match="only used by"):
        make_schedule("linear", scheduler_config={"beta_schedule": "linear"})
    with pytest.raises(ValueError, match="3 `trained_betas` but `num_steps` is 10"):
        make_schedule("model", 10, scheduler_config={"trained_betas": [0.1, 0.2, 0.3]})
    with pytest.raises(ValueError, match="diffusers cannot build"):
        make_schedule("model", scheduler_config={"beta_schedule": "quadratic"})
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        NoiseSchedule(name="bad", betas=torch.tensor([0.1, 1.5], dtype=torch.float64))
    with pytest.raises(ValueError, match="float64"):
        NoiseSchedule(name="bad", betas=torch.tensor([0.1, 0.2]))
    assert SCHEDULE_NAMES == ("linear", "scaled_linear", "cosine", "flow matching", "model")


# ----------------------------------------------------------------------------- noising


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "cosine"])
@pytest.mark.parametrize("t", [0, 1, 250, 999])
def test_forward_sample_equals_diffusers_add_noise(name, t):
    x0 = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    noise = fixed_noise(x0.shape, seed=2)
    scheduler = DDPMScheduler(num_train_timesteps=1000, **DIFFUSERS_ARGS[name])

    ours = forward_sample(x0, t=t, schedule=make_schedule(name), noise=noise)
    reference = scheduler.add_noise(x0, noise, torch.tensor([t]))
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)


def test_forward_sample_rejects_bad_inputs():
    schedule = make_schedule("linear", 50)
    x0 = torch.zeros(1, 3, 8, 8)
    with pytest.raises(ValueError, match=r"\[0, 49\] but is 50"):
        forward_sample(x0, t=50, schedule=schedule, noise=torch.zeros_like(x0))
    with pytest.raises(ValueError, match="but is -1"):
        forward_sample(x0, t=-1, schedule=schedule, noise=torch.zeros_like(x0))
    with pytest.raises(ValueError, match="int but is 2.5"):
        forward_sample(x0, t=2.5, schedule=schedule, noise=torch.zeros_like(x0))
    with pytest.raises(ValueError, match=r"shape of `x0` \(1, 3, 8, 8\) but has \(1, 3, 4, 4\)"):
        forward_sample(x0, t=3, schedule=schedule, noise=torch.zeros(1, 3, 4, 4))


def test_fixed_noise_is_seeded_and_shared_across_t():
    assert torch.equal(fixed_noise((2, 3), seed=7), fixed_noise((2, 3), seed=7))
    assert not torch.equal(fixed_noise((2, 3), seed=7), fixed_noise((2, 3), seed=8))
    x0 = torch.zeros(1, 3, 4, 4, dtype=torch.float64)
    epsilon = FixedNoise(seed=3).like(x0)
    assert epsilon.dtype == torch.float64
    schedule = make_schedule("linear")
    # With x0 = 0, x_t = sqrt(1 - abar_t) * epsilon: the same epsilon at every t.
    for t in (10, 500):
        x_t = forward_sample(x0, t=t, schedule=schedule, noise=epsilon)
        torch.testing.assert_close(x_t / math.sqrt(1 - schedule.alphas_cumprod[t].item()), epsilon)


def test_markov_chain_first_step_is_one_transition():
    schedule = make_schedule("linear", 50)
    x0 = torch.linspace(-1, 1, 12).reshape(1, 3, 2, 2)
    x_first = markov_chain(x0, t=0, schedule=schedule, generator=torch.Generator().manual_seed(5))
    z = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    beta = schedule.betas[0].item()
    torch.testing.assert_close(x_first, math.sqrt(1 - beta) * x0 + math.sqrt(beta) * z)


@pytest.mark.parametrize("t", [5, 200, 999])
def test_closed_form_moments_match_theory(small_x0, t):
    schedule = make_schedule("linear")
    n_draws = 4000
    mean, variance = empirical_moments(small_x0, t=t, schedule=schedule, n_draws=n_draws, seed=t)
    abar = schedule.alphas_cumprod[t].item()
    theory_variance = 1 - abar

    # Standard errors of a sample mean and of an unbiased sample variance of a Gaussian.
    mean_tolerance = 5 * math.sqrt(theory_variance / n_draws)
    variance_tolerance = 5 * theory_variance * math.sqrt(2 / (n_draws - 1))
    assert (mean - math.sqrt(abar) * small_x0).abs().max().item() < mean_tolerance
    assert (variance - theory_variance).abs().max().item() < variance_tolerance


@pytest.mark.parametrize(("name", "t"), [("linear", 30), ("cosine", 49)])
def test_markov_chain_agrees_with_closed_form_in_distribution(small_x0, name, t):
    schedule = make_schedule(name, 50)
    n_draws = 4000
    chain = draw_samples(small_x0, t=t, schedule=schedule, n_draws=n_draws, seed=11, method="markov_chain")
    closed = draw_samples(small_x0, t=t, schedule=schedule, n_draws=n_draws, seed=12, method="closed_form")

    # Per-pixel means and variances: difference of two independent estimates.
    variance = 1 - schedule.alphas_cumprod[t].item()
    mean_tolerance = 5 * math.sqrt(2 * variance / n_draws)
    variance_tolerance = 5 * variance * math.sqrt(2 * 2 / (n_draws - 1))
    assert (chain.mean(0) - closed.mean(0)).abs().max().item() < mean_tolerance
    assert (chain.var(0) - closed.var(0)).abs().max().item() < variance_tolerance
    assert (chain.mean(0) - math.sqrt(1 - variance) * small_x0).abs().max().item() < mean_tolerance

    assert ks_2samp(chain.flatten().numpy(), closed.flatten().numpy()).pvalue > 1e-3


def test_ks_check_detects_an_off_by_one_chain(small_x0):
    # The distribution test above has power: one step too few is caught at T=20 (cosine).
    schedule = make_schedule("cosine", 20)
    chain = draw_samples(small_x0, t=3, schedule=schedule, n_draws=4000, seed=1, method="markov_chain")
    closed = draw_samples(small_x0, t=4, schedule=schedule, n_draws=4000, seed=2)
    assert ks_2samp(chain.flatten().numpy(), closed.flatten().numpy()).pvalue < 1e-3


# ----------------------------------------------------------------------------- images and latents


def test_image_tensor_round_trip_and_cropping():
    image = gradient_image(48, 32)
    x = image_to_tensor(image)
    assert x.shape == (1, 3, 32, 48) and x.dtype == torch.float32
    assert x.min().item() >= -1 and x.max().item() <= 1
    assert np.array_equal(np.asarray(tensor_to_image(x)), np.asarray(image))

    assert image_to_tensor(gradient_image(100, 60)).shape == (1, 3, 56, 96)  # centre-cropped to /8
    assert image_to_tensor(gradient_image(100, 60), size=40).shape == (1, 3, 40, 64)  # 67x40 -> 64x40
    assert image_to_tensor(Image.new("L", (16, 16))).shape == (1, 3, 16, 16)  # converted to RGB

    # x_t leaves [-1, 1]; display clamps it.
    out_of_range = torch.full((1, 3, 2, 2), 3.0)
    assert np.asarray(tensor_to_image(out_of_range)).min() == 255
    with pytest.raises(ValueError, match=r"\(2, 3, 2, 2\)"):
        tensor_to_image(torch.zeros(2, 3, 2, 2))
    with pytest.raises(ValueError, match="at least 8x8 pixels but is 5x5"):
        image_to_tensor(Image.new("RGB", (5, 5)))


def test_pixel_frames_use_one_fixed_epsilon_and_get_noisier():
    x0 = image_to_tensor(gradient_image(16, 16))
    schedule = make_schedule("linear", 100)
    timesteps = animation_timesteps(schedule, num_frames=5)
    assert timesteps == [0, 25, 50, 74, 99]

    frames = forward_frames(x0, schedule=schedule, timesteps=timesteps, seed=4, include_clean=True)
    assert len(frames) == 6 and all(frame.size == (16, 16) for frame in frames)
    assert np.array_equal(np.asarray(frames[0]), np.asarray(tensor_to_image(x0)))
    expected = tensor_to_image(forward_sample(x0, t=50, schedule=schedule, noise=fixed_noise(x0.shape, 4)))
    assert np.array_equal(np.asarray(frames[3]), np.asarray(expected))

    clean = np.asarray(frames[0], dtype=np.float64)
    distances = [np.abs(np.asarray(frame, dtype=np.float64) - clean).mean() for frame in frames[1:]]
    assert distances == sorted(distances) and distances[0] < distances[-1]


def test_latent_frames_noise_latents_and_decode_each(tiny_vae):
    x0 = image_to_tensor(gradient_image(16, 16))
    schedule = make_schedule("scaled_linear", 50)

    latents = encode(tiny_vae, x0)
    with torch.no_grad():
        posterior_mean = tiny_vae.encode(x0).latent_dist.mean
    torch.testing.assert_close(latents, posterior_mean * 0.5)  # times scaling_factor
    assert latents.shape == (1, 4, 8, 8)
    decoded, _ = decode(tiny_vae, latents)
    with torch.no_grad():
        torch.testing.assert_close(decoded, tiny_vae.decode(posterior_mean).sample)  # divided back

    frames = forward_frames(x0, schedule=schedule, timesteps=[0, 49], seed=9, vae=tiny_vae)
    assert len(frames) == 2 and all(frame.size == (16, 16) for frame in frames)
    noisy_latents = forward_sample(latents, t=49, schedule=schedule, noise=fixed_noise(latents.shape, 9))
    expected = tensor_to_image(decode(tiny_vae, noisy_latents)[0])
    assert np.array_equal(np.asarray(frames[1]), np.asarray(expected))
    assert not np.array_equal(np.asarray(frames[0]), np.asarray(frames[1]))


# ----------------------------------------------------------------------------- statistics and plots


def test_theoretical_density_is_a_density_and_tends_to_standard_normal():
    x0 = image_to_tensor(gradient_image(64, 64))  # 12288 values: subsampled to 2000
    schedule = make_schedule("linear")
    grid = np.linspace(-6, 6, 4001)
    for t in (100, 999):
        density = theoretical_marginal_density(grid, x0=x0, t=t, schedule=schedule)
        assert np.trapezoid(density, grid) == pytest.approx(1, abs=1e-3)
    standard_normal = np.exp(-(grid**2) / 2) / math.sqrt(2 * math.pi)
    assert np.abs(density - standard_normal).max() < 1e-3  # t = 999: abar ~ 4e-5
    early = theoretical_marginal_density(grid, x0=x0, t=100, schedule=schedule)
    assert np.abs(early - standard_normal).max() > 0.05


def test_value_histogram_overlays_theory_on_the_values():
    x0 = image_to_tensor(gradient_image(32, 32))
    schedule = make_schedule("cosine")
    x_t = forward_sample(x0, t=300, schedule=schedule, noise=fixed_noise(x0.shape, 0))
    figure = value_histogram(x_t, t=300, schedule=schedule, x0=x0)

    (axes,) = figure.axes
    assert len(axes.patches) == 100  # histogram bars
    theory, standard_normal = axes.get_lines()
    heights = np.array([bar.get_height() for bar in axes.patches])
    centres = np.array([bar.get_x() + bar.get_width() / 2 for bar in axes.patches])
    predicted = np.interp(centres, *theory.get_data())
    # 3072 values in 100 bins: the histogram follows the predicted mixture, not just N(0, 1).
    assert np.abs(heights - predicted).max() < 0.15
    assert np.trapezoid(standard_normal.get_ydata(), standard_normal.get_xdata()) == pytest.approx(1, abs=1e-3)


def test_schedule_plot_has_three_panels_with_every_schedule():
    schedules = [make_schedule("linear"), make_schedule("cosine", 50)]
    figure = schedule_plot(schedules, t=499)
    assert len(figure.axes) == 3
    for axes in figure.axes:
        lines = axes.get_lines()
        assert len(lines) == 3  # two schedules + the marker at t
        assert lines[-1].get_xdata()[0] == pytest.approx(0.5)
        assert axes.get_xlabel() == "t / T"
    legend_labels = [text.get_text() for text in figure.axes[1].get_legend().get_texts()]
    assert legend_labels[:2] == ["linear", "cosine"]
    assert len(schedule_plot(schedules).axes[0].get_lines()) == 2
    with pytest.raises(ValueError, match=r"\[0, 999\] but is 1000"):
        schedule_plot(schedules, t=1000)


def test_formulas_are_markdown_with_latex():
    assert set(FORMULAS) == {"forward_closed_form", "markov_step", "snr", "flow_closed_form"}
    for text in FORMULAS.values():
        assert text.count("$$") == 2 and text[0].isupper()
    assert r"\sqrt{\bar\alpha_t}" in FORMULAS["forward_closed_form"]


# ----------------------------------------------------------------------------- export


def noisy_frames(count: int, size: tuple[int, int]) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(count)]


def test_export_gif_round_trips_frame_count(tmp_path):
    path = export_animation(noisy_frames(7, (24, 16)), tmp_path / "forward.gif", fps=5)
    assert path == tmp_path / "forward.gif"
    with Image.open(path) as gif:
        assert gif.n_frames == 7 and gif.size == (24, 16)
        assert gif.info["loop"] == 0 and gif.info["duration"] == 200
    assert [p.name for p in tmp_path.iterdir()] == ["forward.gif"]  # no temporary left behind


def test_export_mp4_round_trips_frame_count_and_is_upscaled_to_even(tmp_path):
    path = export_animation(noisy_frames(6, (24, 15)), tmp_path / "forward.mp4", fps=10)
    reader = imageio.get_reader(path, format="FFMPEG")
    try:
        frames = [frame for frame in reader.iter_data()]  # list(reader) sees len() == inf
    finally:
        reader.close()
    assert len(frames) == 6
    # 15 px shorter side -> x18 nearest-neighbour upscale = 432x270, already even.
    assert frames[0].shape == (270, 432, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["forward.mp4"]

    odd = export_animation(noisy_frames(2, (259, 257)), tmp_path / "odd.mp4")
    reader = imageio.get_reader(odd, format="FFMPEG")
    try:
        assert reader.get_data(0).shape == (258, 260, 3)  # padded to even, not upscaled
    finally:
        reader.close()


def test_export_rejects_bad_requests(tmp_path):
    with pytest.raises(ValueError, match=r"\.gif or \.mp4 but the path ends in '\.webm'"):
        export_animation(noisy_frames(2, (8, 8)), tmp_path / "forward.webm")
    with pytest.raises(ValueError, match="same size"):
        export_animation(noisy_frames(1, (8, 8)) + noisy_frames(1, (16, 8)), tmp_path / "forward.gif")
    with pytest.raises(ValueError, match="empty"):
        export_animation([], tmp_path / "forward.gif")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- the Explorer service


@pytest.fixture
def on_worker(studio, monkeypatch) -> list[bool]:
    """Whether each forward_sample call (the noising every forward operation does) ran on the device worker."""
    calls: list[bool] = []
    original = explorer_forward.forward_sample

    def spy(*args, **kwargs):
        calls.append(studio.models.worker.on_worker_thread())
        return original(*args, **kwargs)

    monkeypatch.setattr(explorer_forward, "forward_sample", spy)
    return calls


def test_forward_view_shows_x_t_in_pixel_and_latent_space(studio, on_worker):
    image = gradient_image(64, 48)
    view = Explorer(studio.models).forward_view(image, schedule_names=["linear", "cosine"], num_steps=1000.0,
                                                t=250.0, seed=3)
    # pixel space: the closed form with the seeded epsilon, bit for bit
    x0 = image_to_tensor(image, size=FORWARD_SIDE_PX)
    schedule = make_schedule("linear", 1000)
    expected = tensor_to_image(forward_sample(x0, t=250, schedule=schedule, noise=FixedNoise(3).like(x0)))
    # the shorter side scaled to 128 px, then cropped to multiples of 8: 171 x 128 -> 168 x 128
    assert view.x_t.size == (168, 128) and np.array_equal(np.asarray(view.x_t), np.asarray(expected))
    # latent space: the model's VAE at the model's native side, the same t and seed
    side = studio.models.current.native_side
    latent_expected = studio.models.worker.call(
        forward_frames, image_to_tensor(image, size=side), schedule=schedule, timesteps=[250], seed=3,
        vae=studio.models.current.pipeline.vae)[0]
    assert view.latent_x_t is not None and view.latent_x_t.size[1] == side
    assert np.array_equal(np.asarray(view.latent_x_t), np.asarray(latent_expected))
    # the plots and the caption
    assert len(view.schedule_figure.axes) == 3 and len(view.schedule_figure.axes[1].lines) == 3  # 2 schedules + t
    assert len(view.histogram.axes) == 1
    alpha_cumprod = schedule.alphas_cumprod[250].item()
    assert view.caption.startswith(f"**linear**, t = 250 of T = 1000: ᾱ_t = {alpha_cumprod:.4g}")
    assert "Load a model" not in view.caption
    assert on_worker and all(on_worker)


def test_forward_view_without_a_model_has_no_latent_image(studio, tmp_path):
    from pipelines.models.manager import ModelManager
    from pipelines.models.memory import MemoryManager

    explorer = Explorer(ModelManager(MemoryManager(device="cpu"), worker=studio.models.worker,
                                     models_dir=tmp_path / "models"))
    view = explorer.forward_view(gradient_image(32, 32), schedule_names=["cosine"], num_steps=100, t=500, seed=0)
    assert view.x_t.size == (FORWARD_SIDE_PX, FORWARD_SIDE_PX) and view.latent_x_t is None
    assert "t = 99 of T = 100" in view.caption  # t is clamped to T - 1
    assert view.caption.endswith("Load a model to see the same t in its latent space.")
    with pytest.raises(ValueError, match='Schedule "model" needs a loaded model'):
        explorer.forward_view(gradient_image(32, 32), schedule_names=["model"], num_steps=100, t=5, seed=0)


def test_forward_operations_refuse_bad_input_clearly(studio):
    explorer = Explorer(studio.models)
    image = gradient_image(32, 32)
    with pytest.raises(ValueError, match="Tick at least one schedule"):
        explorer.forward_view(image, schedule_names=[], num_steps=100, t=5, seed=0)
    with pytest.raises(ValueError, match="Upload an image"):
        explorer.markov_check(None, schedule_names=["linear"], num_steps=100, t=5, seed=0)
    with pytest.raises(ValueError, match="Upload an image"):
        explorer.export_forward(None, schedule_names=["linear"], num_steps=100, seed=0, suffix=".gif")
    with pytest.raises(ValueError, match="`seed` has to be a whole number but is None"):
        explorer.forward_view(image, schedule_names=["linear"], num_steps=100, t=5, seed=None)
    # "model" is the loaded model's own betas
    view = explorer.forward_view(image, schedule_names=["model"], num_steps=100, t=5, seed=0)
    assert view.caption.startswith("**model (")


def test_markov_check_agrees_with_the_closed_form_and_theory(studio, on_worker):
    check = Explorer(studio.models).markov_check(gradient_image(64, 64), schedule_names=["linear"], num_steps=1000,
                                                 t=300, seed=5)
    theory = 1 - make_schedule("linear", 1000).alphas_cumprod[300].item()
    assert check.t == 300 and check.draws == MOMENT_DRAWS and check.side_px == MOMENT_SIDE_PX
    assert check.theory_variance == pytest.approx(theory)
    for moments in (check.closed_form, check.markov_chain):
        # the mean of 3072 per-pixel variances, each over 32 draws: within a few percent of 1 - abar_t
        assert moments.variance == pytest.approx(theory, rel=0.05)
        assert moments.mean_error < 3 * math.sqrt(theory / MOMENT_DRAWS)
        assert moments.mean_image.size == (MOMENT_SIDE_PX, MOMENT_SIDE_PX)
    assert not np.array_equal(np.asarray(check.closed_form.mean_image), np.asarray(check.markov_chain.mean_image))
    assert on_worker and all(on_worker)


def test_export_forward_animates_x_0_to_x_T(studio):
    path = Explorer(studio.models).export_forward(gradient_image(32, 32), schedule_names=["cosine", "linear"],
                                                  num_steps=1000, seed=1, suffix=".gif")
    assert path.name == "forward-cosine.gif" and path.is_file()
    with Image.open(path) as gif:
        assert gif.n_frames == ANIMATION_FRAMES + 1  # x_0, then ANIMATION_FRAMES noisier ones
        assert gif.size == (FORWARD_SIDE_PX, FORWARD_SIDE_PX)
