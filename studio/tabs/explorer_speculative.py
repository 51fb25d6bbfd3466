"""The Diffusion Explorer's speculative panel: one image generated with the DDPM speculative sampler, round
by round (what the draft proposed, what the model accepted, the image after each round); also
`/explorer_speculative`, the same for API clients."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import gradio as gr

from pipelines.core.samplers import DEFAULT_DRAFT_LENGTH, DRAFTS, FROZEN_X0_DRAFT, MAX_DRAFT_LENGTH, SPECULATIVE_SAMPLER
from pipelines.explorer.service import Explorer
from pipelines.explorer.speculative_view import ROUND_COLUMNS
from pipelines.tasks.txt2img import Txt2ImgRequest
from studio.context import session_of
from studio.errors import user_errors
from studio.tabs.explorer_shared import DEVICE_QUEUE, FALLBACK_SIDE, follow, reverse_request


@dataclass
class SpeculativePanel:
    inputs: dict[str, gr.components.Component]   # draft, draft_length
    button: gr.Button
    status: gr.Markdown
    timeline: gr.Image
    rounds: gr.Gallery
    table: gr.Dataframe


def layout_speculative() -> SpeculativePanel:
    gr.Markdown("The draft proposes L DDPM steps; the model checks all L in one batched call and accepts each "
                "drafted step with probability min(1, q/p). At the first rejection the next state is the draft's "
                "noise reflected across the hyperplane between the two means, an exact draw from the model's "
                "step, so the image has DDPM's law whatever the draft. Prompt, steps, CFG, seed and size are "
                "the ones above (100 steps shows it best).")
    inputs: dict[str, gr.components.Component] = {}
    with gr.Row():
        inputs["draft"] = gr.Dropdown(list(DRAFTS), value=FROZEN_X0_DRAFT, label="Draft",
                                      elem_id="explorer-speculative-draft")
        inputs["draft_length"] = gr.Slider(1, MAX_DRAFT_LENGTH, value=DEFAULT_DRAFT_LENGTH, step=1, precision=0,
                                           label="Draft length L", elem_id="explorer-speculative-length")
        button = gr.Button("Run speculative", variant="primary", elem_id="explorer-speculative-run")
    status = gr.Markdown(label="Summary", elem_id="explorer-speculative-status")
    timeline = gr.Image(label="Rounds and target calls", interactive=False, format="png",
                        elem_id="explorer-speculative-timeline")
    rounds = gr.Gallery(label="The image after each round", columns=8, height="auto", object_fit="contain",
                        elem_id="explorer-speculative-rounds")
    table = gr.Dataframe(headers=list(ROUND_COLUMNS), interactive=False, label="Rounds",
                         elem_id="explorer-speculative-table")
    return SpeculativePanel(inputs=inputs, button=button, status=status, timeline=timeline, rounds=rounds,
                            table=table)


def wire_speculative(explorer: Explorer, panel: SpeculativePanel, *,
                     reverse_settings: dict[str, gr.components.Component], job_id: gr.State) -> None:
    """The run takes the reverse tab's settings but its sampler: the panel's draft and draft length instead."""

    @user_errors
    def explorer_speculative(prompt: str, negative_prompt: str | None = None, steps: int | None = None,
                             guidance_scale: float | None = None, seed: int | None = None, size: int | None = None,
                             draft: str | None = None, draft_length: int | None = None,
                             request: gr.Request = None) -> Iterator[dict]:
        """Only the prompt is required; the rest default to 100 steps, CFG 7.5, a drawn seed, the model's size."""
        fields = Txt2ImgRequest.__dataclass_fields__
        side = explorer.models.current.native_side if explorer.models.current else None
        generation = replace(reverse_request(prompt=prompt, negative_prompt=negative_prompt,
                                             sampler=SPECULATIVE_SAMPLER, steps=100 if steps is None else steps,
                                             guidance_scale=fields["guidance_scale"].default if guidance_scale is None
                                             else guidance_scale, seed=seed, size=size or side or FALLBACK_SIDE),
                             draft=draft or fields["draft"].default,
                             draft_length=fields["draft_length"].default if draft_length is None else int(draft_length))
        job = explorer.speculative(generation, owner=session_of(request))
        yield {job_id: job.id}
        view = yield from follow(job, panel.status, "Step {done} of {total} reached…")
        if view is None:
            return
        yield {panel.timeline: view.timeline, panel.rounds: view.round_images,
               panel.table: gr.Dataframe(value=view.rows, headers=list(ROUND_COLUMNS)),
               panel.status: f"Seed {view.request.seed} · " + view.summary}

    settings = {name: control for name, control in reverse_settings.items() if name != "sampler"}
    panel.button.click(explorer_speculative, inputs_kwargs={**settings, **panel.inputs},
                       outputs=[panel.timeline, panel.rounds, panel.table, panel.status, job_id],
                       api_name="explorer_speculative", **DEVICE_QUEUE)
