"""A trained adapter as a LoRA file others read: `models/lora/<name>.safetensors` in the kohya / A1111 key
format (`lora_unet_<module path with _>.lora_down.weight`, `.lora_up.weight`, `.alpha`), with kohya's
`ss_*` metadata, the base model it was trained on among them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from pipelines.training.request import TrainingRequest


def save_kohya(lora_dir: Path, request: TrainingRequest, base_model, adapter_state: dict, steps: int) -> Path:
    """`lora_dir/<name>.safetensors`, written atomically and never with a non-finite tensor. `adapter_state`:
    peft's state of the adapter, its keys prefixed with the part they belong to (`unet.`, `text_encoder.`:
    kohya's `lora_unet_` and `lora_te1_`). `base_model` is the loaded model the run trained on (the one its
    training held), whose name and hash the file records."""
    from diffusers.utils import convert_state_dict_to_kohya
    from safetensors.torch import save_file

    state = convert_state_dict_to_kohya(adapter_state)
    # kohya's scale is alpha / rank, as peft's is lora_alpha / r; diffusers' converter writes alpha = rank (scale 1),
    # which is the trained scale only when alpha equals the rank
    state |= {key: torch.tensor(float(request.alpha)) for key in state if key.endswith(".alpha")}
    bad = [key for key, tensor in state.items() if not torch.isfinite(tensor).all()]
    if bad:
        raise ValueError(f"The trained LoRA has non-finite values ({len(bad)} tensors, e.g. {bad[0]}); it was not "
                         "written. Train again with a lower learning rate.")
    tags: dict[str, int] = {}
    for prompt in request.prompts():
        for tag in (part.strip() for part in prompt.split(",")):
            if tag:
                tags[tag] = tags.get(tag, 0) + 1
    side = base_model.native_side
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(request.rank),
                "ss_network_alpha": str(request.alpha), "ss_steps": str(steps),
                "ss_sd_model_name": base_model.name, "ss_sd_model_hash": str(base_model.model_hash or ""),
                "ss_resolution": str((side, side)),
                "ss_num_train_images": str(len(request.images)), "ss_learning_rate": str(request.learning_rate),
                "ss_tag_frequency": json.dumps({"dataset": tags}), "ss_trigger_words": request.trigger,
                "ss_training_method": request.method, "ss_class_prompt": request.class_prompt,
                "ss_prior_loss_weight": str(request.prior_loss_weight if request.method == "dreambooth" else 0),
                "studio_settings": json.dumps(request.settings())} | _base_version(base_model)
    lora_dir.mkdir(parents=True, exist_ok=True)
    path = lora_dir / f"{request.name}.safetensors"
    partial = path.with_suffix(".safetensors.partial")
    save_file({key: tensor.detach().contiguous().cpu() for key, tensor in state.items()}, str(partial),
              metadata=metadata)
    os.replace(partial, path)
    return path


def _base_version(base_model) -> dict[str, str]:
    """What kohya's and A1111's readers tell a LoRA's base family by: `ss_base_model_version` and modelspec's
    architecture (SDXL's, or SD 1.x's), `ss_v2` for SD 2.x (its 1024-wide text encoder), and
    `ss_v_parameterization` for a v-prediction model."""
    unet = base_model.pipeline.unet.config
    v_prediction = base_model.scheduler_config.get("prediction_type") == "v_prediction"
    if unet.get("addition_embed_type") == "text_time":
        return {"ss_base_model_version": "sdxl_base_v1-0", "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
                "ss_v2": "False", "ss_v_parameterization": str(v_prediction)}
    v2 = unet.get("cross_attention_dim") == 1024
    return {"ss_base_model_version": "sd_v2" if v2 else "sd_v1", "ss_v2": str(v2),
            "ss_v_parameterization": str(v_prediction),
            "modelspec.architecture": f"stable-diffusion-v2{'-768-v' if v_prediction else '-512'}/lora" if v2
            else "stable-diffusion-v1/lora"}
