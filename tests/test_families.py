"""Model families (pipelines/models/families.py) on real tiny models built in-process: SD 1.x-style and SDXL load;
the diffusion transformers (Flux, SD 3) that no tab runs yet are refused at load with their family named, from
the folder's index before a weight is read, and the model that was loaded keeps serving."""

from __future__ import annotations

import shutil

import pytest

from pipelines.core.paths import ModelLoadError
from pipelines.models.families import family_of_checkpoint, family_of_folder, family_of_pipeline
from pipelines.tasks.txt2img import Txt2ImgRequest
from recipe.tiny import build_tiny_flux_pipeline, build_tiny_sd3_pipeline, build_tiny_sdxl_pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("build,family,why", [
    (build_tiny_flux_pipeline, "Flux", "a diffusion transformer with flow matching, distilled guidance"),
    (build_tiny_sd3_pipeline, "SD 3.x", "a diffusion transformer \\(MMDiT\\) with flow matching"),
])
def test_a_transformer_family_is_refused_at_load_naming_it_and_the_model_stays(studio, build, family, why):
    models = studio.models
    before = models.current
    pipeline = build(models.models_dir / "build")
    folder = models.models_dir / f"tiny-{family.split()[0].lower()}"
    pipeline.save_pretrained(folder)
    assert family_of_pipeline(pipeline) == family_of_folder(folder) == family
    with pytest.raises(ModelLoadError, match=f"{folder.name} is a {family} model \\({why}.*not supported yet"):
        models.load(str(folder), from_ui=True)
    # from the index, before any weight is read: without its transformer's weights it is refused the same way
    shutil.rmtree(folder / "transformer")
    with pytest.raises(ModelLoadError, match=f"is a {family} model"):
        models.load(str(folder), from_ui=True)
    assert models.current is before
    assert studio.generate(Txt2ImgRequest(prompt="red apple", steps=2, width=64, height=64)).images


def test_the_unet_families_are_supported(studio, tiny_model_dir, tmp_path):
    assert family_of_folder(tiny_model_dir) == family_of_pipeline(studio.models.current.pipeline) == "SD 1.x/2.x"
    sdxl = build_tiny_sdxl_pipeline(tmp_path)
    assert family_of_pipeline(sdxl) == "SDXL"
    kinds = ("v1", "v2", "xl_base", "playground-v2-5", "sd35_large", "flux-dev", "flux-2-dev", "sana", "upscale",
             "unknown")
    assert [family_of_checkpoint(kind) for kind in kinds] == \
        ["SD 1.x/2.x", "SD 1.x/2.x", "SDXL", "SDXL", "SD 3.x", "Flux", "Flux 2", "Sana", "SD x4 upscaler", None]
