"""LoRA training on the flow-matching transformers (pipelines/training/flow.py), on the seeded tiny SD 3, Flux.1
dev, Flux 2 [klein] and [dev] and Sana pipelines: the loss falls on the images it is shown, the file it writes
loads in plain diffusers with `load_lora_weights` (its alpha too) and moves its image, the studio applies it by its
prompt tag, the model is left without the adapter; DreamBooth adds the model's own class images; what it does not
train on a transformer is refused naming why."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.core.transformer_call import text_encoder_layers
from pipelines.tasks.txt2img import Txt2ImgRequest
from tests.test_training_methods import request as training
from tests.test_training_methods import run
from tests.test_transformers import BUILDS, families, pixels, use  # noqa: F401  (the module's studio)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("family", ["SD 3.x", "Flux", "Flux 2 klein", "Flux 2 dev", "Sana"])
def test_a_transformer_lora_trains_and_plain_diffusers_loads_it(families, family, tmp_path, monkeypatch):  # noqa: F811
    studio = use(families, family)
    # trained at the model's native side: the tiny Flux's VAE does not downsample, so 64 px rather than diffusers'
    # default 128 keeps its 2×2 patches at 1,024 rather than 4,096
    monkeypatch.setattr(studio.models.current.pipeline, "default_sample_size", 64, raising=False)
    transformer = studio.models.current.pipeline.transformer
    weights_before = {name: value.clone() for name, value in transformer.state_dict().items()}
    name = f"framed-{family.lower().replace(' ', '-').replace('.x', '')}"
    result, losses = run(studio, training(name=name, trigger="framed", steps=16, learning_rate=3e-2, batch_size=2,
                                          sample_every=1, sample_steps=2, rank=4, alpha=8), tmp_path)
    assert len(losses) == 16 and np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < np.mean(losses[:5])             # it learns the images it is shown
    assert result.path == studio.models.lora_dir / f"{name}.safetensors" and result.steps == 16
    assert len(result.before) == len(result.after) == 2 and result.effect > 0
    # the model is as it was: no adapter left, no weight changed
    assert not getattr(transformer, "peft_config", None)
    weights_after = {key.replace(".base_layer", ""): value for key, value in transformer.state_dict().items()}
    assert weights_after.keys() == weights_before.keys()      # (peft's emptied wrappers hold the same weights)
    assert all(torch.equal(value, weights_before[key]) for key, value in weights_after.items())
    # the studio applies it by its prompt tag
    common = dict(steps=3, width=64, height=64, seed=2, sampler="Euler", guidance_scale=1.0)
    plain = pixels(studio.generate(Txt2ImgRequest(prompt="framed, red", **common)).images[0].image)
    styled = studio.generate(Txt2ImgRequest(prompt=f"framed, red <lora:{name}:1>", **common)).images[0]
    assert np.abs(pixels(styled.image) - plain).mean() > 0.1 and "Lora hashes" in styled.infotext
    # plain diffusers loads the file with load_lora_weights, on the same seeded weights built afresh
    diffusers = BUILDS[family](tmp_path / "plain")
    arguments = dict(prompt="framed, red", num_inference_steps=3, width=64, height=64, output_type="latent")
    if family.startswith("Flux 2"):      # the layers the studio reads off its small text encoder
        arguments["text_encoder_out_layers"] = text_encoder_layers(diffusers)
    if family == "Sana":                 # the size asked for, as the studio draws it
        arguments["use_resolution_binning"] = False
        # the caption-dropout row is the empty prompt as Sana's pipeline encodes its negative (no instruction)
        from pipelines.training.flow import _encode

        pipeline = studio.models.current.pipeline
        dropped = _encode(pipeline, "Sana", "", pipeline._execution_device)
        negative, mask = pipeline.encode_prompt("framed", negative_prompt="", do_classifier_free_guidance=True)[2:]
        assert torch.equal(dropped["encoder_hidden_states"], negative) and torch.equal(
            dropped["encoder_attention_mask"], mask)
    before = diffusers(**arguments, generator=torch.Generator().manual_seed(1)).images
    diffusers.load_lora_weights(str(result.path.parent), weight_name=result.path.name, adapter_name=name)
    assert name in diffusers.get_list_adapters()["transformer"]
    config = diffusers.transformer.peft_config[name]          # its alpha read back from the file, not taken as r
    assert (config.r, config.lora_alpha) == (4, 8)
    after = diffusers(**arguments, generator=torch.Generator().manual_seed(1)).images
    assert (after - before).abs().mean() > 1e-3


def test_dreambooth_trains_a_transformer_lora_beside_the_class_images_the_model_draws(families, tmp_path,  # noqa: F811
                                                                                    monkeypatch):
    """DreamBooth on Flux: the class images are the model's own pictures of the class (its sampler, the class
    seeds), cached for the next run; their rows' loss counts times `prior_loss_weight`; the result sets the
    identifier beside its class at the same seeds."""
    from PIL import Image

    from pipelines.core.transformers import default_transformer_sampler, make_transformer_scheduler
    from pipelines.training.class_images import CLASS_IMAGE_SEED, CLASS_IMAGE_STEPS

    studio = use(families, "Flux")
    monkeypatch.setattr(studio.models.current.pipeline, "default_sample_size", 64, raising=False)
    dreambooth = dict(method="dreambooth", name="flux-sks", trigger="sks frame", class_prompt="frame",
                      class_images=1, batch_size=2, learning_rate=1e-2)
    result, losses = run(studio, training(**dreambooth, steps=3), tmp_path)
    assert len(losses) == 3 and np.isfinite(losses).all() and result.path.is_file()
    assert set(result.comparison) == {"sks frame, red", "frame"}
    assert all(len(images) == 2 for images in result.comparison.values())
    drawn = sorted((tmp_path / "runs" / "class-images").rglob("0*.png"))
    assert [path.name for path in drawn] == ["0000.png"]
    model = studio.models.current

    def own_picture():
        pipeline, kept = model.pipeline, model.pipeline.scheduler
        pipeline.scheduler = make_transformer_scheduler(default_transformer_sampler(model.scheduler_config),
                                                        model.scheduler_config)
        try:
            return pipeline(prompt="frame", num_inference_steps=CLASS_IMAGE_STEPS, width=64, height=64,
                            true_cfg_scale=1.0, generator=torch.Generator().manual_seed(CLASS_IMAGE_SEED)).images[0]
        finally:
            pipeline.scheduler = kept
    assert (pixels(Image.open(drawn[0])) == pixels(studio.models.worker.call(own_picture))).all()
    # the first step's loss is the instance rows' plus `prior_loss_weight` times the class rows' (the same draws
    # whatever the weight): linear in the weight, with a class term of its own
    first = [run(studio, training(**dreambooth | {"name": f"flux-sks-{weight}"}, steps=1, prior_loss_weight=weight),
                 tmp_path)[1][0] for weight in (0.0, 1.0, 2.0)]
    assert first[1] - first[0] > 1e-4 and first[0] > 0
    assert abs((first[2] - first[0]) - 2 * (first[1] - first[0])) < 1e-4 * first[2]


def test_a_stopped_transformer_training_resumes_from_its_last_checkpoint(families, tmp_path,  # noqa: F811
                                                                           monkeypatch):
    """A transformer LoRA run keeps a checkpoint (the LoRA and AdamW's moments) every `checkpoint_every` steps: a
    run stopped at step 5 resumes from its checkpoint at step 4 and finishes, leaving none; a checkpoint of other
    settings is not resumed, and the run says why."""
    from safetensors.torch import load_file

    from pipelines.training import flow
    from tests.test_lora_train import run as run_in_background

    studio = use(families, "Flux 2 dev")
    monkeypatch.setattr(studio.models.current.pipeline, "default_sample_size", 64, raising=False)   # at 64 px
    settings = dict(name="resumed", trigger="framed", steps=6, checkpoint_every=2, batch_size=2)
    checkpoint = tmp_path / "runs" / "resumed" / "checkpoint.safetensors"

    def stopped_at(last: int):                   # Stop pressed as step `last` is reported (test_lora_train's run)
        return run_in_background(studio, training(**settings), tmp_path, stop_at=last).result(timeout=600)

    first = stopped_at(5)
    assert first.stopped and first.steps == 5 and checkpoint.exists()
    saved = load_file(str(checkpoint))
    resumed = {}

    def spying(*arguments):              # the LoRA and AdamW's moments as a resumed run starts from them
        step, note = real(*arguments)
        weights, optimizer = arguments[3], arguments[4]
        if step:
            resumed.update(step=step, weights={key: value.detach().clone() for key, value in weights.state().items()},
                           moments=[optimizer.state[p]["exp_avg"].shape for p in optimizer.param_groups[0]["params"]])
        return step, note
    real = flow.resume
    monkeypatch.setattr(flow, "resume", spying)
    result, losses = run(studio, training(**settings), tmp_path)
    assert result.steps == 6 and len(losses) == 2                   # steps 5 and 6, from the checkpoint at 4
    assert any(warning.startswith("Resumed at step 4") for warning in result.warnings)
    assert resumed["step"] == 4 and all(torch.equal(value, saved[f"adapter.{key}"])
                                        for key, value in resumed["weights"].items())
    assert resumed["moments"] == [value.shape for value in resumed["weights"].values()]
    assert not checkpoint.exists()
    stopped_at(3)
    result, losses = run(studio, training(**settings, learning_rate=5e-3), tmp_path)
    assert result.steps == 6 and len(losses) == 6 and not checkpoint.exists()
    assert any("is another run's (made with other settings: learning_rate)" in warning for warning in result.warnings)


def test_what_a_transformer_does_not_train_is_refused_naming_why(families, tmp_path):  # noqa: F811
    studio = use(families, "Flux")
    with pytest.raises(ValueError, match="On Flux models the studio trains a LoRA on the transformer.*Textual "
                                         "inversion trains UNet models"):
        run(studio, training(method="textual_inversion", name="ti", init_word="frame"), tmp_path)
    with pytest.raises(ValueError, match="LoRA with the text encoders trains UNet models"):
        run(studio, training(name="te", train_text_encoder=True), tmp_path)
    studio = use(families, "PixArt-Σ")
    with pytest.raises(ValueError, match="LoRA training here runs on UNet models .* Flux 2 and Sana; pixart is a "
                                         "PixArt-Σ"):
        run(studio, training(name="pixart"), tmp_path)
