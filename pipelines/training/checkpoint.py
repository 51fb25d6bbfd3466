"""A training's checkpoints: every `checkpoint_every` steps the adapter, AdamW's moments and the step go to
`<cache_dir>/<name>/checkpoint.safetensors`, the step and the run's fingerprint in its metadata (one file, no
pickles, written whole), so a stopped or restarted run
resumes where it was. A checkpoint is resumed only by the same run: the same settings that shape the
training, the same data, and the same base model (its name and hash); anything else starts at step 0,
and says why."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from pipelines.core.transformers import denoiser_of
from pipelines.training.request import TrainingRequest

CHECKPOINT = "checkpoint.safetensors"
NOT_SHAPING = ("checkpoint_every", "sample_every", "sample_prompts", "sample_steps")   # settings a run may change and resume


def base_model_identity(model) -> dict:
    """What names the base model a run trains on: its name, and its weights file's hash (A1111's), or, for a
    model with no file (built in memory), a hash of its UNet's (or transformer's) config and weights. Call it before the
    training's adapter is added: LoRA layers (a loaded LoRA's too) are left out, the base weights are not."""
    file_hash = model.model_hash
    if file_hash:
        return {"name": model.name, "hash": file_hash}
    denoiser = denoiser_of(model.pipeline)
    digest = hashlib.sha256(json.dumps(dict(denoiser.config), sort_keys=True, default=str).encode())
    for name, parameter in denoiser.named_parameters():
        if "lora_" not in name:
            digest.update(parameter.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    kind = "unet" if getattr(model.pipeline, "unet", None) is not None else "transformer"
    return {"name": model.name, "hash": f"{kind}-{digest.hexdigest()[:16]}"}


def fingerprint(request: TrainingRequest, base_model: dict) -> dict:
    """What a checkpoint must match to be resumed: the settings that shape the training, the data (each image
    and its prompt), and the base model."""
    digest = hashlib.sha256()
    for image, prompt, repeats in zip(request.images, request.prompts(), request.image_repeats()):
        digest.update(image.convert("RGB").tobytes())
        digest.update(f"{prompt}\x00{repeats}".encode())
    shaping = {key: value for key, value in request.settings().items() if key not in NOT_SHAPING}
    return json.loads(json.dumps(shaping | {"data": digest.hexdigest(), "base_model": base_model}))


def save_checkpoint(run_dir: Path, fingerprint_: dict, method, optimizer, step: int) -> None:
    """What the method trains (methods.py: an adapter's state, or token vectors), AdamW's moments and the step,
    as one safetensors file with the step and the fingerprint in its metadata (no pickles), written atomically."""
    from safetensors.torch import save_file

    run_dir.mkdir(parents=True, exist_ok=True)
    tensors = {f"adapter.{key}": value.detach().contiguous().cpu() for key, value in method.state().items()}
    for number, parameter in enumerate(p for group in optimizer.param_groups for p in group["params"]):
        for key, value in optimizer.state.get(parameter, {}).items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{number}.{key}"] = value.detach().contiguous().cpu().reshape(value.shape or (1,))
    partial = run_dir / f"{CHECKPOINT}.partial"
    save_file(tensors, str(partial), metadata={"step": str(step), "fingerprint": json.dumps(fingerprint_)})
    os.replace(partial, run_dir / CHECKPOINT)


def resume(run_dir: Path, fingerprint_: dict, steps: int, method, optimizer) -> tuple[int, str | None]:
    """(the step of this run's last checkpoint, loaded into the method and the optimiser; a note when a
    checkpoint was there but is not this run's). Step 0 when there is none, it is another run's, or it is
    a finished one."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    tensors_path = run_dir / CHECKPOINT
    if not tensors_path.exists():
        return 0, None
    with safe_open(str(tensors_path), framework="pt") as reader:
        metadata = reader.metadata() or {}
    saved, step = json.loads(metadata.get("fingerprint", "{}")), int(metadata.get("step", 0))
    if saved != fingerprint_:
        return 0, f"Started at step 0: the checkpoint in {run_dir} is another run's ({_difference(saved, fingerprint_)})."
    if step >= steps:
        return 0, None             # a finished run's: start afresh
    tensors = load_file(str(tensors_path))
    method.load_state({key[len("adapter."):]: value for key, value in tensors.items() if key.startswith("adapter.")})
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    for number, parameter in enumerate(parameters):
        state = {key.split(".", 2)[2]: value for key, value in tensors.items()
                 if key.startswith(f"optimizer.{number}.")}
        if state:
            state["step"] = state["step"].reshape(())      # torch keeps AdamW's step count on the CPU
            optimizer.state[parameter] = {key: value if key == "step" else value.to(parameter.device)
                                          for key, value in state.items()}
    return step, None


def _difference(saved: dict, wanted: dict) -> str:
    """What sets a checkpoint's run apart from this one, in words."""
    if saved.get("base_model") != wanted.get("base_model"):
        made_on = saved.get("base_model") or {"name": "an unrecorded model", "hash": "?"}
        here = wanted["base_model"]
        return (f"made on the base model {made_on['name']} ({made_on['hash']}), this run is on {here['name']} "
                f"({here['hash']})")
    if saved.get("data") != wanted.get("data"):
        return "made on other images or captions"
    changed = sorted(key for key in wanted if saved.get(key) != wanted[key])
    return "made with other settings: " + ", ".join(changed)


def remove_checkpoint(run_dir: Path) -> None:
    """A finished run needs its checkpoint no more."""
    (run_dir / CHECKPOINT).unlink(missing_ok=True)
