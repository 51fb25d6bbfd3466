"""The Diffusion Explorer's guidance panel: one seed run under each guidance method, with what each method adds
to the noise prediction recorded at every model call, so a student sees what each does, in numbers.

What each method adds to ε_c, the model's prediction for the prompt (pipelines/core/guidance.py has the papers):

    none               nothing (CFG scale 1): the baseline
    CFG                w (ε_c − ε_u)                      the sampler uses ε_u + w (ε_c − ε_u)
    CFG + interval     the same for the calls in [start, end) of the schedule, nothing outside (one pass there)
    ICG                w (ε_c − ε(ĉ))                     ĉ a random prompt standing in for the negative one
    PAG                s (ε_c − ε̃_c)                      ε̃_c with the chosen self-attention set to the identity
    CFG + PAG          both
    CFG + classifier   w (ε_c − ε_u) and −√(1−ᾱ_t) s ∇log p(y|x_t); ∇log p itself is kept to show beside ε_c − ε_u,
                       which CFG reads as an implicit classifier's −√(1−ᾱ_t) ∇log p(c|x_t)

Each method runs in its own Denoiser-driven loop (the loop of pipelines/tasks/guided.py, recording each step's
prediction): the same request, noise and sampler as Text-to-Image, so a method's final image is the image the
studio generates with those settings. The RMS of every direction is kept per call; the directions themselves at a
few chosen calls, to draw (guidance_view.py). The final images are scored by the emoji judge (pipelines/lora/
judge.py), and the held-out figures of bench/guidance.py are read from assets/guidance-eval.json when present.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipelines.core.call import PreparedCall, prepare
from pipelines.core.denoiser import Denoiser, NoisePrediction
from pipelines.core.guidance import DEFAULT_PAG_LAYERS, alpha_bar_at, pag_scale_at
from pipelines.core.paths import ASSETS_DIR
from pipelines.core.preview import LatentPreviewer
from pipelines.core.samplers import DEFAULT_SAMPLER, STEPWISE_SAMPLER_NAMES, edm_refusal, is_edm
from pipelines.core.schedules import set_schedule
from pipelines.core.transformers import check_unet_model
from pipelines.models.manager import ModelManager
from pipelines.tasks.txt2img import Txt2ImgRequest

NONE, CFG, INTERVAL, ICG, PAG, CFG_PAG, CLASSIFIER = ("none", "CFG", "CFG + interval", "ICG", "PAG", "CFG + PAG",
                                                      "CFG + classifier")
GUIDANCE_METHODS: tuple[str, ...] = (NONE, CFG, INTERVAL, ICG, PAG, CFG_PAG, CLASSIFIER)
# The directions a method adds to ε_c (and the classifier's gradient, drawn beside them, never added as it is)
CFG_DIRECTION, ICG_DIRECTION, PAG_DIRECTION = "w(ε_c − ε_u)", "w(ε_c − ε(ĉ))", "s(ε_c − ε̃_c)"
CLASSIFIER_DIRECTION, CLASSIFIER_GRADIENT = "−√(1−ᾱ_t)·s·∇log p(y|x_t)", "∇log p(y|x_t)"
COMPONENTS: dict[str, tuple[str, ...]] = {
    NONE: (), CFG: (CFG_DIRECTION,), INTERVAL: (CFG_DIRECTION,), ICG: (ICG_DIRECTION,), PAG: (PAG_DIRECTION,),
    CFG_PAG: (CFG_DIRECTION, PAG_DIRECTION), CLASSIFIER: (CFG_DIRECTION, CLASSIFIER_DIRECTION, CLASSIFIER_GRADIENT)}
COSINE = "cos(ε_c − ε_u, −∇log p)"   # how far CFG's implicit classifier points where the trained one does

DEFAULT_PAG_SCALE = 3.0
DEFAULT_INTERVAL = (0.2, 0.8)         # Kynkäänniemi et al.: no guidance at the noisiest and the last steps
DEFAULT_CLASSIFIER_SCALE = 4.0
DEFAULT_SHOWN_CALLS = 4               # the model calls whose directions are drawn
MAX_SHOWN_CALLS = 8
GUIDANCE_EVAL = ASSETS_DIR / "guidance-eval.json"   # written by bench/guidance.py
NO_JUDGE_CLASS = "prompt names no judge class"


# ----------------------------------------------------------------------------- what comes back


@dataclass
class JudgeReading:
    """The emoji judge on one final image: its top-3 base emoji and where the prompt's class ranks."""
    top3: list[tuple[str, float]]            # (class name, probability), most likely first
    named_class: str | None                  # the judge class the prompt names; None: it names none
    rank: int | None                         # 1 = the judge's top guess; None without a named class

    def summary(self) -> str:
        guesses = ", ".join(f"{name} {probability:.2f}" for name, probability in self.top3)
        if self.rank is None:
            return f"{NO_JUDGE_CLASS}; judge: {guesses}"
        hits = f"top-1 {'✓' if self.rank == 1 else '✗'}, top-5 {'✓' if self.rank <= 5 else '✗'}"
        return f"“{self.named_class}” ranks {self.rank} ({hits}); judge: {guesses}"


