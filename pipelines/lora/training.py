"""Training a LoRA on the loaded model: a background job on the device worker.

The loop is diffusers' `train_text_to_image_lora.py` in substance, read top to bottom in `train_lora`:

1. Data: the images cropped around their centre to the model's native size; each caption prefixed
   with the trigger word. Latents (the VAE's posterior mean, and its mirror image for flips) and text
   embeddings are computed once: the VAE and the text encoder are frozen.
2. The LoRA: peft adapters on the UNet's attention projections (to_q, to_k, to_v, to_out), B
   zero-initialised and A Gaussian, so at step 0 the model is unchanged.
3. Each step: a batch of latents x_0, noise eps (plus an optional noise offset), t uniform; the forward
   process x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps; the UNet's eps-prediction; the loss
   || eps - eps_theta ||^2, weighted by min-SNR (Hang et al. 2023): min(SNR_t, gamma) / SNR_t;
   AdamW with a linear warm-up, then cosine decay; captions dropped (to "") at a rate, for CFG.
4. NaN guard: a non-finite loss or gradient skips the step and halves the learning rate; a third in a
   row rolls back to the last checkpoint. A file with a non-finite tensor is never written.
5. Every `checkpoint_every` steps the adapter, the optimiser and the step go to a checkpoint (safetensors
   and JSON) under `cache_dir/<name>/`, so a restarted studio resumes the same run; every
   `sample_every` steps, images at fixed prompts and seeds; between steps, `job.checkpoint()` lets a
   generation in, and a paused training waits there.
6. The LoRA is saved as `models/lora/<name>.safetensors` in the kohya / A1111 key format, with kohya's
   metadata; then its effect is measured: the same prompts and seeds at weight 0 and 1.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from pipelines.core.denoiser import prompt_embeddings
from pipelines.core.images import fit_image, to_pil
from pipelines.core.vae import decode, encode
from pipelines.tasks.txt2img import Txt2ImgRequest

TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
MAX_IMAGES = 500
MAX_TRAIN_STEPS = 20_000
NAN_STRIKES_BEFORE_ROLLBACK = 3
MAX_ROLLBACKS = 5
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][\w.-]{0,63}$")
SAMPLE_STEPS = 20


@dataclass(kw_only=True)
class LoraTrainingRequest:
    name: str                                  # the file: models/lora/<name>.safetensors
    images: list = field(repr=False)           # PIL images
    captions: list[str] | None = None          # one per image; None: none
    trigger: str = ""                          # put in front of every caption (and of the sample prompts)
    steps: int = 300
    rank: int = 8
    alpha: float = 8.0
    learning_rate: float = 5e-4
    warmup_steps: int = 20
    batch_size: int = 4
    min_snr_gamma: float = 5.0                 # 0: plain MSE
    noise_offset: float = 0.0
    caption_dropout: float = 0.1
    flip: bool = True
    seed: int = 0
    checkpoint_every: int = 50
    sample_every: int = 50
    sample_prompts: list[str] | None = None    # None: the first two captions

    def __post_init__(self):
        if not isinstance(self.name, str) or not NAME_PATTERN.match(self.name):
            raise ValueError(f"The LoRA's `name` must be 1 to 64 letters, digits, '.', '-' or '_' (it becomes the "
                             f"file name) but is {self.name!r}.")
        if not self.images or not all(isinstance(image, Image.Image) for image in self.images):
            raise ValueError("Give the training at least one image.")
        if len(self.images) > MAX_IMAGES:
            raise ValueError(f"At most {MAX_IMAGES} images train one LoRA here, but {len(self.images)} were given.")
        if self.captions is not None and len(self.captions) != len(self.images):
            raise ValueError(f"{len(self.captions)} captions for {len(self.images)} images: give one per image.")
        for name, value, low, high in (("steps", self.steps, 1, MAX_TRAIN_STEPS), ("rank", self.rank, 1, 128),
                                       ("batch_size", self.batch_size, 1, 64), ("warmup_steps", self.warmup_steps, 0,
                                                                                MAX_TRAIN_STEPS),
                                       ("checkpoint_every", self.checkpoint_every, 1, MAX_TRAIN_STEPS),
                                       ("sample_every", self.sample_every, 0, MAX_TRAIN_STEPS)):
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"`{name}` must be a whole number from {low} to {high} but is {value!r}.")
        for name, value, low, high in (("learning_rate", self.learning_rate, 1e-7, 1e-1), ("alpha", self.alpha, 0.01, 1024),
                                       ("caption_dropout", self.caption_dropout, 0, 1),
                                       ("noise_offset", self.noise_offset, 0, 1), ("min_snr_gamma", self.min_snr_gamma, 0, 100)):
            if not low <= value <= high:
                raise ValueError(f"`{name}` must be between {low:g} and {high:g} but is {value!r}.")

    def prompts(self) -> list[str]:
        """Each image's caption with the trigger word in front."""
        captions = self.captions or [""] * len(self.images)
        return [", ".join(part for part in (self.trigger.strip(), caption.strip()) if part) for caption in captions]

    def samples(self) -> list[str]:
        return self.sample_prompts or list(dict.fromkeys(self.prompts()))[:2]

    def settings(self) -> dict:
        return {key: value for key, value in vars(self).items() if key not in ("images", "captions")}

    def fingerprint(self) -> dict:
        """What a checkpoint must match to be resumed: the settings that shape the training, and the data."""
        import hashlib

        digest = hashlib.sha256()
        for image, prompt in zip(self.images, self.prompts()):
            digest.update(image.convert("RGB").tobytes())
            digest.update(prompt.encode())
        shaping = {key: value for key, value in self.settings().items()
                   if key not in ("checkpoint_every", "sample_every", "sample_prompts")}
        return json.loads(json.dumps(shaping | {"data": digest.hexdigest()}))


