"""The task registry: each kind of generation, its request, its pipeline and its infotext fields.

The registry entry names the request class, the pipeline the task runs on (derived once from the
loaded base with `from_pipe`, so all tasks share one set of weights), the infotext fields the task
writes and reads back, what it supports (samplers, speculative sampling), and, for tasks that
diffusers' pipeline call does not cover, its own denoising loop. Adding a task is one request class
and one `register(Task(...))` in a module of pipelines/tasks/; nothing else branches on the task's name.

The registry is filled by importing `pipelines.tasks`, whose `TASKS` is the complete one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipelines.core.requests import SamplingSettings
from pipelines.core.samplers import STEPWISE_SAMPLER_NAMES


@dataclass(frozen=True)
class InfotextField:
    """One `Key: value` of the A1111 infotext and the request field it holds."""
    key: str
    field: str
    kind: type


# Written by every task (Sampler and Size have formats of their own, see pipelines/io/metadata.py).
SHARED_INFOTEXT_FIELDS = (InfotextField("Steps", "steps", int), InfotextField("CFG scale", "guidance_scale", float),
                          # Flux dev's guidance input, as A1111 Forge writes it
                          InfotextField("Distilled CFG Scale", "distilled_guidance", float),
                          InfotextField("Seed", "seed", int), InfotextField("Guidance rescale", "guidance_rescale", float),
                          InfotextField("Batch size", "batch_size", int),
                          InfotextField("Draft", "draft", str), InfotextField("Draft length", "draft_length", int),
                          # guidance beyond CFG (pipelines/core/guidance.py), written only when in use
                          InfotextField("CFG method", "cfg_method", str),
                          InfotextField("CFG interval start", "cfg_start", float),
                          InfotextField("CFG interval end", "cfg_end", float),
                          InfotextField("PAG scale", "pag_scale", float),
                          InfotextField("PAG adaptive scale", "pag_adaptive_scale", float),
                          InfotextField("PAG layers", "pag_layers", str),
                          InfotextField("Classifier guidance class", "classifier_class", str),
                          InfotextField("Classifier guidance scale", "classifier_scale", float))


@dataclass(frozen=True)
class Task:
    name: str
    label: str
    request_class: type[SamplingSettings]
    derive: Callable[[Any], Any]      # the task's pipeline from the base pipeline, sharing its weights
    infotext_fields: tuple[InfotextField, ...] = ()
    # The task's own denoising loop (pipelines/core/call.py `PreparedCall.__call__`'s signature), for tasks
    # that diffusers' pipeline call does not cover; None: the derived pipeline's own call.
    run: Callable[..., Any] | None = None
    # `Key: value`s that are not one field each (ControlNet's units), from the request
    extra_infotext: Callable[[SamplingSettings], dict] | None = None
    # The samplers the task runs: every one-step-per-call sampler, and those with loops of their own
    # (pipelines/sampling/) only where the task lists them
    samplers: tuple[str, ...] = STEPWISE_SAMPLER_NAMES

    def supports(self, sampler: str) -> bool:
        return sampler in self.samplers

    def infotext_values(self, request: SamplingSettings) -> dict:
        """The task's `Key: value`s; a switch that is off is left out, as A1111 does."""
        values = {item.key: None if getattr(request, item.field) is False else getattr(request, item.field)
                  for item in self.infotext_fields}
        return values | (self.extra_infotext(request) if self.extra_infotext is not None else {})


TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    if task.request_class.task != task.name:
        raise ValueError(f"Task {task.name!r} names request class {task.request_class.__name__}, whose task is "
                         f"{task.request_class.task!r}.")
    TASKS[task.name] = task
    return task


def task_of(request: SamplingSettings) -> Task:
    if request.task not in TASKS:
        raise ValueError(f"Unknown task {request.task!r}; known tasks: {', '.join(TASKS)}.")
    return TASKS[request.task]