@dataclass
class MethodRun:
    """One method's run: the directions it added at every model call, its final image and what the judge says."""
    method: str
    request: Txt2ImgRequest
    timesteps: list[float]                                   # t at each model call
    norms: dict[str, list[float]]                            # component -> RMS of that direction at each call
    directions: dict[int, dict[str, torch.Tensor]]           # shown call -> component -> direction (CPU, 1×C×h×w)
    cosines: list[float] = field(default_factory=list)       # CFG + classifier: COSINE at each call
    final_image: Image.Image | None = None
    judge: JudgeReading | None = None
    model_evaluations: int = 0                               # UNet rows: a call with CFG and PAG is 3
    seconds: float = 0.0
    stopped: bool = False

    @property
    def components(self) -> tuple[str, ...]:
        return COMPONENTS[self.method]

    def numbers(self) -> dict:
        judge = None if self.judge is None else {"top3": self.judge.top3, "named_class": self.judge.named_class,
                                                 "rank": self.judge.rank}
        return {"timesteps": self.timesteps, "rms": self.norms, "judge": judge,
                "model_evaluations": self.model_evaluations, "seconds": round(self.seconds, 3),
                **({"cosine": [None if math.isnan(c) else c for c in self.cosines]} if self.cosines else {})}

    def caption(self) -> str:
        judged = self.judge.summary() if self.judge is not None else "no judge"
        return f"{self.method} · {judged} · {self.model_evaluations} evaluations, {self.seconds:.2f} s"


@dataclass
class GuidanceComparison:
    seed: int
    runs: list[MethodRun]
    shown_calls: list[int]                   # the model calls whose directions are kept (and drawn)
    held_out: list[dict]                     # bench/guidance.py's rows, one per method (empty: no file)
    held_out_about: str                      # where they come from, or why there are none
    notes: list[str]
    latent_to_rgb: torch.Tensor | None = None   # the model's preview map (channels + 1, 3), to draw directions

    def numbers(self) -> dict:
        """What the plot and the captions show, as JSON for API clients."""
        return {"seed": self.seed, "shown_calls": self.shown_calls,
                "methods": {run.method: run.numbers() for run in self.runs}}


# ----------------------------------------------------------------------------- the comparison