@dataclass
class LossPoint:
    step: int
    loss: float
    learning_rate: float
    seconds: float            # since the training (or its resumption) started


@dataclass
class Samples:
    step: int
    prompts: list[str]
    images: list[Image.Image]


@dataclass
class TrainingWarning:
    step: int
    message: str


@dataclass
class LoraTrainingResult:
    path: Path
    steps: int
    final_loss: float
    effect: float             # mean |Δ| (0..255) between weight 0 and weight 1 on the sample prompts
    moved: bool
    # how far the samples' mean feature (the judge classifier of recipe/evaluate.py) is from the training
    # images' at weight 0 and at weight 1: closer means the LoRA pulls towards what it was shown
    feature_distance_before: float
    feature_distance_after: float
    before: list[Image.Image]
    after: list[Image.Image]
    stopped: bool
    warnings: list[str]


EFFECT_THRESHOLD = 2.0        # mean |Δ| in pixel values below which a LoRA is called "no visible effect"


def train_lora(models, request: LoraTrainingRequest, job, *, cache_dir: Path) -> LoraTrainingResult:
    """Run (or resume) the training described by `request`, as job `job`, on the device thread."""
    from diffusers import DDPMScheduler

    model = models.require()
    pipeline = model.pipeline
    if pipeline.unet.config.addition_embed_type is not None:
        raise ValueError(f"LoRA training here takes SD 1.x/2.x-style models; {model.name} (SDXL and kin) is not "
                         "supported yet.")
    if model.scheduler_config.get("prediction_type", "epsilon") != "epsilon":
        raise ValueError(f"LoRA training here learns an eps-prediction; {model.name} predicts "
                         f"{model.scheduler_config['prediction_type']}, which it does not support yet.")
    models.use_loras([])      # no other LoRA may shape the cached embeddings or the "before" samples
    # the training schedule itself (not the sampler the last generation used): q(x_t | x_0) at any t
    unet, scheduler = pipeline.unet, DDPMScheduler.from_config(model.scheduler_config)
    device, dtype = pipeline._execution_device, unet.dtype
    run_dir = cache_dir / request.name
    adapter = "training_" + re.sub(r"\W", "_", request.name)
    if any(name.startswith("training_") for name in (getattr(unet, "peft_config", None) or {})):
        raise ValueError("Another LoRA is training on this model; stop it (or let it finish) first.")
    generator = torch.Generator().manual_seed(request.seed)

    # 1. Data, cached once: latents of each image and of its mirror image, and the text embeddings
    side = model.native_side or 512
    pictures = [fit_image(image, side, side) for image in request.images]
    with torch.no_grad():
        latents = torch.cat([encode(pipeline.vae, _tensor(picture).to(device)) for picture in pictures]).to(dtype)
        mirrored = torch.cat([encode(pipeline.vae, _tensor(ImageOps.mirror(picture)).to(device))
                              for picture in pictures]).to(dtype)
        texts = request.prompts()
        empty = _embed(pipeline, "", device)
        # captions longer than the tokenizer's window are encoded in windows (pipelines/prompts.py); pad the
        # shorter ones with empty windows, as the prompt/negative pair is padded, so they stack
        encoded = [_embed(pipeline, text, device) for text in texts]
        longest = max(item.shape[1] for item in encoded)
        embeddings = torch.cat([_pad(item, empty, longest) for item in encoded])
        empty = _pad(empty, empty, longest)

    # 2. The LoRA: B zero, A Gaussian, on the attention projections (removed again however the run ends)
    parameters = add_training_adapter(unet, request, adapter)
    try:
        return _train(models, request, job, pipeline, scheduler, adapter, parameters, run_dir, generator,
                      _Data(pictures, latents, mirrored, embeddings, empty))
    finally:
        unet.eval()
        for parameter in unet.parameters():
            parameter.requires_grad_(False)
        _remove_adapter(unet, adapter)


