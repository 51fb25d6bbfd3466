"""Samplers by the names people know from A1111, each built from the loaded model's own
scheduler config with `from_config`, so the training schedule (betas, prediction type,
timestep spacing) carries over to every sampler.

A1111 >= 1.9 splits what older versions (and our names) call "DPM++ 2M Karras" into a sampler and a
`Schedule type`; `a1111_sampler` and `sampler_from_a1111` translate between the two forms.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, DPMSolverSDEScheduler,
                       EDMDPMSolverMultistepScheduler, EDMEulerScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, HeunDiscreteScheduler, LCMScheduler, LMSDiscreteScheduler, PNDMScheduler,
                       UniPCMultistepScheduler)

# name -> (scheduler class, overrides on top of the model's config)
SAMPLERS: dict[str, tuple[type, dict]] = {
    "Euler": (EulerDiscreteScheduler, {}),
    "Euler a": (EulerAncestralDiscreteScheduler, {}),
    "Heun": (HeunDiscreteScheduler, {}),
    "LMS": (LMSDiscreteScheduler, {}),
    "DDIM": (DDIMScheduler, {}),
    "DDPM": (DDPMScheduler, {}),
    # DDPM's chain, sampled speculatively (pipelines/sampling/): the same law, fewer target calls
    "DDPM speculative": (DDPMScheduler, {}),
    "PNDM": (PNDMScheduler, {"skip_prk_steps": True}),
    "DPM++ 2M": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "DPM++ 2M Karras": (DPMSolverMultistepScheduler,
                        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "DPM++ SDE Karras": (DPMSolverSDEScheduler, {"use_karras_sigmas": True}),
    "UniPC": (UniPCMultistepScheduler, {}),
    "LCM": (LCMScheduler, {}),
}
SAMPLER_NAMES = tuple(SAMPLERS)
# A UNet trained in Karras et al.'s EDM formulation (Playground v2.5: SDXL's UNet on σ from 0.002 to 80, its input,
# output and noise level preconditioned by σ) has no DDPM schedule for the samplers above: it runs diffusers' EDM
# schedulers, offered by the names of ours they are: its DPM++ 2M steps Karras's σ spacing (as A1111 and Forge write
# it), its Euler the model's own (Karras's too by default)
EDM_SAMPLERS: dict[str, tuple[type, dict]] = {
    "Euler": (EDMEulerScheduler, {}),
    "DPM++ 2M Karras": (EDMDPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                         "sigma_schedule": "karras"}),
}
# Samplers that step one model call at a time (every task and the explorer's trace): all but speculative DDPM,
# which verifies several steps per call and runs Text-to-Image only
SPECULATIVE_SAMPLER = "DDPM speculative"
STEPWISE_SAMPLER_NAMES = tuple(name for name in SAMPLER_NAMES if name != SPECULATIVE_SAMPLER)
# The speculative sampler's drafts (pipelines/sampling/speculative.py says what each proposes)
FROZEN_DRAFT = "frozen target"        # reuse the target's last noise prediction
FROZEN_X0_DRAFT = "frozen target x0"  # reuse the target's last prediction of the data, x̂_0
MODEL_DRAFT = "draft model"           # a small UNet that imitates the target (recipe/draft.py)
ANCHORED_DRAFT = "anchored draft model"   # ... proposing only how x̂_0 moves from the target's last one
DRAFTS = (FROZEN_DRAFT, FROZEN_X0_DRAFT, MODEL_DRAFT, ANCHORED_DRAFT)
MODEL_DRAFTS = (MODEL_DRAFT, ANCHORED_DRAFT)
DEFAULT_DRAFT_LENGTH = 4
MAX_DRAFT_LENGTH = 16
DEFAULT_SAMPLER = "DPM++ 2M"
# Samplers that draw fresh noise at every step (they use the request's generator).
STOCHASTIC = frozenset({"Euler a", "DDPM", SPECULATIVE_SAMPLER, "DPM++ SDE Karras", "LCM"})


# How A1111 >= 1.9 writes each of our samplers: (its `Sampler`, its `Schedule type`). Its "Automatic" is the
# sampler's own default: Karras for DPM++ 2M and DPM++ SDE, the model's own sigmas for the others (the
# schedule ours use), so our plain DPM++ 2M is "Uniform" there (the model's sigmas). A1111 calls PNDM's
# pseudo linear multi-step method PLMS; it has no DDPM, so those keep our names.
A1111_SAMPLERS: dict[str, tuple[str, str]] = {
    "Euler": ("Euler", "Automatic"),
    "Euler a": ("Euler a", "Automatic"),
    "Heun": ("Heun", "Automatic"),
    "LMS": ("LMS", "Automatic"),
    "DDIM": ("DDIM", "Automatic"),
    "DDPM": ("DDPM", "Automatic"),
    "DDPM speculative": ("DDPM speculative", "Automatic"),
    "PNDM": ("PLMS", "Automatic"),
    "DPM++ 2M": ("DPM++ 2M", "Uniform"),
    "DPM++ 2M Karras": ("DPM++ 2M", "Karras"),
    "DPM++ SDE Karras": ("DPM++ SDE", "Karras"),
    "UniPC": ("UniPC", "Automatic"),
    "LCM": ("LCM", "Automatic"),
}
# A1111's schedule types (modules/sd_schedulers.py), and what "Automatic" stands for where it is not the model's
# own sigmas ("Uniform"); of the samplers we share, only these two default to another schedule.
A1111_SCHEDULE_TYPES = ("Automatic", "Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform",
                        "KL Optimal", "Align Your Steps", "Simple", "Normal", "DDIM", "Beta")
A1111_AUTOMATIC_SCHEDULE = {"DPM++ 2M": "Karras", "DPM++ SDE": "Karras"}


def a1111_sampler(name: str) -> tuple[str, str]:
    """(`Sampler`, `Schedule type`) as A1111 >= 1.9 writes our sampler `name`."""
    check_sampler(name)
    return A1111_SAMPLERS[name]


def _concrete_schedule(a1111_name: str, schedule_type: str) -> str:
    """The schedule an A1111 sampler really runs with: "Automatic" resolved to the sampler's default."""
    if schedule_type == "Automatic":
        return A1111_AUTOMATIC_SCHEDULE.get(a1111_name, "Uniform")
    return schedule_type


