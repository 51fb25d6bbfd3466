"""Speculative sampling, round by round, for the Diffusion Explorer's reverse view.

`speculative_view(models, request)` generates one image with the DDPM speculative sampler
(pipelines/sampling/) and keeps, for every verification round, what the draft proposed, which
drafted steps the target accepted and with what probability, where the reflection happened, and the
image after the round. It draws that as a timeline:

    top      one row per round: a dot per drafted step, its colour the acceptance probability
             min(1, q/p); a ring for an accepted step, a cross where the step was rejected and the
             reflection gave the next state, grey for drafted steps thrown away after it
    bottom   target calls so far against the step reached: speculative's staircase under plain
             DDPM's diagonal (one call per step)
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace

import matplotlib
import torch
from PIL import Image

from pipelines.core.call import prepare
from pipelines.core.images import to_pil
from pipelines.core.samplers import SPECULATIVE_SAMPLER
from pipelines.core.vae import decode
from pipelines.sampling.speculative import ChainStats
from pipelines.sampling.studio import speculative_note
from pipelines.tasks.txt2img import Txt2ImgRequest

ROUND_COLUMNS = ("round", "from step", "drafted", "acceptance probabilities", "accepted", "ended by",
                 "target calls", "DDPM calls")
MAX_ROUND_IMAGES = 48


@dataclass
class SpeculativeView:
    request: Txt2ImgRequest
    chain: ChainStats
    timeline: Image.Image
    rows: list[list]                  # one per round, ROUND_COLUMNS
    round_images: list[tuple[Image.Image, str]]   # the image after each round, captioned
    final_image: Image.Image
    summary: str
    stopped: bool


def speculative_view(models, request: Txt2ImgRequest, *, stop: threading.Event | None = None,
                     on_round: Callable[[int, int], None] | None = None) -> SpeculativeView:
    """Generate `request` (one image) with the DDPM speculative sampler, keeping every round."""
    if request.batch_size != 1 or request.batch_count != 1:
        raise ValueError("The explorer follows one image; set the batch size and count to 1.")
    request = replace(request, sampler=SPECULATIVE_SAMPLER)
    call = prepare(models, request)
    states: list[torch.Tensor] = []

    def after_round(pipe, step, timestep, tensors):
        states.append(tensors["latents"][0].detach().to("cpu", copy=True))
        if on_round is not None:
            on_round(step + 1, pipe.num_timesteps)
        if stop is not None and stop.is_set():
            pipe._interrupt = True
        return {}

    latents = call(0, callback=after_round)
    chain = call.speculative[0]
    last = chain.rounds[-1] if chain.rounds else None
    stopped = last is None or last.start + len(last.probabilities) < call.request.steps
    final_image = call.decode(latents)[0]
    # at most MAX_ROUND_IMAGES, evenly spread over the rounds, the last included
    picked = sorted({round(i * (len(states) - 1) / max(MAX_ROUND_IMAGES - 1, 1)) for i in range(MAX_ROUND_IMAGES)}) \
        if len(states) > MAX_ROUND_IMAGES else list(range(len(states)))
    shown = [states[i] for i in picked]
    images = [image for chunk in torch.stack(shown).split(8) for image in to_pil(decode(call.pipeline.vae, chunk)[0])] \
        if shown else []
    captions = [f"after round {index + 1}: step {chain.rounds[index].start + len(chain.rounds[index].probabilities)}"
                for index in picked[:len(images)]]
    notes = [speculative_note(call.request, [chain]), *call.notes]
    if stopped:
        notes.append(f"Stopped after {len(chain.rounds)} round(s).")
    return SpeculativeView(request=call.request, chain=chain, timeline=timeline(chain, call.request.steps),
                           rows=round_rows(chain), round_images=list(zip(images, captions)),
                           final_image=final_image, summary="  \n".join(notes), stopped=stopped)


def round_rows(chain: ChainStats) -> list[list]:
    rows = []
    for index, round_ in enumerate(chain.rounds):
        end = round_.start + len(round_.probabilities)
        ended = f"reflection at step {end - 1}" if round_.reflected else "all accepted"
        rows.append([index + 1, round_.start, round_.drafted,
                     " ".join(f"{p:.2f}" for p in round_.probabilities), round_.accepted, ended,
                     round_.target_calls, end])
    return rows


def timeline(chain: ChainStats, steps: int) -> Image.Image:
    """The rounds as a picture (see the module's docstring)."""
    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, (top, bottom) = pyplot.subplots(2, 1, figsize=(9, 5.5), sharex=True,
                                            gridspec_kw={"height_ratios": [3, 2]})
    colours = matplotlib.colormaps["RdYlGn"]
    for index, round_ in enumerate(chain.rounds):
        y = index + 1
        for k, probability in enumerate(round_.probabilities):
            step = round_.start + k
            rejected = round_.reflected and k == len(round_.probabilities) - 1
            top.scatter(step, y, s=40, color=colours(probability), edgecolors="black" if not rejected else "none",
                        linewidths=0.8, zorder=3)
            if rejected:
                top.scatter(step, y, s=70, marker="x", color="black", zorder=4)
        thrown = range(round_.start + len(round_.probabilities), round_.start + round_.drafted)
        if thrown:   # drafted beyond the reflection: never verified
            top.scatter(list(thrown), [y] * len(thrown), s=25, color="0.75", zorder=2)
        top.hlines(y, round_.start - 0.4, round_.start + round_.drafted - 0.6, color="0.85", zorder=1)
    top.set_ylabel("round")
    top.invert_yaxis()
    top.set_title("Drafted steps per round: colour = acceptance probability min(1, q/p); "
                  "× = rejected, reflected; grey = thrown away", fontsize=9)
    mappable = matplotlib.cm.ScalarMappable(cmap=colours, norm=matplotlib.colors.Normalize(0, 1))
    figure.colorbar(mappable, ax=top, fraction=0.03, pad=0.01)
    reached = [round_.start + len(round_.probabilities) for round_ in chain.rounds]
    calls = [round_.target_calls for round_ in chain.rounds]
    start = chain.rounds[0].start if chain.rounds else 0
    bottom.step([start, *reached], [chain.target_calls - len(chain.rounds), *calls], where="post",
                label=f"speculative: {chain.target_calls} target calls")
    bottom.plot([0, steps], [0, steps], linestyle="--", color="0.5", label=f"plain DDPM: {steps}")
    bottom.set_xlabel("step reached")
    bottom.set_ylabel("target calls")
    bottom.legend(loc="upper left")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    pyplot.close(figure)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")