def _train(models, request, job, pipeline, scheduler, adapter, parameters, run_dir, generator,
           data: _Data) -> LoraTrainingResult:
    """Steps 3 to 6 of the module's docstring."""
    unet, device = pipeline.unet, pipeline._execution_device
    optimizer = torch.optim.AdamW(parameters, lr=request.learning_rate, weight_decay=1e-2)
    start, warnings, rollbacks = _resume(run_dir, request, unet, adapter, optimizer), [], 0
    if start:
        warnings.append(f"Resumed at step {start} from {run_dir}.")
        generator.manual_seed(request.seed + start)
    before = _sample_images(pipeline, request, enabled=False) if request.sample_every else []
    if before:
        job.emit(Samples(0, request.samples(), before))

    alphas_cumprod = scheduler.alphas_cumprod.to(device)
    step, strikes, learning_rate, loss_value, stopped = start, 0, request.learning_rate, float("nan"), False
    started = time.perf_counter()
    unet.train()
    while step < request.steps:
        # 3. One step
        rate = learning_rate * _schedule(step, request)
        for group in optimizer.param_groups:
            group["lr"] = rate
        loss = _loss(unet, scheduler, alphas_cumprod, request, generator, data)
        loss.backward()

        # 4. NaN guard
        finite = torch.isfinite(loss) and all(p.grad is None or torch.isfinite(p.grad).all() for p in parameters)
        if not finite:
            optimizer.zero_grad(set_to_none=True)
            strikes += 1
            learning_rate /= 2
            message = f"Step {step}: the loss or a gradient was not finite; step skipped, learning rate halved."
            if strikes >= NAN_STRIKES_BEFORE_ROLLBACK:
                rollbacks += 1
                if rollbacks > MAX_ROLLBACKS:
                    raise ValueError(f"The loss kept turning non-finite ({rollbacks} roll-backs); nothing was "
                                     "saved. Lower the learning rate or check the images.")
                step = _resume(run_dir, request, unet, adapter, optimizer)
                if step == 0:           # no checkpoint yet: start the LoRA and the optimiser afresh
                    parameters = add_training_adapter(unet, request, adapter)
                    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=1e-2)
                    unet.train()
                strikes = 0
                message += f" {NAN_STRIKES_BEFORE_ROLLBACK} in a row: rolled back to step {step}."
            warnings.append(message)
            job.emit(TrainingWarning(step, message))
            if _yield_to_others(job, unet, adapter):
                stopped = True
                break
            continue
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        strikes, step, loss_value = 0, step + 1, float(loss)
        seconds = time.perf_counter() - started
        job.emit(LossPoint(step, loss_value, rate, seconds))
        speed = (step - start) / seconds
        job.report(step, request.steps, f"loss {loss_value:.4f} · {speed:.2f} steps/s · "
                                        f"about {(request.steps - step) / speed:.0f} s to go")

        # 5. Checkpoints, samples, and room for other jobs
        if step % request.checkpoint_every == 0 or step == request.steps:
            _save_checkpoint(run_dir, request, unet, adapter, optimizer, step)
        if request.sample_every and step % request.sample_every == 0 and step < request.steps:
            unet.eval()
            job.emit(Samples(step, request.samples(), _sample_images(pipeline, request, enabled=True,
                                                                     adapter=adapter)))
            unet.train()
        if _yield_to_others(job, unet, adapter):
            stopped = True
            break
    unet.eval()

    # 6. The file, then its effect
    return _finish(models, request, pipeline, adapter, run_dir, data.pictures, step=step, loss=loss_value,
                   stopped=stopped, before=before, warnings=warnings)


