"""The generation service on a seeded tiny model: samplers, seeds, CFG, previews, stop, metadata."""

from __future__ import annotations

import errno
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.core.preview import is_blank
from pipelines.core.results import GeneratedImage, GenerationDone, Preview
from pipelines.core.samplers import SAMPLER_NAMES, SAMPLERS, a1111_sampler
from pipelines.io.metadata import infotext_to_settings, parse_infotext, read_png_metadata
from pipelines.tasks.img2img import Img2ImgRequest
from pipelines.tasks.txt2img import Txt2ImgRequest


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def _basics(**overrides) -> dict:
    return dict(prompt="red apple", seed=1234, steps=4, width=64, height=64, guidance_scale=5.0) | overrides


def request(**overrides) -> Txt2ImgRequest:
    values = dict(prompt="red apple", seed=1234, steps=4, width=64, height=64, guidance_scale=5.0)
    values.update(overrides)
    return Txt2ImgRequest(**values)


# DDPM speculative runs its own loop over DDPM's transitions (tests/test_speculative.py)
@pytest.mark.parametrize("sampler", [name for name in SAMPLER_NAMES if name != "DDPM speculative"])
def test_every_sampler_builds_from_the_model_config_and_samples(studio, sampler):
    pipeline = studio.models.pipeline("txt2img")
    stepped_by = []
    original_step = type(pipeline).__call__

    def spy_call(pipe, *args, **kwargs):  # which scheduler the loop really steps with
        stepped_by.append(pipe.scheduler)
        return original_step(pipe, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(pipeline), "__call__", spy_call)
        done = studio.generate(request(sampler=sampler, steps=3))
    scheduler_class, overrides = SAMPLERS[sampler]
    (scheduler,) = stepped_by
    assert type(scheduler) is scheduler_class
    assert all(scheduler.config[key] == value for key, value in overrides.items())
    model_config = studio.models.current.scheduler_config
    assert scheduler.config.beta_schedule == model_config["beta_schedule"]
    assert scheduler.config.beta_end == model_config["beta_end"]
    image = pixels(done.images[0].image)
    assert image.shape == (64, 64, 3) and not is_blank(done.images[0].image)
    a1111_name, schedule_type = a1111_sampler(sampler)       # written in A1111 >= 1.9's form
    assert f"Sampler: {a1111_name}, Schedule type: {schedule_type}," in done.images[0].infotext


def test_the_sampler_changes_the_image(studio):
    euler = pixels(studio.generate(request(sampler="Euler", steps=3)).images[0].image)
    ddim = pixels(studio.generate(request(sampler="DDIM", steps=3)).images[0].image)
    assert np.abs(euler - ddim).mean() > 0.5


def test_unknown_sampler_is_an_error_listing_the_valid_ones():
    with pytest.raises(ValueError, match="Unknown sampler 'Eulr'.*Euler a.*DPM\\+\\+ 2M Karras"):
        request(sampler="Eulr")


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ SDE Karras", "DPM++ 2M"])
def test_same_seed_gives_the_same_image_bit_for_bit_and_another_seed_does_not(studio, sampler):
    first = studio.generate(request(sampler=sampler)).images[0].image
    torch.manual_seed(999)  # the global RNG must not matter
    again = studio.generate(request(sampler=sampler)).images[0].image
    other = studio.generate(request(sampler=sampler, seed=1235)).images[0].image
    assert np.array_equal(pixels(first), pixels(again))
    assert np.abs(pixels(first) - pixels(other)).mean() > 1.0


def test_random_seed_is_reported_and_reproduces(studio):
    done = studio.generate(request(seed=-1))
    assert 0 <= done.seed < 2 ** 32 and done.images[0].seed == done.seed
    assert f"Seed: {done.seed}" in done.images[0].infotext
    replay = studio.generate(request(seed=done.seed))
    assert np.array_equal(pixels(done.images[0].image), pixels(replay.images[0].image))