def sampler_from_a1111(sampler: str, schedule_type: str | None) -> tuple[str, str | None]:
    """Our sampler for an infotext's `Sampler` and `Schedule type`, and the schedule type if it was not kept.

    Reads both forms: A1111 >= 1.9's "DPM++ 2M" + "Karras", and the one-name form "DPM++ 2M Karras" (ours
    until now, and A1111's before 1.9), in which a sampler without a schedule type runs its plain schedule
    ("Uniform"). A sampler we don't have comes back as it is, for the caller to say so; a schedule type that
    none of ours runs with that sampler gives the sampler as A1111's "Automatic" runs it, and the schedule type
    back as not kept.
    """
    # 1. The one-name form: "DPM++ 2M Karras" is "DPM++ 2M" with the Karras schedule (A1111 reads it so too)
    for label in sorted(A1111_SCHEDULE_TYPES, key=len, reverse=True):
        if sampler.lower().endswith((" " + label.lower(), " " + label.lower().replace(" ", "_"))):
            sampler, schedule_type = sampler[:-len(label) - 1], label
            break
    schedule = _concrete_schedule(sampler, schedule_type or "Uniform")
    # 2. The same sampler and schedule among ours
    ours_by_schedule = {_concrete_schedule(name, kept): ours for ours, (name, kept) in A1111_SAMPLERS.items()
                        if name == sampler}
    if not ours_by_schedule:
        return sampler, None
    if schedule in ours_by_schedule:
        return ours_by_schedule[schedule], None
    # 3. A schedule none of ours runs with this sampler: the sampler as "Automatic" runs it, the schedule dropped
    nearest = ours_by_schedule.get(_concrete_schedule(sampler, "Automatic"), next(iter(ours_by_schedule.values())))
    return nearest, schedule_type or "Uniform"


def check_sampler(name: str) -> None:
    if name not in SAMPLERS:
        raise ValueError(f"Unknown sampler {name!r}. Valid samplers: {', '.join(SAMPLER_NAMES)}.")