def _loss(unet, scheduler, alphas_cumprod, request: LoraTrainingRequest, generator, data: "_Data") -> torch.Tensor:
    """One batch's loss: x_t from the forward process q(x_t | x_0), the eps-prediction's squared error,
    weighted by min-SNR: min(SNR_t, gamma) / SNR_t."""
    device, dtype, size = data.latents.device, data.latents.dtype, request.batch_size
    index = torch.randint(0, len(data.pictures), (size,), generator=generator)
    flip = torch.rand(size, generator=generator) < 0.5 if request.flip else torch.zeros(size, dtype=torch.bool)
    x0 = torch.where(flip.view(-1, 1, 1, 1).to(device), data.mirrored[index], data.latents[index])
    noise = torch.randn(x0.shape, generator=generator).to(device, dtype)
    if request.noise_offset:
        noise = noise + request.noise_offset * torch.randn(x0.shape[0], x0.shape[1], 1, 1,
                                                           generator=generator).to(device, dtype)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (size,), generator=generator).to(device)
    drop = torch.rand(size, generator=generator) < request.caption_dropout       # learn the unconditional too
    context = torch.where(drop.view(-1, 1, 1).to(device), data.empty.expand_as(data.embeddings[index]),
                          data.embeddings[index])
    x_t = scheduler.add_noise(x0, noise, t)
    prediction = unet(x_t, t, encoder_hidden_states=context).sample
    loss = (prediction.float() - noise.float()).square().mean(dim=(1, 2, 3))
    if request.min_snr_gamma:
        snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
        loss = loss * torch.clamp(snr, max=request.min_snr_gamma) / snr
    return loss.mean()


def _finish(models, request, pipeline, adapter: str, run_dir: Path, pictures, *, step: int, loss: float,
            stopped: bool, before: list, warnings: list[str]) -> LoraTrainingResult:
    """The file (a finished run needs its checkpoint no more), then the LoRA's effect on the samples."""
    path = save_kohya(models, request, pipeline.unet, adapter, step)
    if not stopped:
        for leftover in ("checkpoint.safetensors", "checkpoint.json"):
            (run_dir / leftover).unlink(missing_ok=True)
    after = _sample_images(pipeline, request, enabled=True, adapter=adapter)
    before = before or _sample_images(pipeline, request, enabled=False)
    effect = float(np.mean([np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean()
                            for a, b in zip(after, before)]))
    distance_before, distance_after = feature_distances(pictures, before, after)
    if effect < EFFECT_THRESHOLD:
        warnings.append(f"This LoRA barely changes the images (mean change {effect:.2f} of 255 on the sample "
                        "prompts): train longer, raise the learning rate, or use more distinctive images.")
    return LoraTrainingResult(path=path, steps=step, final_loss=loss, effect=effect, moved=effect >= EFFECT_THRESHOLD,
                              feature_distance_before=distance_before, feature_distance_after=distance_after,
                              before=before, after=after, stopped=stopped, warnings=warnings)