def compare_guidance(models: ModelManager, *, prompt: str, negative_prompt: str = "", seed: int = -1,
                     steps: int = 25, sampler: str = DEFAULT_SAMPLER, guidance_scale: float = 7.5,
                     methods: list[str] | tuple[str, ...] = (NONE, CFG, INTERVAL, ICG, CFG_PAG),
                     pag_scale: float = DEFAULT_PAG_SCALE, pag_layers: str = DEFAULT_PAG_LAYERS,
                     cfg_start: float = DEFAULT_INTERVAL[0], cfg_end: float = DEFAULT_INTERVAL[1],
                     classifier_class: str = "", classifier_scale: float = DEFAULT_CLASSIFIER_SCALE,
                     width: int | None = None, height: int | None = None, shown_calls: int = DEFAULT_SHOWN_CALLS,
                     held_out_path: Path = GUIDANCE_EVAL, stop: threading.Event | None = None,
                     on_step: Callable[[int, int], None] | None = None) -> GuidanceComparison:
    """Run one seed under each of `methods` (GUIDANCE_METHODS), recording what each adds at every model call.
    A method that cannot run here (classifier guidance without a classifier for the loaded model) is left out and
    the notes say why; if none can run, ValueError. `on_step(done, total)` reports progress; a set `stop` ends the
    run at the next call."""
    # 1. Check inputs: every method's request validates itself, with one seed for all
    base, requests, notes = _method_requests(
        models, methods, shown_calls, prompt=prompt or "", negative_prompt=negative_prompt or "", seed=seed,
        steps=steps, sampler=sampler, guidance_scale=guidance_scale, width=width, height=height,
        options={INTERVAL: {"cfg_start": cfg_start, "cfg_end": cfg_end}, ICG: {"cfg_method": "ICG"},
                 PAG: {"guidance_scale": 1.0, "pag_scale": pag_scale, "pag_layers": pag_layers},
                 CFG_PAG: {"pag_scale": pag_scale, "pag_layers": pag_layers}, NONE: {"guidance_scale": 1.0},
                 CLASSIFIER: {"classifier_class": classifier_class, "classifier_scale": classifier_scale}})

    # 2. Each method from the same noise, set up as Generator sets it up, recording its directions
    runs: list[MethodRun] = []
    call, shown, progress, left = None, [], {"done": 0, "total": 0}, len(requests)
    said: dict[str, list[str]] = {}      # each note of the calls -> the methods it came from

    def report():
        progress["done"] += 1
        if on_step is not None:
            on_step(progress["done"], progress["total"])

    check_unet_model(models.current, "The Diffusion Explorer's guidance comparison")
    if models.current is not None and is_edm(models.current.scheduler_config):
        raise ValueError(edm_refusal("The Diffusion Explorer's guidance comparison (x̂_0 and ε per step from ᾱ_t)",
                                     "compare the samplers instead, or generate with each guidance in Text-to-Image"))
    for method, request in requests.items():
        if stop is not None and stop.is_set():
            notes.append(f"Stopped before {method}.")
            break
        try:
            call = prepare(models, request)
        except ValueError as error:
            if method != CLASSIFIER:
                raise
            notes.append(f"**{CLASSIFIER}** left out: {error}")   # the others run: it needs its own classifier
            left -= 1
            continue
        if not shown:
            count = _model_calls(call)
            shown, progress["total"] = _shown_calls(count, shown_calls), count * left
        runs.append(run_method(method, call, shown=shown, stop=stop, on_call=report))
        for note in call.notes:          # a note every method got (a long prompt's windows) is told once
            said.setdefault(note, []).append(method)
        if runs[-1].stopped:
            notes.append(f"{method} stopped after {len(runs[-1].timesteps)} model call(s): its image is unfinished.")
    if not runs:
        raise ValueError(" ".join(notes) or "Stopped before the first method.")
    notes += [f"{', '.join(where)}: {note}" for note, where in said.items()]
    if guidance_scale <= 1 and {CFG, INTERVAL, ICG, CFG_PAG, CLASSIFIER} & set(requests):
        notes.append(f"CFG acts above scale 1: at {guidance_scale:g} its directions are zero (one pass per call).")

    # 3. What the judge says of each final image, and the held-out figures
    notes += judge_runs(runs, base.prompt)
    held_out, held_out_about = read_held_out(held_out_path)
    return GuidanceComparison(seed=base.seed, runs=runs, shown_calls=shown, held_out=held_out,
                              held_out_about=held_out_about, notes=notes, latent_to_rgb=latent_to_rgb(call))


def _method_requests(models: ModelManager, methods, shown_calls, *, options: dict, width, height, **settings
                     ) -> tuple[Txt2ImgRequest, dict[str, Txt2ImgRequest], list[str]]:
    """The shared request (its seed drawn once) and each method's, as `options` changes it; classifier guidance
    that cannot be asked for here is left out with a note, any other bad setting is refused."""
    methods = list(dict.fromkeys(methods or ()))
    if not methods:
        raise ValueError(f"Tick at least one guidance method: {', '.join(GUIDANCE_METHODS)}.")
    unknown = [method for method in methods if method not in GUIDANCE_METHODS]
    if unknown:
        raise ValueError(f"Unknown guidance method(s) {', '.join(map(repr, unknown))}; valid ones are "
                         f"{', '.join(GUIDANCE_METHODS)}.")
    if settings["sampler"] not in STEPWISE_SAMPLER_NAMES:
        raise ValueError(f"The guidance panel runs one model call per step, so it takes "
                         f"{', '.join(STEPWISE_SAMPLER_NAMES)}; {settings['sampler']!r} is not one of them.")
    if isinstance(shown_calls, bool) or not isinstance(shown_calls, int) or not 1 <= shown_calls <= MAX_SHOWN_CALLS:
        raise ValueError(f"`shown_calls` must be a whole number from 1 to {MAX_SHOWN_CALLS} but is {shown_calls!r}.")
    side = (models.current.native_side if models.current is not None else None) or 64
    base = Txt2ImgRequest(**settings, width=width or side, height=height or side).resolved()
    requests, notes = {}, []
    for method in methods:
        try:
            requests[method] = replace(base, **options.get(method, {}))
        except ValueError as error:
            if method != CLASSIFIER:
                raise
            notes.append(f"**{CLASSIFIER}** left out: {error}")
    return base, requests, notes


