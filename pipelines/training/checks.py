"""What a training checks of the loaded model and the installation before it reads any data: the family and
prediction type it can train, the peft release a text-encoder LoRA needs, the batch's split over processes."""

from __future__ import annotations

from pipelines.core.families import family_of_pipeline
from pipelines.core.transformers import is_transformer
from pipelines.models.memory import MemoryMode
from pipelines.training.flow import FLOW_TRAINING_FAMILIES
from pipelines.training.request import METHOD_NAMES, TrainingRequest


def check_model(models, model, request: TrainingRequest) -> None:
    """Refuse, before any data is read, a training the loaded model or this installation cannot do, saying why."""
    name = METHOD_NAMES[request.method]
    if is_transformer(model.pipeline):
        family = family_of_pipeline(model.pipeline)
        if family not in FLOW_TRAINING_FAMILIES:
            raise ValueError(f"{name} training here runs on UNet models (SD 1.x/2.x, SDXL) and, as a LoRA or a "
                             f"DreamBooth LoRA, on SD 3.x, Flux, Flux 2 and Sana; {model.name} is a {family} model, "
                             "which it does not train yet.")
        if run_processes() > 1:
            raise ValueError(f"On {family} models the LoRA trains in one process; data-parallel training (several "
                             "processes) runs the UNet loop. Launch it as one process.")
        if request.method == "textual_inversion" or request.train_text_encoder:
            what = name if request.method == "textual_inversion" else f"{name} with the text encoders"
            raise ValueError(f"On {family} models the studio trains a LoRA on the transformer (flow matching), alone "
                             f"or as DreamBooth; {what} trains UNet models (SD 1.x/2.x, SDXL) only. Pick LoRA or "
                             "DreamBooth, with the text encoders off.")
        return
    if request.method == "textual_inversion" and models.memory.mode is MemoryMode.SEQUENTIAL:
        raise ValueError("Textual inversion writes its token's rows into the text encoder, which sequential offload "
                         "keeps off the device; pick another memory mode (Models & memory) to train one.")
    kind = model.pipeline.unet.config.addition_embed_type
    if kind == "text_time" and request.method == "textual_inversion":
        raise ValueError(f"Textual inversion here trains embeddings for models with one CLIP text encoder (SD 1.x/"
                         f"2.x); {model.name} is SDXL-style, with two. Train a LoRA or a DreamBooth LoRA on it.")
    if kind not in (None, "text_time"):
        raise ValueError(f"{name} training here takes SD 1.x/2.x-style and SDXL models; {model.name} adds `{kind}` "
                         "conditioning to its UNet, which it does not support yet.")
    if model.scheduler_config.get("prediction_type", "epsilon") not in ("epsilon", "v_prediction"):
        raise ValueError(f"{name} training here learns an eps- or a v-prediction; {model.name} predicts "
                         f"{model.scheduler_config['prediction_type']}, which it does not support yet.")
    if request.train_text_encoder and kind == "text_time":
        raise ValueError(f"Training the text encoder too takes models with one CLIP text encoder (SD 1.x/2.x); "
                         f"{model.name} is SDXL-style, with two. Turn `train_text_encoder` off: the UNet's LoRA "
                         "trains alone.")
    if request.train_text_encoder:
        _check_text_encoder_adapters()
    processes = run_processes()
    if request.batch_size % processes:
        raise ValueError(f"`batch_size` {request.batch_size} does not split over {processes} processes; make it a "
                         "multiple of the number of processes.")


def _check_text_encoder_adapters() -> None:
    """A LoRA on the text encoder goes through transformers' peft integration (diffusers loads a LoRA file's
    text-encoder part through it too), which names the peft release it needs."""
    from importlib.metadata import version

    from packaging.version import Version
    from transformers.integrations.peft import MIN_PEFT_VERSION

    if Version(version("peft")) < Version(MIN_PEFT_VERSION):
        raise ValueError(f"Training the text encoder needs peft >= {MIN_PEFT_VERSION} with transformers "
                         f"{version('transformers')} (installed: peft {version('peft')}), and so does loading a LoRA "
                         "file's text-encoder part. Turn `train_text_encoder` off (the UNet's LoRA trains alone), or "
                         f"upgrade peft.")


def run_processes() -> int:
    from accelerate import PartialState
    return PartialState().num_processes