@dataclass
class _Data:
    """The training data, computed once: the cropped images, their latents (and their mirror images'),
    each caption's text embedding, and the empty caption's."""
    pictures: list
    latents: torch.Tensor
    mirrored: torch.Tensor
    embeddings: torch.Tensor
    empty: torch.Tensor


def feature_distances(training: list, before: list, after: list) -> tuple[float, float]:
    """|mean feature(samples) - mean feature(training images)| at weight 0 and at weight 1, in the feature
    space of the emoji judge that recipe/evaluate.py trained on real emoji (images resized to its 64 px)."""
    from recipe.evaluate import as_array, features, load_judge

    judge, _ = load_judge()
    size = judge.image_size
    centre = features(judge, as_array(training, size)).mean(axis=0)
    return tuple(float(np.linalg.norm(features(judge, as_array(images, size)).mean(axis=0) - centre))
                 for images in (before, after))


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_FILE_BYTES = 50 << 20
MAX_DATASET_BYTES = 1 << 30


@dataclass
class TrainingImage:
    name: str
    image: Image.Image
    caption: str


def dataset_folder(spec: str, models_dir: Path) -> list[Path]:
    """The files of a dataset folder, which must lie under the app's models/ folder."""
    folder = (models_dir / spec).resolve() if not Path(spec).is_absolute() else Path(spec).resolve()
    if not folder.is_relative_to(models_dir.resolve()):
        raise ValueError(f"{spec!r} is outside {models_dir}: put the dataset folder under models/ (e.g. "
                         "models/datasets/my-style) and name it relative to models/.")
    if not folder.is_dir():
        raise ValueError(f"No folder {folder}.")
    return sorted(path for path in folder.iterdir() if path.is_file())


def read_dataset(paths: list[str | Path]) -> list[TrainingImage]:
    """Images from files and .zip archives (read in memory, nothing extracted); each caption from a .txt
    file of the same name, or else from the file name ("red_apple-2.png" -> "red apple")."""
    import io
    import zipfile

    files: dict[str, bytes] = {}

    def add(name: str, size: int, read) -> None:
        if name in files:
            raise ValueError(f"Two files are named {name}; rename one (captions pair with images by name).")
        if size > MAX_FILE_BYTES or sum(map(len, files.values())) + size > MAX_DATASET_BYTES:
            raise ValueError(f"{name} makes the dataset too big: at most {MAX_FILE_BYTES >> 20} MB a file and "
                             f"{MAX_DATASET_BYTES >> 20} MB in all.")
        files[name] = read()

    wanted = IMAGE_SUFFIXES + (".txt",)
    for path in map(Path, paths):
        if path.suffix.lower() == ".zip":
            with zipfile.ZipFile(path) as archive:
                for info in archive.infolist():
                    if not info.is_dir() and Path(info.filename).suffix.lower() in wanted:
                        add(Path(info.filename).name, info.file_size, lambda info=info: archive.read(info))
        elif path.suffix.lower() in wanted:
            add(path.name, path.stat().st_size, path.read_bytes)
    images = [name for name in files if Path(name).suffix.lower() in IMAGE_SUFFIXES]
    if len(images) > MAX_IMAGES:
        raise ValueError(f"At most {MAX_IMAGES} images train one LoRA here, but {len(images)} were given.")
    dataset = []
    for name, data in sorted(files.items()):
        if Path(name).suffix.lower() not in IMAGE_SUFFIXES:
            continue
        try:
            image = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))   # phone photos stand upright
        except Exception as error:
            raise ValueError(f"{name} is not an image this studio can read ({error}).") from error
        sidecar = files.get(Path(name).stem + ".txt")
        caption = sidecar.decode("utf-8", errors="replace").strip() if sidecar is not None else \
            re.sub(r"[-_\d]+", " ", Path(name).stem).strip()
        dataset.append(TrainingImage(name=name, image=image.convert("RGB"), caption=caption))
    if not dataset:
        raise ValueError("No images among the files given (png, jpg, webp or bmp, or a .zip of them).")
    return dataset