def _model_calls(call: PreparedCall) -> int:
    scheduler = call.pipeline.scheduler
    set_schedule(scheduler, call.request.steps, call.request.schedule, unet_config=call.pipeline.unet.config)
    return len(scheduler.timesteps)


def _shown_calls(count: int, wanted: int) -> list[int]:
    """`wanted` model calls spread evenly from the first to the last (fewer when there are fewer calls)."""
    return sorted({round(float(index)) for index in np.linspace(0, count - 1, min(wanted, count))})


def run_method(method: str, call: PreparedCall, *, shown: list[int], stop: threading.Event | None = None,
               on_call: Callable[[], None] | None = None) -> MethodRun:
    """`call` through the Denoiser as run_guided runs Text-to-Image (pipelines/tasks/guided.py), recording at every
    model call the directions `method` adds; the final image is decoded as Generator decodes it."""
    started = time.perf_counter()
    request, pipeline = call.request, call.pipeline
    scheduler, unet = pipeline.scheduler, pipeline.unet
    dtype = pipeline.text_encoder.dtype if pipeline.text_encoder is not None else unet.dtype
    generators = call.generators(0)
    call.seed_brownian_noise(0)
    denoiser = Denoiser(call, generators=generators)
    set_schedule(scheduler, request.steps, request.schedule, unet_config=unet.config, device=call.device)
    timesteps = scheduler.timesteps
    latents = pipeline.prepare_latents(1, unet.config.in_channels, request.height, request.width, dtype, call.device,
                                       generators)
    run = MethodRun(method=method, request=request, timesteps=[],
                    norms={component: [] for component in COMPONENTS[method]}, directions={})
    for index, t in enumerate(timesteps):
        if stop is not None and stop.is_set():
            run.stopped = True
            break
        result = denoiser.step(latents, t, index=index, count=len(timesteps))
        run.model_evaluations += denoiser.rows(index, len(timesteps)).chunks
        directions = guidance_directions(method, request, result.prediction, t, scheduler.alphas_cumprod)
        run.timesteps.append(float(t))
        for component, direction in directions.items():
            run.norms[component].append(rms(direction))
        if method == CLASSIFIER:
            run.cosines.append(_cosine(result.prediction))
        if index in shown:
            run.directions[index] = {name: direction.detach().float().cpu() for name, direction in directions.items()}
        latents = result.latents
        if on_call is not None:
            on_call()
    run.final_image = call.decode(latents)[0]
    run.seconds = time.perf_counter() - started
    return run


def guidance_directions(method: str, request: Txt2ImgRequest, prediction: NoisePrediction, t,
                        alphas_cumprod: torch.Tensor) -> dict[str, torch.Tensor]:
    """What `method` added to ε_c at this call, by component (COMPONENTS[method]); zero where it did not act
    (outside the guidance interval, CFG at scale ≤ 1)."""
    eps_cond = prediction.eps_cond.float()
    directions = {}
    for component in COMPONENTS[method]:
        if component in (CFG_DIRECTION, ICG_DIRECTION):    # ε_u is ε(ĉ) under ICG: the Denoiser swapped the prompt
            uncond = prediction.eps_uncond
            directions[component] = torch.zeros_like(eps_cond) if uncond is None else \
                request.guidance_scale * (eps_cond - uncond.float())
        elif component == PAG_DIRECTION:
            scale = pag_scale_at(request.pag_scale, request.pag_adaptive_scale, t)
            directions[component] = scale * (eps_cond - prediction.eps_perturbed.float())
        elif component == CLASSIFIER_DIRECTION:   # Dhariwal & Nichol, eq. 14: ε̂ = ε − √(1−ᾱ_t) s ∇log p(y|x_t)
            directions[component] = -math.sqrt(1.0 - alpha_bar_at(alphas_cumprod, t)) * request.classifier_scale * \
                prediction.classifier_gradient.float()
        elif component == CLASSIFIER_GRADIENT:
            directions[component] = prediction.classifier_gradient.float()
    return directions


