"""Samplers by the names people know from A1111, each built from the loaded model's own
scheduler config with `from_config`, so the training schedule (betas, prediction type,
timestep spacing) carries over to every sampler."""

from __future__ import annotations

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

# name -> (scheduler class, overrides on top of the model's config)
SAMPLERS: dict[str, tuple[type, dict]] = {
    "Euler": (EulerDiscreteScheduler, {}),
    "Euler a": (EulerAncestralDiscreteScheduler, {}),
    "Heun": (HeunDiscreteScheduler, {}),
    "LMS": (LMSDiscreteScheduler, {}),
    "DDIM": (DDIMScheduler, {}),
    "DDPM": (DDPMScheduler, {}),
    # DDPM's chain, sampled speculatively (pipelines/speculative.py): the same law, fewer target calls
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
# Samplers that step one model call at a time (every task and the explorer's trace): all but speculative DDPM,
# which verifies several steps per call and runs Text-to-Image only
STEPWISE_SAMPLER_NAMES = tuple(name for name in SAMPLER_NAMES if name != "DDPM speculative")
DEFAULT_SAMPLER = "DPM++ 2M"
# Samplers that draw fresh noise at every step (they use the request's generator).
STOCHASTIC = frozenset({"Euler a", "DDPM", "DDPM speculative", "DPM++ SDE Karras", "LCM"})


def check_sampler(name: str) -> None:
    if name not in SAMPLERS:
        raise ValueError(f"Unknown sampler {name!r}. Valid samplers: {', '.join(SAMPLER_NAMES)}.")


def make_scheduler(name: str, model_scheduler_config: dict):
    """A fresh scheduler `name`, configured from the model's own scheduler config."""
    check_sampler(name)
    scheduler_class, overrides = SAMPLERS[name]
    config = {k: v for k, v in dict(model_scheduler_config).items()
              if k not in ("use_karras_sigmas", "algorithm_type", "solver_order")}
    return scheduler_class.from_config(config, **overrides)


def model_default_sampler(model_scheduler_config: dict) -> str:
    """The registry name of the scheduler class the model ships with (fallback DEFAULT_SAMPLER)."""
    class_name = dict(model_scheduler_config).get("_class_name")
    karras = dict(model_scheduler_config).get("use_karras_sigmas", False)
    for name, (scheduler_class, overrides) in SAMPLERS.items():
        if scheduler_class.__name__ == class_name and overrides.get("use_karras_sigmas", False) == karras:
            return name
    return DEFAULT_SAMPLER