def _yield_to_others(job, unet, adapter: str) -> bool:
    """Let queued generations run (and wait while paused); if one ran, put the training adapter back in
    charge, whatever it switched. Returns whether the job was asked to stop."""
    if job.checkpoint():
        unet.enable_adapters()
        unet.set_adapters([adapter])
        unet.train()
    return job.stop.is_set()


def add_training_adapter(unet, request: LoraTrainingRequest, adapter: str) -> list:
    """A fresh peft LoRA on the UNet's attention (B zero, A Gaussian: peft's "gaussian" init), the only
    parameters that train; returns them."""
    from peft import LoraConfig

    _remove_adapter(unet, adapter)
    with torch.random.fork_rng():          # A's Gaussian comes from the seed, and the global RNG is left alone
        torch.manual_seed(request.seed)
        unet.add_adapter(LoraConfig(r=request.rank, lora_alpha=request.alpha, init_lora_weights="gaussian",
                                    target_modules=TARGET_MODULES), adapter_name=adapter)
    unet.enable_adapters()
    unet.set_adapters([adapter])
    for name, parameter in unet.named_parameters():
        parameter.requires_grad_(adapter in name)
    parameters = [parameter for name, parameter in unet.named_parameters() if adapter in name]
    for parameter in parameters:        # trained in fp32 whatever the model's dtype: AdamW's eps is 0 in fp16
        parameter.data = parameter.data.float()
    return parameters


def _schedule(step: int, request: LoraTrainingRequest) -> float:
    """Linear warm-up, then cosine decay to 10%."""
    if step < request.warmup_steps:
        return (step + 1) / request.warmup_steps
    progress = (step - request.warmup_steps) / max(1, request.steps - request.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _tensor(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)[None]


def _embed(pipeline, text: str, device) -> torch.Tensor:
    request = Txt2ImgRequest(prompt=text, guidance_scale=1.0)
    # captions are read literally, as kohya's trainer reads them unless told otherwise, and as the sample
    # images' prompts are
    embeddings, _ = prompt_embeddings(pipeline, request, device, cfg=False, emphasis=False)
    return embeddings


def _pad(embedding: torch.Tensor, empty: torch.Tensor, length: int) -> torch.Tensor:
    windows = (length - embedding.shape[1]) // empty.shape[1]
    return torch.cat([embedding, *[empty] * windows], dim=1)


def _remove_adapter(unet, adapter: str) -> None:
    if adapter in (getattr(unet, "peft_config", None) or {}):
        unet.delete_adapters([adapter])


def _sample_images(pipeline, request: LoraTrainingRequest, *, enabled: bool, adapter: str | None = None) -> list:
    """The sample prompts at fixed seeds, with the adapter in training on or off."""
    unet = pipeline.unet
    if enabled:
        unet.enable_adapters()
        unet.set_adapters([adapter])
    elif getattr(unet, "peft_config", None):
        unet.disable_adapters()
    images = []
    with torch.no_grad():
        for number, prompt in enumerate(request.samples()):
            latents = pipeline(prompt, num_inference_steps=SAMPLE_STEPS, output_type="latent",
                               generator=torch.Generator().manual_seed(request.seed + number)).images
            images.append(to_pil(decode(pipeline.vae, latents)[0])[0])
    if getattr(unet, "peft_config", None):
        unet.enable_adapters()
    return images


# ----------------------------------------------------------------------------- files


def _adapter_state(unet, adapter: str) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict
    return get_peft_model_state_dict(unet, adapter_name=adapter)


def save_kohya(models, request: LoraTrainingRequest, unet, adapter: str, steps: int) -> Path:
    """models/lora/<name>.safetensors in the kohya / A1111 key format with kohya's metadata, written
    atomically, and never with a non-finite tensor."""
    from diffusers.utils import convert_state_dict_to_kohya
    from safetensors.torch import save_file

    state = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in _adapter_state(unet, adapter).items()})
    bad = [key for key, tensor in state.items() if not torch.isfinite(tensor).all()]
    if bad:
        raise ValueError(f"The trained LoRA has non-finite values ({len(bad)} tensors, e.g. {bad[0]}); it was not "
                         "written. Train again with a lower learning rate.")
    model = models.require()
    tags: dict[str, int] = {}
    for prompt in request.prompts():
        for tag in (part.strip() for part in prompt.split(",")):
            if tag:
                tags[tag] = tags.get(tag, 0) + 1
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(request.rank),
                "ss_network_alpha": str(request.alpha), "ss_steps": str(steps),
                "ss_sd_model_name": model.name, "ss_sd_model_hash": str(model.model_hash or ""),
                "ss_resolution": str((model.native_side, model.native_side)),
                "ss_num_train_images": str(len(request.images)), "ss_learning_rate": str(request.learning_rate),
                "ss_tag_frequency": json.dumps({"dataset": tags}), "ss_trigger_words": request.trigger,
                "modelspec.architecture": "stable-diffusion-v1/lora", "studio_settings": json.dumps(request.settings())}
    folder = models.lora_dir
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{request.name}.safetensors"
    partial = path.with_suffix(".safetensors.partial")
    save_file({key: tensor.detach().contiguous().cpu() for key, tensor in state.items()}, str(partial),
              metadata=metadata)
    os.replace(partial, path)
    return path