def test_image_i_of_a_batch_uses_seed_plus_i(studio):
    batch = studio.generate(request(batch_size=2, batch_count=2))
    assert [item.seed for item in batch.images] == [1234, 1235, 1236, 1237]
    alone = studio.generate(request(seed=1236)).images[0].image
    neighbour = studio.generate(request(seed=1237)).images[0].image
    # Same starting noise; batched matrix products round differently from single ones, so the
    # images agree to within a grey level or so, while a neighbouring seed is a different image.
    assert np.abs(pixels(batch.images[2].image) - pixels(alone)).mean() < 0.5
    assert np.abs(pixels(batch.images[2].image) - pixels(neighbour)).mean() > 2.0


def _unet_batch_sizes(studio, guidance_scale: float) -> list[int]:
    unet = studio.models.current.pipeline.unet
    sizes = []
    handle = unet.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    try:
        studio.generate(request(guidance_scale=guidance_scale, steps=3))
    finally:
        handle.remove()
    return sizes


def test_cfg_one_skips_the_unconditional_pass(studio):
    assert _unet_batch_sizes(studio, 1.0) == [1, 1, 1]
    assert _unet_batch_sizes(studio, 7.0) == [2, 2, 2]


def test_guidance_changes_the_image(studio):
    weak = studio.generate(request(guidance_scale=1.0)).images[0].image
    strong = studio.generate(request(guidance_scale=12.0)).images[0].image
    assert np.abs(pixels(weak) - pixels(strong)).mean() > 1.0


def test_saved_png_metadata_round_trips_to_the_same_image(studio):
    original = request(prompt="green apple, noto style", negative_prompt="blurry", sampler="DPM++ 2M Karras",
                       steps=5, guidance_scale=6.5, seed=42)
    saved = studio.generate(original).images[0]
    infotext, extra = read_png_metadata(saved.path)
    prompt, negative, parameters = parse_infotext(infotext)
    settings = infotext_to_settings(parameters)
    assert (prompt, negative) == ("green apple, noto style", "blurry")
    assert settings["steps"] == 5 and settings["sampler"] == "DPM++ 2M Karras"
    assert settings["guidance_scale"] == 6.5 and settings["seed"] == 42
    assert (settings["width"], settings["height"]) == (64, 64)
    assert extra["request"]["negative_prompt"] == "blurry" and "diffusers" in extra["versions"]
    restored = request(prompt=prompt, negative_prompt=negative, sampler=settings["sampler"], steps=settings["steps"],
                       guidance_scale=settings["guidance_scale"], seed=settings["seed"])
    replay = studio.generate(restored).images[0].image
    assert np.array_equal(pixels(Image.open(saved.path).convert("RGB")), pixels(replay))


def test_outputs_are_named_by_counter_and_seed(studio):
    done = studio.generate(request(batch_size=2, seed=7))
    names = [item.path.rsplit("/", 1)[-1] for item in done.images]
    counters = [int(name.split("-")[0]) for name in names]
    assert [name.split("-")[1] for name in names] == ["7.png", "8.png"]
    assert counters[1] == counters[0] + 1


@pytest.mark.parametrize("error", [PermissionError(errno.EACCES, "Permission denied"),
                                   OSError(errno.EIO, "Input/output error")], ids=["permission", "io"])
def test_an_image_that_cannot_be_saved_comes_back_with_a_note_and_the_batch_is_kept(studio, monkeypatch, error):
    """Bug 6: an OSError other than a full disk while saving (a folder made read-only, an I/O error) failed the
    job, and the whole batch was lost. Now the image comes back unsaved with a note naming the error, the rest of
    the batch is saved, and the next generation saves again."""
    from pipelines.io import metadata

    save = metadata.save_image
    seeds_saved: list[int] = []

    def fails_for_the_second(image, infotext, extra, outputs_dir, seed, *args, **kwargs):
        seeds_saved.append(seed)
        if len(seeds_saved) == 2:
            raise error
        return save(image, infotext, extra, outputs_dir, seed, *args, **kwargs)

    monkeypatch.setattr(metadata, "save_image", fails_for_the_second)
    done = studio.generate(request(batch_size=3, seed=20))
    assert [(item.seed, item.finished) for item in done.images] == [(20, True), (21, True), (22, True)]
    assert [item.path is not None for item in done.images] == [True, False, True]
    (note,) = [message for message in done.messages if message.startswith("Not saved")]
    assert note == f"Not saved, seed 21 (the image is shown): {type(error).__name__}: {error}"
    assert read_png_metadata(done.images[2].path)[1]["request"]["seed"] == 22
    assert not is_blank(done.images[1].image)
    again = studio.generate(request(seed=30))
    assert again.images[0].path is not None and not any(m.startswith("Not saved") for m in again.messages)


