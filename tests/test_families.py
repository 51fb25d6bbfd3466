"""Model families (pipelines/core/families.py) on real tiny models built in-process: SD 1.x-style, SDXL and the
diffusion transformers (SD 3, Flux.1, Flux 2, PixArt-Σ, Sana: tests/test_transformers.py runs them) are named from the
pipeline and from the folder; a family no tab runs is refused at load with its family named, from the folder's
index before a weight is read, and the model that was loaded keeps serving."""

from __future__ import annotations

import json
import shutil

import pytest

from pipelines.core.paths import ModelLoadError
from pipelines.core.families import family_of_checkpoint, family_of_folder, family_of_pipeline
from pipelines.tasks.txt2img import Txt2ImgRequest
from recipe.tiny import (build_tiny_flux2_klein_pipeline, build_tiny_flux2_pipeline, build_tiny_flux_pipeline,
                         build_tiny_pixart_pipeline, build_tiny_sana_pipeline, build_tiny_sd3_pipeline,
                         build_tiny_sdxl_pipeline)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_a_family_no_tab_runs_is_refused_at_load_naming_it_and_the_model_stays(studio):
    """A folder whose index names a family the studio does not run (AuraFlow here: the tiny Flux folder with its
    index's class changed) is refused from the index, before a weight is read, and the loaded model keeps serving."""
    models = studio.models
    before = models.current
    folder = models.models_dir / "tiny-auraflow"
    build_tiny_flux_pipeline(models.models_dir / "build").save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(index | {"_class_name": "AuraFlowPipeline"}))
    shutil.rmtree(folder / "transformer")
    assert family_of_folder(folder) == "AuraFlow"
    with pytest.raises(ModelLoadError, match="tiny-auraflow is an AuraFlow model \\(a diffusion transformer with flow "
                                             "matching\\).*not supported yet"):
        models.load(str(folder), from_ui=True)
    assert models.current is before
    assert studio.generate(Txt2ImgRequest(prompt="red apple", steps=2, width=64, height=64)).images


@pytest.mark.parametrize("build,family", [(build_tiny_flux_pipeline, "Flux"), (build_tiny_sd3_pipeline, "SD 3.x"),
                                          (build_tiny_pixart_pipeline, "PixArt-Σ"), (build_tiny_sana_pipeline, "Sana"),
                                          (build_tiny_flux2_pipeline, "Flux 2"),
                                          (build_tiny_flux2_klein_pipeline, "Flux 2")])
def test_the_transformer_families_are_named_from_pipeline_and_folder(tmp_path, build, family):
    pipeline = build(tmp_path / "build")
    pipeline.save_pretrained(tmp_path / "model")
    assert family_of_pipeline(pipeline) == family_of_folder(tmp_path / "model") == family


def test_the_unet_families_are_supported(studio, tiny_model_dir, tmp_path):
    assert family_of_folder(tiny_model_dir) == family_of_pipeline(studio.models.current.pipeline) == "SD 1.x/2.x"
    sdxl = build_tiny_sdxl_pipeline(tmp_path)
    assert family_of_pipeline(sdxl) == "SDXL"
    kinds = ("v1", "v2", "xl_base", "playground-v2-5", "sd35_large", "flux-dev", "flux-2-dev", "flux-3-image",
             "sana", "upscale", "unknown")
    assert [family_of_checkpoint(kind) for kind in kinds] == \
        ["SD 1.x/2.x", "SD 1.x/2.x", "SDXL", "SDXL", "SD 3.x", "Flux", "Flux 2", "Flux 3", "Sana",
                                                              "SD x4 upscaler", None]


def test_an_sdxl_refiner_is_refused_at_load_naming_it_and_the_base_to_load(studio, tmp_path, monkeypatch):
    """An SDXL refiner (its second text encoder alone, an aesthetic score where the base takes the target size) was
    loaded as SDXL, and then Text-to-Image, Image-to-Image and the explorer failed inside diffusers ("expects an
    added time embedding vector of length 72, but a vector of 80 was created"): it is refused at load, from the
    folder's index, from a pipeline read into memory (a hub id) and from a single file's type."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    base = build_tiny_sdxl_pipeline(tmp_path / "build")
    refiner = StableDiffusionXLImg2ImgPipeline(
        vae=base.vae, text_encoder=None, text_encoder_2=base.text_encoder_2, tokenizer=None,
        tokenizer_2=base.tokenizer_2, unet=base.unet, scheduler=base.scheduler, requires_aesthetics_score=True)
    folder = studio.models.models_dir / "tiny-refiner"
    refiner.save_pretrained(folder)
    assert family_of_pipeline(refiner) == family_of_folder(folder) == family_of_checkpoint("xl_refiner") == \
        "SDXL refiner"
    assert family_of_pipeline(base) == "SDXL"
    # a refiner read as a text-to-image pipeline (a hub id downloaded) has lost the flag; its UNet's five added ids
    # (8 numbers each here, beside the 32 of the pooled text) still name it
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    five_ids = {"projection_class_embeddings_input_dim": 8 * 5 + 32}
    unet = UNet2DConditionModel.from_config(dict(base.unet.config) | five_ids)
    assert family_of_pipeline(StableDiffusionXLPipeline(**(base.components | {"unet": unet}))) == "SDXL refiner"
    before = studio.models.current
    with pytest.raises(ModelLoadError, match="tiny-refiner is an SDXL refiner model \\(it refines an SDXL base model's "
                                             "images.*load the SDXL base model\\)"):
        studio.models.load(str(folder), from_ui=True)
    assert studio.models.current is before
    # from the hub's cache too: read as a text-to-image pipeline, the refiner's flag is dropped, so its index says it
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub"
    shutil.copytree(folder, cache / "models--studio--tiny-refiner" / "snapshots" / ("0" * 40))
    (cache / "models--studio--tiny-refiner" / "refs").mkdir()
    (cache / "models--studio--tiny-refiner" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="is an SDXL refiner model"):
        studio.models.load("studio/tiny-refiner")
    assert studio.models.current is before


def test_a_unet_model_that_reads_more_than_noise_and_a_prompt_is_refused_naming_its_kind(studio, tiny_model_dir,
                                                                                         tmp_path):
    """An InstructPix2Pix folder (its UNet reads the input image's latents beside the noise) was refused with
    diffusers' "AutoPipeline can't find a pipeline linked to StableDiffusionInstructPix2PixPipeline for None": it is
    refused from its index, before a weight is read, naming what it is. A pipeline of a kind the studio does not list
    and diffusers has no text-to-image form of is refused naming its class, and the loaded model keeps serving."""
    before = studio.models.current
    for kind, refused in (("StableDiffusionInstructPix2PixPipeline",
                           "ip2p is an InstructPix2Pix model \\(an instruction-editing model: its UNet reads the input "
                           "image's latents beside the noise\\)"),
                          ("StableDiffusionGLIGENPipeline",
                           "ip2p is a StableDiffusionGLIGENPipeline model, which has no text-to-image form in "
                           "diffusers, so no tab runs it. The studio's tabs run SD 1.x/2.x, SDXL")):
        folder = tmp_path / kind / "ip2p"
        shutil.copytree(tiny_model_dir, folder)
        index = json.loads((folder / "model_index.json").read_text())
        (folder / "model_index.json").write_text(json.dumps(index | {"_class_name": kind}))
        if kind.endswith("InstructPix2PixPipeline"):
            shutil.rmtree(folder / "unet")           # refused before any weight is read
        with pytest.raises(ModelLoadError, match=refused):
            studio.models.load(str(folder))
        assert studio.models.current is before