def rms(tensor: torch.Tensor) -> float:
    """Root-mean-square over every element: a direction's size, whatever the latent's size."""
    return float(tensor.float().square().mean().sqrt())


def _cosine(prediction: NoisePrediction) -> float:
    if prediction.eps_uncond is None or prediction.classifier_gradient is None:
        return float("nan")
    difference = (prediction.eps_cond - prediction.eps_uncond).flatten().float()
    return float(torch.nn.functional.cosine_similarity(difference, -prediction.classifier_gradient.flatten().float(),
                                                       dim=0))


def latent_to_rgb(call: PreparedCall) -> torch.Tensor:
    """The model's live-preview map, latent -> RGB, (channels + 1, 3) with the offset last: the previewer Generator
    keeps on the model, fitted on first use."""
    if call.model.previewer is None:
        call.model.previewer = LatentPreviewer(call.pipeline.vae, call.pipeline.vae_scale_factor)
    return call.model.previewer.linear_map().detach().cpu()


# ----------------------------------------------------------------------------- the judge and the held-out figures


def judge_class(prompt: str, class_names: list[str]) -> str | None:
    """The judge class `prompt` names: the whole prompt, or its part before the first comma (the canonical prompts
    add ", medium skin tone" or ", twemoji style"), matched case-insensitively; None when it names none."""
    by_lower = {name.lower(): name for name in class_names}
    text = prompt.strip().lower()
    return by_lower.get(text) or by_lower.get(text.split(",")[0].strip())


def judge_runs(runs: list[MethodRun], prompt: str) -> list[str]:
    """Score each run's final image with the shipped emoji judge (run.judge); returns notes."""
    from pipelines.lora.judge import as_array, classify, load_judge

    try:
        judge, class_names = load_judge()
    except ValueError as error:
        return [f"The final images are not judged: {error}"]
    named = judge_class(prompt, class_names)
    logits = classify(judge, as_array([run.final_image for run in runs], judge.image_size))
    probabilities = torch.from_numpy(logits).double().softmax(dim=1).numpy()
    for run, row in zip(runs, probabilities):
        order = np.argsort(-row)
        rank = None if named is None else int(np.flatnonzero(order == class_names.index(named))[0]) + 1
        run.judge = JudgeReading(top3=[(class_names[i], float(row[i])) for i in order[:3]], named_class=named,
                                 rank=rank)
    if named is None:
        return [(f"The judge knows {len(class_names)} base emoji by name (e.g. “red apple”); “{prompt}”: "
                 f"{NO_JUDGE_CLASS}, so only its top-3 guesses are shown.")]
    return []


def read_held_out(path: Path = GUIDANCE_EVAL) -> tuple[list[dict], str]:
    """bench/guidance.py's figures per method as table rows ({"method": ..., figure: value, ...}), and a line saying
    where they come from (or why there are none). Read defensively: the file's layout is the bench's to decide, so
    rows may be under "rows" or "methods" (a list of objects, or an object keyed by method) or at the top level."""
    path = Path(path)
    if not path.is_file():
        return [], f"No held-out figures yet ({path.name} is missing): run `python -m bench.guidance`."
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        return [], f"{path.name} could not be read ({error}); run `python -m bench.guidance` again."
    table = record.get("rows", record.get("methods", record)) if isinstance(record, dict) else record
    if isinstance(table, dict):
        table = [{"method": name, **values} for name, values in table.items() if isinstance(values, dict)]
    rows = [{key: _scalar(value) for key, value in row.items() if _scalar(value) is not _SKIP}
            for row in (table if isinstance(table, list) else []) if isinstance(row, dict)]
    if not rows:
        return [], f"{path.name} holds no per-method rows; run `python -m bench.guidance` again."
    about = "; ".join(f"{key}: {record[key]}" for key in HELD_OUT_ABOUT if isinstance(record, dict) and key in record
                      and _scalar(record[key]) is not _SKIP)
    return rows, f"Held out, from {path.name}" + (f" ({about})" if about else "") + "."


HELD_OUT_ABOUT = ("prompts", "seeds", "fd_real_vs_real", "judge_held_out_top5", "date", "command")
_SKIP = object()


def _scalar(value):
    """A table cell: a number, text or None as it is; a flat object (a method's settings) as "key=value, ..."."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict) and all(isinstance(item, (str, int, float, bool)) for item in value.values()):
        return ", ".join(f"{key}={item}" for key, item in value.items())
    return _SKIP