def test_img2img_strength_zero_returns_the_input(studio):
    source = studio.generate(request()).images[0].image
    same = studio.generate(Img2ImgRequest(**_basics(), init_image=source, strength=0.0)).images[0].image
    changed = studio.generate(Img2ImgRequest(**_basics(steps=10), init_image=source, strength=0.9)).images[0].image
    assert np.array_equal(pixels(source), pixels(same))
    assert np.abs(pixels(source) - pixels(changed)).mean() > 1.0
    assert studio.models.pipeline("img2img").unet is studio.models.pipeline("txt2img").unet  # from_pipe shares


def test_previews_arrive_every_n_steps_before_the_image(studio):
    events = list(studio.run(request(steps=6, preview_every=2, preview_mode="linear")))
    previews = [e for e in events if isinstance(e, Preview)]
    assert [p.step for p in previews] == [2, 4]
    assert previews[0].images[0].size == (64, 64)
    # enlarged smoothly from the latent grid (one latent pixel = 4x4 image pixels here), not in blocks
    cell = np.asarray(previews[0].images[0])[:4, :4].reshape(-1, 3)
    assert len(np.unique(cell, axis=0)) > 1
    assert isinstance(events[-2], GeneratedImage) and isinstance(events[-1], GenerationDone)


def test_stop_interrupts_after_the_step_in_progress_and_keeps_finished_images(studio, previews_in_lockstep):
    stop = threading.Event()
    events = []
    for event in studio.run(request(steps=8, batch_count=3, preview_every=1, preview_mode="linear"), stop=stop):
        events.append(event)
        if isinstance(event, Preview):
            if event.batch_index == 1 and event.step == 2:
                stop.set()
            previews_in_lockstep()
    done = events[-1]
    assert done.stopped
    finished = [item for item in done.images if item.finished]
    partial = [item for item in done.images if not item.finished]
    assert len(finished) == 1 and finished[0].path is not None
    assert len(partial) == 1 and partial[0].path is None and partial[0].steps_done == 2
    assert "Stopped at step: 2" in partial[0].infotext and "Stopped at step" not in finished[0].infotext
    assert any("Stopped: 1 finished image(s) kept, the unfinished one shown but not saved." == message
               for message in done.messages)


@pytest.mark.parametrize("width,height", [(100, 64), (64, 60)])
def test_sizes_must_be_multiples_of_eight(studio, width, height):
    with pytest.raises(ValueError, match=f"divisible by 8 but are {height} and {width}"):
        studio.generate(request(width=width, height=height))


@pytest.mark.parametrize("field,value,words", [("steps", 0, "steps"), ("width", 4096, "width"),
                                               ("guidance_scale", -1.0, "CFG"), ("seed", -5, "seed"),
                                               ("strength", 1.5, "strength")])
def test_bad_values_are_refused_with_what_was_received(field, value, words):
    with pytest.raises(ValueError, match=words) as error:
        if field == "strength":
            Img2ImgRequest(**_basics(), init_image=Image.new("RGB", (64, 64)), strength=value)
        else:
            request(**{field: value})
    assert str(value) in str(error.value)


def test_long_prompts_are_encoded_in_windows(studio):
    long_prompt = ", ".join(["red apple", "green apple", "a cat", "a dog", "smiling face"] * 4)
    pipeline = studio.models.pipeline("txt2img")
    seen = []
    handle = pipeline.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["encoder_hidden_states"].shape[1]), with_kwargs=True)
    try:
        done = studio.generate(request(prompt=long_prompt, steps=2))
    finally:
        handle.remove()
    assert any("windows" in message for message in done.messages)
    assert seen[0] > pipeline.tokenizer.model_max_length and seen[0] % pipeline.tokenizer.model_max_length == 0
    tail_changed = studio.generate(request(prompt=long_prompt + ", blue sky, blue sky", steps=2))
    assert np.abs(pixels(done.images[0].image) - pixels(tail_changed.images[0].image)).mean() > 0.1


