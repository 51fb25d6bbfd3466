"""The Diffusion Explorer's comparison panel: one seed run over several samplers, step counts and CFG scales,
shown as a labelled grid and a table of distances to a many-step reference, time and model calls."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import gradio as gr

from pipelines.core.checks import MAX_STEPS
from pipelines.core.samplers import STEPWISE_SAMPLER_NAMES
from pipelines.explorer.comparison import COMPARE_COLUMNS, DEFAULT_REFERENCE_SAMPLER, parse_compare_lists
from pipelines.explorer.service import Explorer
from studio.context import session_of
from studio.errors import user_errors
from studio.tabs.explorer_shared import DEVICE_QUEUE, PRIVATE, follow, reverse_request

SAME_SAMPLER = "same sampler"


@dataclass
class ComparePanel:
    inputs: dict[str, gr.components.Component]  # the comparison's own arguments -> their controls
    button: gr.Button
    status: gr.Markdown
    grid: gr.Image
    table: gr.Dataframe


def layout_compare() -> ComparePanel:
    inputs: dict[str, gr.components.Component] = {}
    with gr.Row():
        inputs["samplers_text"] = gr.Textbox(label="Samplers", placeholder="e.g. Euler, DDIM, DPM++ 2M",
                                             info="empty: the sampler above", elem_id="explorer-compare-samplers")
        inputs["steps_text"] = gr.Textbox(label="Steps", placeholder="e.g. 5, 10, 20", info="empty: the steps above",
                                          elem_id="explorer-compare-steps")
        inputs["cfgs_text"] = gr.Textbox(label="CFG scales", placeholder="e.g. 1, 4, 7.5",
                                         info="empty: the CFG above", elem_id="explorer-compare-cfgs")
    with gr.Row():
        inputs["reference_sampler"] = gr.Dropdown(
            [DEFAULT_REFERENCE_SAMPLER, SAME_SAMPLER, *STEPWISE_SAMPLER_NAMES],
            value=DEFAULT_REFERENCE_SAMPLER, label="Reference sampler")
        inputs["reference_steps"] = gr.Slider(1, MAX_STEPS, value=100, step=1, label="Reference steps")
        button = gr.Button("Compare", variant="primary", elem_id="explorer-compare")
    status = gr.Markdown(elem_id="explorer-compare-status")
    grid = gr.Image(label="Comparison", interactive=False, elem_id="explorer-compare-grid", format="png")
    table = gr.Dataframe(headers=list(COMPARE_COLUMNS), interactive=False, elem_id="explorer-compare-table")
    return ComparePanel(inputs=inputs, button=button, status=status, grid=grid, table=table)


def wire_compare(explorer: Explorer, panel: ComparePanel, *,
                 reverse_settings: dict[str, gr.components.Component], job_id: gr.State) -> None:
    """Compare runs the reverse tab's settings (their sampler, steps and CFG where the panel's lists are empty)."""

    @user_errors
    def compare_reverse(samplers_text, steps_text, cfgs_text, reference_sampler, reference_steps,
                        request: gr.Request = None, **settings) -> Iterator[dict]:
        lists = parse_compare_lists(samplers_text, steps_text, cfgs_text)
        generation = reverse_request(**settings)
        reference = None if reference_sampler == SAME_SAMPLER else reference_sampler
        job = explorer.compare(generation, **lists, reference_sampler=reference, reference_steps=reference_steps,
                               owner=session_of(request))
        yield {job_id: job.id}
        result = yield from follow(job, panel.status, "Image {done} of {total} done…")
        if result is None:
            return
        grid, rows = result
        # the reference each cell was measured against (the model's own sampler where it does not run the default)
        reference_name = rows[0].reference_sampler if reference else "each cell's own sampler"
        yield {panel.grid: grid,
               panel.table: gr.Dataframe(value=[row.values() for row in rows], headers=list(COMPARE_COLUMNS)),
               panel.status: f"Seed {generation.seed} · reference: {reference_name} at {int(reference_steps)} steps. "
                             "NFE counts the model's calls (UNet or transformer); with CFG one call may carry both "
                             "passes (2 evaluations)."}

    panel.button.click(compare_reverse, inputs_kwargs={**reverse_settings, **panel.inputs},
                       outputs={job_id, panel.grid, panel.table, panel.status}, **PRIVATE, **DEVICE_QUEUE)
