"""What the Diffusion Explorer's panels share: how their events queue, how pictures and formulas show,
the text-to-image request the reverse settings describe, and a job's progress followed into a status line."""

from __future__ import annotations

from collections.abc import Iterator

import gradio as gr

from pipelines.explorer.formulas import LATEX_DELIMITERS
from pipelines.jobs.worker import Job, JobCancelled, Progress
from pipelines.tasks.txt2img import Txt2ImgRequest

FALLBACK_SIDE = 512       # the reverse size without a loaded model to take the native size from
# Gradio's progress overlay is off (the status lines report progress): on an error it would replace the
# shown images with "Error" badges.
DEVICE_QUEUE = {"concurrency_id": "device", "concurrency_limit": 1, "show_progress": "hidden"}
PRIVATE = {"api_visibility": "private"}
# Small images shown whole and enlarged by whole numbers (studio/app.py's CSS and script), saved as PNG
PIXELS = {"elem_classes": ["studio-pixels"], "format": "png"}


def formulas_markdown(formulas: dict[str, str]) -> gr.Markdown:
    return gr.Markdown("\n\n".join(formulas.values()), latex_delimiters=LATEX_DELIMITERS,
                       elem_classes=["explorer-formulas"])


def reverse_request(*, prompt, negative_prompt, sampler, steps, guidance_scale, seed, size) -> Txt2ImgRequest:
    """The text-to-image request the reverse settings describe, with its seed drawn (to report it)."""
    return Txt2ImgRequest(prompt=prompt or "", negative_prompt=negative_prompt or "", sampler=sampler,
                          steps=int(steps), guidance_scale=float(guidance_scale), width=int(size), height=int(size),
                          seed=int(seed if seed is not None else -1)).resolved()


def follow(job: Job, status: gr.Markdown, progress: str) -> Iterator[dict]:
    """Show `job`'s progress in `status` as it comes (`progress` with {done} and {total} filled in); returns
    the job's result (None when the job was stopped before it started): `result = yield from follow(...)`."""
    for event in job.events():
        if isinstance(event, Progress):
            yield {status: progress.format(done=event.done, total=event.total)}
    try:
        return job.result()
    except JobCancelled:
        yield {status: "Stopped before it started."}
        return None