def _save_checkpoint(run_dir: Path, request: LoraTrainingRequest, unet, adapter: str, optimizer, step: int) -> None:
    """The adapter, AdamW's moments and the step, as safetensors and JSON (no pickles), written atomically."""
    from safetensors.torch import save_file

    run_dir.mkdir(parents=True, exist_ok=True)
    tensors = {f"adapter.{key}": value.detach().contiguous().cpu() for key, value in _adapter_state(unet, adapter).items()}
    for number, parameter in enumerate(p for group in optimizer.param_groups for p in group["params"]):
        for key, value in optimizer.state.get(parameter, {}).items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{number}.{key}"] = value.detach().contiguous().cpu().reshape(value.shape or (1,))
    partial = run_dir / "checkpoint.safetensors.partial"
    save_file(tensors, str(partial))
    os.replace(partial, run_dir / "checkpoint.safetensors")
    info = run_dir / "checkpoint.json.partial"
    info.write_text(json.dumps({"step": step, "fingerprint": request.fingerprint()}))
    os.replace(info, run_dir / "checkpoint.json")


def _resume(run_dir: Path, request: LoraTrainingRequest, unet, adapter: str, optimizer) -> int:
    """The step of this run's last checkpoint (0 when there is none, or it was made with other settings)."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    info_path, tensors_path = run_dir / "checkpoint.json", run_dir / "checkpoint.safetensors"
    if not (info_path.exists() and tensors_path.exists()):
        return 0
    info = json.loads(info_path.read_text())
    if info.get("fingerprint") != request.fingerprint() or info["step"] >= request.steps:
        return 0          # another run's (other data or settings), or a finished one: start afresh
    tensors = load_file(str(tensors_path))
    set_peft_model_state_dict(unet, {key[len("adapter."):]: value for key, value in tensors.items()
                                     if key.startswith("adapter.")}, adapter_name=adapter)
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    for number, parameter in enumerate(parameters):
        state = {key.split(".", 2)[2]: value for key, value in tensors.items()
                 if key.startswith(f"optimizer.{number}.")}
        if state:
            state["step"] = state["step"].reshape(())      # torch keeps AdamW's step count on the CPU
            optimizer.state[parameter] = {key: value if key == "step" else value.to(parameter.device)
                                          for key, value in state.items()}
    return int(info["step"])