def is_edm(model_scheduler_config: dict) -> bool:
    """Whether the model is trained in the EDM formulation (it ships one of diffusers' EDM schedulers)."""
    return str(dict(model_scheduler_config).get("_class_name", "")).startswith("EDM")


def edm_refusal(what: str, instead: str) -> str:
    """Why `what`, built on DDPM's ᾱ_t schedule, does not run an EDM model, and what to do `instead`."""
    return (f"{what} works on DDPM's noise schedule (ᾱ_t), and this model is trained in the EDM formulation (noise "
            f"levels σ, preconditioned, as Playground v2.5), which has none; {instead}.")


def edm_default(sampler: str, model_scheduler_config: dict) -> tuple[str, list[str]]:
    """The sampler an EDM model runs for `sampler`: the studio's default (DPM++ 2M, which steps DDPM's σ) becomes the
    model's own, said in a note; any other name is left for `make_scheduler` to run or refuse."""
    if sampler != DEFAULT_SAMPLER or not is_edm(model_scheduler_config):
        return sampler, []
    own = model_default_sampler(model_scheduler_config)
    return own, [f"{sampler} steps DDPM's noise schedule and this model is trained in the EDM formulation; this ran "
                 f"its own sampler, {own}."]


def make_scheduler(name: str, model_scheduler_config: dict):
    """A fresh scheduler `name`, configured from the model's own scheduler config (an EDM model's: its EDM
    scheduler of that name)."""
    check_sampler(name)
    if is_edm(model_scheduler_config):
        if name not in EDM_SAMPLERS:
            raise ValueError(f"The {name} sampler steps DDPM's noise schedule, and this model is trained in the EDM "
                             f"formulation (σ-preconditioned, as Playground v2.5): it runs {', '.join(EDM_SAMPLERS)}.")
        scheduler_class, overrides = EDM_SAMPLERS[name]
        keep = set(inspect.signature(scheduler_class.__init__).parameters)
        return scheduler_class(**{k: v for k, v in dict(model_scheduler_config).items() if k in keep} | overrides)
    scheduler_class, overrides = SAMPLERS[name]
    config = {k: v for k, v in dict(model_scheduler_config).items()
              if k not in ("use_karras_sigmas", "algorithm_type", "solver_order")}
    return scheduler_class.from_config(config, **overrides)


def model_default_sampler(model_scheduler_config: dict) -> str:
    """The registry name of the scheduler class the model ships with (fallback DEFAULT_SAMPLER; an EDM model's:
    its EDM scheduler's name, else Euler)."""
    class_name = dict(model_scheduler_config).get("_class_name")
    karras = dict(model_scheduler_config).get("use_karras_sigmas", False)
    if is_edm(model_scheduler_config):
        return next((name for name, (kind, _) in EDM_SAMPLERS.items() if kind.__name__ == class_name), "Euler")
    for name, (scheduler_class, overrides) in SAMPLERS.items():
        if scheduler_class.__name__ == class_name and overrides.get("use_karras_sigmas", False) == karras:
            return name
    return DEFAULT_SAMPLER


# ----------------------------------------------------------------------------- samplers with loops of their own


@dataclass(frozen=True)
class SamplerLoop:
    """A sampler that is not one scheduler step per model call (speculative DDPM): its own loop, with
    `PreparedCall.__call__`'s signature, and `check(task, pipeline, model_name)`, which refuses before
    anything is loaded what the loop does not run."""
    run: Callable
    check: Callable


# The samplers whose loop lives above the core register it here (pipelines/sampling/ on import).
SAMPLER_LOOPS: dict[str, SamplerLoop] = {}
NEEDS_OWN_LOOP = frozenset({SPECULATIVE_SAMPLER})


def register_sampler_loop(name: str, loop: SamplerLoop) -> None:
    check_sampler(name)
    SAMPLER_LOOPS[name] = loop


def sampler_loop(name: str) -> SamplerLoop | None:
    """The sampler's own loop (None: one scheduler step per model call, in the task's or diffusers' loop)."""
    if name in NEEDS_OWN_LOOP and name not in SAMPLER_LOOPS:
        raise RuntimeError(f"The {name} sampler's loop is not registered: import pipelines.sampling first.")
    return SAMPLER_LOOPS.get(name)
