"""Text-to-image and image-to-image generation: the one service the UI and the API call.

`Generator.run(request, stop=event)` is an iterator of events, so a UI can stream:

    Preview(...)        every `preview_every` steps, when asked for
    GeneratedImage(...) each finished image, already saved with its metadata
    GenerationDone(...) last: everything, the seed used, whether it was stopped, notes

The diffusers pipeline runs in a worker thread; its `callback_on_step_end` posts previews to a
queue and turns a set `stop` event into the pipeline's own interrupt at the next step.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image

from pipelines import metadata
from pipelines.memory import is_out_of_memory
from pipelines.models import ModelManager
from pipelines.preview import LatentPreviewer, decode_latents, to_pil
from pipelines.prompts import prompt_arguments
from pipelines.requests import GeneratedImage, GenerationDone, GenerationRequest, Preview
from pipelines.samplers import make_scheduler
from pipelines.streaming import stream_events

STUDIO_VERSION = "diffusion-studio 0.1.0"


class Generator:
    def __init__(self, models: ModelManager, outputs_dir: Path | None):
        self.models = models
        self.outputs_dir = outputs_dir      # None: keep images in memory only (tests, benchmarks)
        self._previewers: dict[int, LatentPreviewer] = {}
        self._lock = threading.Lock()       # one generation at a time on this process's device

    # -- public ----------------------------------------------------------------------------
    def run(self, request: GenerationRequest, *, stop: threading.Event | None = None) -> Iterator:
        """Generate, yielding Preview / GeneratedImage events and finally one GenerationDone."""
        stop = stop or threading.Event()
        yield from stream_events(lambda emit: self._generate(request, stop, emit))

    def generate(self, request: GenerationRequest, *, stop: threading.Event | None = None) -> GenerationDone:
        """Run to completion and return only the final event."""
        done = None
        for event in self.run(request, stop=stop):
            done = event
        return done

    # -- the work --------------------------------------------------------------------------
    def _generate(self, request: GenerationRequest, stop: threading.Event, emit) -> GenerationDone:
        with self._lock:
            # 1. Check inputs and resolve the seed
            request = request.resolved()
            model = self.models.require()
            pipeline = self.models.pipeline(request.task)
            # diffusers' SD pipelines require multiples of 8 whatever the VAE's factor
            check_size(request.width, request.height, max(8, pipeline.vae_scale_factor))
            messages: list[str] = []
            if request.task == "img2img" and request.strength == 0.0:
                return self._unchanged_input(request, model, emit)
            if request.task == "img2img" and int(request.steps * request.strength) < 1:
                raise ValueError(f"`strength` {request.strength} × {request.steps} steps leaves no denoising step; "
                                 "raise the steps or the strength (or use strength 0 to keep the image).")

            # 2. Sampler from the model's own scheduler config
            pipeline.scheduler = make_scheduler(request.sampler, model.scheduler_config)

            # 3. Prompts (chunked when longer than the tokenizer window)
            device = pipeline._execution_device
            prompts, note = prompt_arguments(pipeline, request.prompt, request.negative_prompt, device)
            if note:
                messages.append(note)

            # 4. Batches: image i of batch b uses seed + b * batch_size + i, noise drawn on the CPU
            images: list[GeneratedImage] = []
            stopped = False
            for batch_index in range(request.batch_count):
                if stop.is_set():
                    stopped = True
                    break
                latents, steps_done, interrupted = self._denoise(pipeline, request, prompts, batch_index,
                                                                 stop, emit, messages)
                decoded, upcast = decode_latents(pipeline.vae, latents)
                if upcast:
                    messages.append("The VAE overflowed in fp16 (the black-image bug), so it now decodes in fp32.")
                for image_index, image in enumerate(to_pil(decoded)):
                    seed = request.seed_for(batch_index, image_index)
                    result = self._finish(image, request, model, seed, steps_done, interrupted, image_index)
                    images.append(result)
                    emit(result)
                if interrupted:
                    stopped = True
                    break
            if stopped:
                messages.append(f"Stopped: {sum(i.finished for i in images)} finished image(s) kept.")
            return GenerationDone(images=images, seed=request.seed, stopped=stopped, messages=messages)

    def _denoise(self, pipeline, request: GenerationRequest, prompts: dict, batch_index: int,
                 stop: threading.Event, emit, messages: list[str]) -> tuple[torch.Tensor, int, bool]:
        generators = [torch.Generator("cpu").manual_seed(request.seed_for(batch_index, i))
                      for i in range(request.batch_size)]
        previewer = self._previewer(pipeline) if request.preview_every else None
        progress = {"steps": 0, "last": time.perf_counter(), "step_seconds": None}

        def on_step_end(pipe, step, timestep, tensors):
            now = time.perf_counter()
            seconds = now - progress["last"]
            progress["step_seconds"] = seconds if progress["step_seconds"] is None else \
                0.8 * progress["step_seconds"] + 0.2 * seconds
            progress["last"] = now
            progress["steps"] = step + 1
            total = pipe.num_timesteps
            if previewer and (step + 1) % request.preview_every == 0 and step + 1 < total:
                frames = previewer(tensors["latents"], mode=request.preview_mode,
                                   seconds_between_previews=progress["step_seconds"] * request.preview_every)
                emit(Preview(images=frames, step=step + 1, total_steps=total, batch_index=batch_index))
                progress["last"] = time.perf_counter()  # preview time is not step time
            if stop.is_set():
                pipe._interrupt = True
            return tensors

        if hasattr(pipeline.scheduler, "noise_sampler_seed"):  # DPM++ SDE: seed its Brownian noise per image
            pipeline.scheduler.noise_sampler_seed = [request.seed_for(batch_index, i)
                                                     for i in range(request.batch_size)]
        arguments = dict(prompts, num_inference_steps=request.steps, guidance_scale=request.guidance_scale,
                         guidance_rescale=request.guidance_rescale, num_images_per_prompt=request.batch_size,
                         generator=generators, output_type="latent", callback_on_step_end=on_step_end)
        if request.task == "img2img":
            arguments.update(image=request.init_image.convert("RGB").resize((request.width, request.height),
                                                                           Image.Resampling.LANCZOS),
                             strength=request.strength)
        else:
            arguments.update(width=request.width, height=request.height)
        if request.guidance_rescale == 0.0:
            arguments.pop("guidance_rescale")  # not every pipeline takes it
        try:
            latents = pipeline(**arguments).images
        except Exception as error:
            lower = self.models.memory.mode.lower()
            if not is_out_of_memory(error):
                raise
            if lower is None:
                raise ValueError(f"Out of GPU memory at {request.width}×{request.height}, batch "
                                 f"{request.batch_size}, even in the lowest memory mode. Use a smaller size or "
                                 "batch.") from error
            messages.append(f"Out of GPU memory in memory mode {self.models.memory.mode.value}; "
                            f"retried once in mode {lower.value}.")
            self.models.memory.release()
            self.models.set_memory_mode(lower)
            generators = [torch.Generator("cpu").manual_seed(request.seed_for(batch_index, i))
                          for i in range(request.batch_size)]
            progress["steps"] = 0
            latents = pipeline(**dict(arguments, generator=generators)).images
        interrupted = bool(getattr(pipeline, "_interrupt", False))
        return latents, progress["steps"], interrupted

    def _previewer(self, pipeline) -> LatentPreviewer:
        key = id(pipeline.vae)
        if key not in self._previewers:
            self._previewers = {key: LatentPreviewer(pipeline.vae, pipeline.vae_scale_factor)}
        return self._previewers[key]

    def _finish(self, image: Image.Image, request: GenerationRequest, model, seed: int, steps_done: int,
                interrupted: bool, image_index: int) -> GeneratedImage:
        infotext = metadata.build_infotext(request.prompt, request.negative_prompt,
                                           infotext_parameters(request, model, seed, image_index))
        finished = not interrupted
        path = None
        if finished and self.outputs_dir is not None:
            extra = {"request": replace(request, seed=seed, batch_count=1).to_json() | {"batch_seed": request.seed},
                     "model": {"name": model.name, "source": model.source.kind, "hash": model.model_hash},
                     "versions": metadata.library_versions() | {"studio": STUDIO_VERSION}}
            path = str(metadata.save_image(image, infotext, extra, self.outputs_dir, seed))
        return GeneratedImage(image=image, seed=seed, infotext=infotext, path=path, finished=finished,
                              steps_done=steps_done)

    def _unchanged_input(self, request: GenerationRequest, model, emit) -> GenerationDone:
        """img2img at strength 0 runs no step of the schedule: the input is the answer."""
        image = request.init_image.convert("RGB").resize((request.width, request.height), Image.Resampling.LANCZOS) \
            if request.init_image.size != (request.width, request.height) else request.init_image.convert("RGB")
        result = self._finish(image, request, model, request.seed, 0, False, 0)
        emit(result)
        return GenerationDone(images=[result], seed=request.seed, stopped=False,
                              messages=["Strength 0 keeps the input image unchanged."])


def check_size(width: int, height: int, multiple: int) -> None:
    if width % multiple or height % multiple:
        raise ValueError(f"`height` and `width` have to be divisible by {multiple} but are {height} and {width}.")


def infotext_parameters(request: GenerationRequest, model, seed: int, image_index: int) -> dict:
    parameters = {
        "Steps": request.steps, "Sampler": request.sampler, "CFG scale": request.guidance_scale,
        "Seed": seed, "Size": f"{request.width}x{request.height}",
        "Model hash": model.model_hash, "Model": model.name,
        "Denoising strength": request.strength if request.task == "img2img" else None,
        "Guidance rescale": request.guidance_rescale or None,
        "Batch size": request.batch_size if request.batch_size > 1 else None,
        "Batch pos": image_index if request.batch_size > 1 else None,
        "Version": STUDIO_VERSION,
    }
    return parameters