def test_out_of_memory_in_the_lowest_mode_is_an_actionable_error(studio, monkeypatch):
    unet = studio.models.current.pipeline.unet

    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(unet, "forward", exhausted)
    with pytest.raises(ValueError, match="smaller size or batch"):
        studio.generate(request())
    monkeypatch.undo()
    assert not is_blank(studio.generate(request()).images[0].image)  # the service still works


def test_fp16_vae_that_overflows_is_upcast_and_decodes(studio):
    """The black-image bug: an fp16 VAE decode overflowing to NaN is redone in fp32, once and for good."""
    from pipelines.core.vae import decode

    vae = studio.models.current.pipeline.vae
    original = {name: tensor.clone() for name, tensor in vae.state_dict().items()}
    try:
        latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            # Scale the decoder's first conv so its activations reach 2e5 (past fp16's 65504) while
            # its weights still fit fp16: the overflow happens in the computation, as in SD's VAE.
            peak = vae.decoder.conv_in(vae.post_quant_conv(latents / vae.config.scaling_factor)).abs().max()
            vae.decoder.conv_in.weight.mul_(2e5 / peak)
            vae.decoder.conv_in.bias.mul_(2e5 / peak)
            assert vae.decoder.conv_in.weight.abs().max() < 6e4
        vae.to(torch.float16)
        with torch.no_grad():
            raw = vae.decode(latents.half() / vae.config.scaling_factor).sample
        assert not torch.isfinite(raw).all(), "the fixture no longer overflows in fp16"
        images, upcast = decode(vae, latents)
        assert upcast and vae.dtype == torch.float32 and torch.isfinite(images).all()
    finally:
        vae.to(torch.float32)
        vae.load_state_dict(original)


def test_out_of_memory_is_retried_once_one_mode_lower_and_the_user_is_told(studio, pretend_cuda, monkeypatch):
    from pipelines.models.memory import MemoryMode

    memory = studio.models.memory
    assert memory.mode is MemoryMode.HIGH
    unet = studio.models.current.pipeline.unet
    real_forward = unet.forward
    calls = {"n": 0}

    def first_call_runs_out(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_forward(*args, **kwargs)
    with monkeypatch.context() as patch:
        patch.setattr(unet, "forward", first_call_runs_out)
        done = studio.generate(request(steps=3))
    # the real re-placement ran: model offload for the base pipeline, and the lower mode stays in force
    assert ("enable_model_cpu_offload", id(studio.models.current.pipeline)) in pretend_cuda
    assert memory.mode is MemoryMode.BALANCED and memory.requested_mode == "balanced"
    assert any("retried once in mode balanced" in message for message in done.messages)
    expected = studio.generate(request(steps=3)).images[0].image
    assert np.array_equal(pixels(done.images[0].image), pixels(expected))  # the retry restarted from the seed


def test_img2img_crops_an_input_of_another_shape_instead_of_stretching_it_and_says_so(studio):
    wide = np.zeros((64, 128, 3), dtype=np.uint8)
    wide[:, :32] = (255, 0, 0)       # the outer quarters would be squeezed in by a stretch
    wide[:, 96:] = (0, 0, 255)
    wide[:, 32:96] = (0, 200, 0)     # the centre square is what a 64×64 crop keeps
    done = studio.generate(Img2ImgRequest(**_basics(), init_image=Image.fromarray(wide), strength=0.0))
    kept = pixels(done.images[0].image)
    assert np.abs(kept - np.array([0, 200, 0])).max() <= 2    # all green: cropped around the centre
    assert any("cropped around its centre" in message and "128×64" in message for message in done.messages)
    same_shape = studio.generate(Img2ImgRequest(**_basics(), init_image=Image.fromarray(wide[:, 32:96]),
                                                strength=0.0))
    assert not any("cropped" in message for message in same_shape.messages)


def test_a_size_past_twice_the_native_one_is_warned_about(studio):
    done = studio.generate(request(width=136, height=64, steps=2))
    assert any("more than twice this model's native size (64 px)" in message for message in done.messages)
    assert not any("native size" in message for message in studio.generate(request(width=128, steps=2)).messages)
