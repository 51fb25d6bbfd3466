"""The core: requests and their checks, the task registry, samplers, prompts, the VAE, the prepared call
and the one denoising step, the loop scaffolding. It imports nothing from the rest of pipelines/."""
