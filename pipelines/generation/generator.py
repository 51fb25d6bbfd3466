"""Generation for every task: the one service the UI and the API call.

`Generator.submit(request)` queues a job on the device worker (pipelines/jobs/worker.py) and returns it;
`Generator.run(request)` follows that job's events, so a UI can stream:

    Preview(...)        every `preview_every` steps, when asked for (only the latest is kept for
                        a follower that joins late, e.g. after a page reload)
    GeneratedImage(...) each finished image, already saved with its metadata
    GenerationDone(...) last: everything, the seed used, whether it was stopped, notes

The request is prepared once (pipelines/core/call.py) and diffusers' own loop runs each batch; its
`callback_on_step_end` posts previews and turns the job's stop flag into the pipeline's own
interrupt at the next step.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image

from pipelines.core.call import PreparedCall, prepare
from pipelines.core.guidance import guidance_infotext
from pipelines.core.preview import LatentPreviewer
from pipelines.core.prompts import EMPHASIS, prompt_texts, uses_emphasis
from pipelines.core.requests import SamplingSettings
from pipelines.core.results import GeneratedImage, GenerationDone, Preview
from pipelines.core.samplers import a1111_sampler
from pipelines.core.transformers import takes_distilled_guidance
from pipelines.io import metadata
from pipelines.jobs.worker import Job, Progress
from pipelines.models.embeddings import ti_hashes
from pipelines.models.manager import ModelManager
from pipelines.models.memory import is_out_of_memory
from pipelines.sampling.speculative import ChainStats
from pipelines.sampling.studio import speculative_note
from pipelines.tasks import task_of

STUDIO_VERSION = "diffusion-studio 0.1.0"


class Generator:
    def __init__(self, models: ModelManager, outputs_dir: Path | None, *,
                 min_free_disk_mb: float = metadata.MIN_FREE_DISK_MB):
        self.models = models
        self.outputs_dir = outputs_dir      # None: keep images in memory only (tests, benchmarks)
        self.min_free_disk_mb = min_free_disk_mb   # saving refuses to leave the disk with less free

    # -- public ----------------------------------------------------------------------------
    def submit(self, request: SamplingSettings, *, owner: str | None = None,
               stop: threading.Event | None = None, save: bool = True) -> Job:
        """Queue `request` on the device worker; the job's events are Preview / GeneratedImage, its
        result the GenerationDone. `save=False` keeps the images in memory only (Live mode's drafts)."""
        return self.models.worker.submit(lambda job: self._generate(request, job, save), kind=request.task,
                                         owner=owner, stop=stop)

    def run(self, request: SamplingSettings, *, stop: threading.Event | None = None,
            owner: str | None = None) -> Iterator:
        """Generate, yielding Preview / GeneratedImage events and finally one GenerationDone."""
        yield from self.submit(request, owner=owner, stop=stop).stream()

    def generate(self, request: SamplingSettings, *, stop: threading.Event | None = None) -> GenerationDone:
        """Run to completion and return only the final event."""
        return self.submit(request, stop=stop).result()

    # -- the work (on the device thread) -----------------------------------------------------
    def _generate(self, request: SamplingSettings, job: Job, save: bool = True) -> GenerationDone:
        # 1. Check inputs and the disk's margin, resolve the seed, set up the task's pipeline, sampler and prompts
        if save and self.outputs_dir is not None:     # refused before any work; each save checks again
            metadata.check_disk_space(self.outputs_dir, min_free_mb=self.min_free_disk_mb)
        call = prepare(self.models, request)
        request, messages = call.request, call.notes
        unchanged = request.unchanged_image()
        if unchanged is not None:
            result = self._finish(unchanged, call, request.seed, 0, False, 0, save=save)
            job.emit(result)
            return GenerationDone(images=[result], seed=request.seed, stopped=False, messages=messages)

        # 2. Batches: image i of batch b uses seed + b * batch_size + i, noise drawn on the CPU
        images: list[GeneratedImage] = []
        stopped = False
        for batch_index in range(request.batch_count):
            if job.stop.is_set():
                stopped = True
                break
            latents, steps_done, interrupted = self._denoise(call, batch_index, job)
            chains = call.speculative[-request.batch_size:] if request.speculative else None
            for image_index, image in enumerate(call.decode(latents)):
                seed = request.seed_for(batch_index, image_index)
                result = self._finish(image, call, seed, steps_done, interrupted, image_index,
                                      chains[image_index] if chains else None, save=save)
                images.append(result)
                job.emit(result)
            if interrupted:
                stopped = True
                break
        if call.speculative:
            messages.append(speculative_note(request, call.speculative))
        if stopped:
            finished = sum(item.finished for item in images)
            messages.append(f"Stopped: {finished} finished image(s) kept" +
                            (", the unfinished one shown but not saved." if finished < len(images) else "."))
        return GenerationDone(images=images, seed=request.seed, stopped=stopped, messages=messages)

    def _denoise(self, call: PreparedCall, batch_index: int, job: Job) -> tuple[torch.Tensor, int, bool]:
        request = call.request
        previewer = self._previewer(call) if request.preview_every else None
        progress = {"steps": 0, "last": time.perf_counter(), "step_seconds": None, "previewed": 0}

        def on_step_end(pipe, step, timestep, tensors):
            now = time.perf_counter()
            seconds = now - progress["last"]
            progress["step_seconds"] = seconds if progress["step_seconds"] is None else \
                0.8 * progress["step_seconds"] + 0.2 * seconds
            progress["last"] = now
            progress["steps"] = step + 1
            total = pipe.num_timesteps
            job.progress = Progress(step + 1, total, f"batch {batch_index + 1} of {request.batch_count}")
            # every N steps; a sampler that advances several steps per call (speculative) previews once it
            # has gone N past the last preview
            if previewer and step + 1 - progress["previewed"] >= request.preview_every and step + 1 < total:
                progress["previewed"] = step + 1
                frames = previewer(call.spatial(tensors["latents"]), mode=request.preview_mode,
                                   seconds_between_previews=progress["step_seconds"] * request.preview_every)
                job.emit(Preview(images=frames, step=step + 1, total_steps=total, batch_index=batch_index),
                         transient=True)
                progress["last"] = time.perf_counter()  # preview time is not step time
            if job.stop.is_set():
                pipe._interrupt = True
            return tensors

        try:
            latents = call(batch_index, callback=on_step_end)
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            memory = self.models.memory
            lower = memory.mode.lower()
            if lower is None:
                raise ValueError(f"Out of GPU memory at {request.width}×{request.height}, batch "
                                 f"{request.batch_size}, even in the lowest memory mode. Use a smaller size or "
                                 "batch.") from error
            call.notes.append(f"Out of GPU memory in memory mode {memory.mode.value}; retried once in mode "
                              f"{lower.value}, which stays in force (Models & memory changes it).")
            memory.release()
            self.models.set_memory_mode(lower)
            progress["steps"] = progress["previewed"] = 0
            latents = call(batch_index, callback=on_step_end)  # fresh generators: the retry restarts from the seed
        interrupted = bool(getattr(call.pipeline, "_interrupt", False))
        return latents, progress["steps"], interrupted

    def _previewer(self, call: PreparedCall) -> LatentPreviewer:
        """One previewer per model, kept on the model so that it goes with it."""
        model = call.model
        if model.previewer is None:
            model.previewer = LatentPreviewer(call.pipeline.vae, call.pipeline.vae_scale_factor)
        return model.previewer

    def _finish(self, image: Image.Image, call: PreparedCall, seed: int, steps_done: int, interrupted: bool,
                image_index: int, chain: ChainStats | None = None, *, save: bool = True) -> GeneratedImage:
        request, model = call.request, call.model
        finished = not interrupted
        parameters = infotext_parameters(request, model, seed, image_index)
        if chain is not None:   # what this image's speculative run cost, before Version
            version = parameters.pop("Version")
            parameters.update({"Target calls": chain.target_calls,
                               "Draft acceptance": f"{chain.acceptance_rate:.3f}", "Version": version})
        embedding_hashes = ti_hashes("\n".join(call.texts or ()), model.embeddings)
        if call.loras or embedding_hashes:   # A1111's form and place: `Lora hashes` and `TI hashes` before Version,
            version = parameters.pop("Version")   # each "name: hash, name: hash"
            if call.loras:
                parameters["Lora hashes"] = ", ".join(f"{name}: {lora.hash}" for name, lora in call.loras.items())
            parameters["TI hashes"] = embedding_hashes   # None: left out
            parameters["Version"] = version
        if not finished:   # the settings asked for, and the truth of this image
            parameters["Stopped at step"] = steps_done
        infotext = metadata.build_infotext(request.prompt, request.negative_prompt, parameters)
        path = None
        if finished and save and self.outputs_dir is not None:
            extra = {"request": replace(request, seed=seed, batch_count=1).to_json() | {"batch_seed": request.seed},
                     "model": {"name": model.name, "source": model.source.kind, "hash": model.model_hash},
                     "versions": metadata.library_versions() | {"studio": STUDIO_VERSION}}
            try:
                path = str(metadata.save_image(image, infotext, extra, self.outputs_dir, seed,
                                               min_free_mb=self.min_free_disk_mb))
            except metadata.DiskSpaceError as error:   # the disk filled during the work: keep the image, say so
                if not any(note.startswith("Not saved from seed") for note in call.notes):   # said once
                    call.notes.append(f"Not saved from seed {seed} on (the images are shown): {error}")
            except OSError as error:   # a folder made read-only, an I/O error: this image is kept, and said unsaved
                kind = f"{type(error).__name__}: [Errno {error.errno}]"   # as str(error) begins when it has one
                if not any(note.startswith("Not saved, seed") and kind in note for note in call.notes):   # said once
                    call.notes.append(f"Not saved, seed {seed} (the image is shown): {type(error).__name__}: "
                                      f"{error}")
        return GeneratedImage(image=image, seed=seed, infotext=infotext, path=path, finished=finished,
                              steps_done=steps_done)


def infotext_parameters(request: SamplingSettings, model, seed: int, image_index: int) -> dict:
    """The infotext's `Key: value`s, in A1111 >= 1.9's form: the sampler as its `Sampler` + `Schedule type`,
    `RNG: CPU` (our noise is drawn on the CPU), and `Emphasis` when the prompts weigh words."""
    sampler, schedule_type = a1111_sampler(request.sampler)
    prompt, negative_prompt, _, _ = prompt_texts(request)
    return {
        "Steps": request.steps, "Sampler": sampler,
        "Schedule type": schedule_type if request.schedule == "Default" else request.schedule,
        "CFG scale": request.guidance_scale,
        "Distilled CFG Scale": request.distilled_guidance if takes_distilled_guidance(getattr(model, "pipeline", None))
        else None,
        "Seed": seed, "Size": f"{request.width}x{request.height}",
        "Model hash": model.model_hash, "Model": model.name,
        **task_of(request).infotext_values(request),
        "Draft": request.draft if request.speculative else None,
        "Draft length": request.draft_length if request.speculative else None,
        "Guidance rescale": request.guidance_rescale or None,
        **guidance_infotext(request),
        "Batch size": request.batch_size if request.batch_size > 1 else None,
        "Batch pos": image_index if request.batch_size > 1 else None,
        "RNG": "CPU",
        "Emphasis": EMPHASIS if uses_emphasis(prompt) or uses_emphasis(negative_prompt) else None,
        "Version": STUDIO_VERSION,
    }
