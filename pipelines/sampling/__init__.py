"""Samplers with loops of their own: speculative DDPM (the algorithm in speculative.py, its studio wiring in
studio.py). Importing this package registers their loops with the core."""

from pipelines.sampling import studio  # noqa: F401  (registers the speculative sampler's loop)
