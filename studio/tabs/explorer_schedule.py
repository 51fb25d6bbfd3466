"""The Diffusion Explorer's sampling-schedule panel: the noise level at each of a sampler's model calls under each
schedule (Default, Align Your Steps), overlaid, as σ_t or ᾱ_t; also `/schedule_plot`, the same for API clients,
with the numbers behind the plot.

The handler calls the `Explorer` service (pipelines/explorer/service.py) and renders what comes back.
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from pipelines.core.checks import MAX_STEPS
from pipelines.core.samplers import DEFAULT_SAMPLER, STEPWISE_SAMPLER_NAMES
from pipelines.core.schedules import SCHEDULABLE_SAMPLERS, SCHEDULES
from pipelines.explorer.sampling_schedules import QUANTITIES, SIGMA
from pipelines.explorer.service import Explorer
from studio.errors import user_errors

DEFAULT_STEPS = 10      # Align Your Steps' published tables are 10 steps
TABLE_LABEL = "Per schedule: timesteps, sigmas, alphas_cumprod at each model call"


@dataclass
class SchedulePanel:
    inputs: dict[str, gr.components.Component]   # /schedule_plot's parameters -> their controls
    plot: gr.Plot
    caption: gr.Markdown
    table: gr.JSON

    @property
    def outputs(self) -> list:
        return [self.plot, self.caption, self.table]


def layout_schedule() -> SchedulePanel:
    gr.Markdown("Where a sampler's steps fall: the noise level at each model call for the loaded model, under each "
                f"schedule. {', '.join(SCHEDULES[1:])} runs with {', '.join(SCHEDULABLE_SAMPLERS)}.")
    with gr.Row():
        sampler = gr.Dropdown(list(STEPWISE_SAMPLER_NAMES), value=DEFAULT_SAMPLER, label="Sampler",
                              elem_id="explorer-schedule-sampler")
        steps = gr.Slider(1, MAX_STEPS, value=DEFAULT_STEPS, step=1, precision=0, label="Steps",
                          elem_id="explorer-schedule-steps")
        schedules = gr.CheckboxGroup(list(SCHEDULES), value=list(SCHEDULES), label="Schedules",
                                     elem_id="explorer-schedule-schedules")
        quantity = gr.Radio([(label, name) for name, label in QUANTITIES.items()], value=SIGMA, label="Plot",
                            elem_id="explorer-schedule-quantity")
    plot = gr.Plot(label="Sampling schedule", elem_id="explorer-schedule-plot")
    caption = gr.Markdown(label="Caption", elem_id="explorer-schedule-caption")
    table = gr.JSON(label=TABLE_LABEL, visible=False)
    return SchedulePanel(inputs={"sampler": sampler, "steps": steps, "schedules": schedules, "quantity": quantity},
                         plot=plot, caption=caption, table=table)


def wire_schedule(explorer: Explorer, panel: SchedulePanel, *, shown: gr.Tab) -> None:
    """The plot follows every control and is drawn when `shown` opens; `/schedule_plot` serves API clients."""

    @user_errors
    def schedule_plot(sampler: str = DEFAULT_SAMPLER, steps: int = DEFAULT_STEPS,
                      schedules: list[str] | None = None, quantity: str = SIGMA):
        view = explorer.sampling_schedules(sampler=sampler, steps=steps,
                                           schedules=list(SCHEDULES) if schedules is None else schedules,
                                           quantity=quantity)
        return view.figure, view.caption, view.table

    controls = panel.inputs
    gr.on([shown.select, *(control.change for control in controls.values())], schedule_plot,
          inputs=list(controls.values()), outputs=panel.outputs, api_name="schedule_plot",
          trigger_mode="always_last")
