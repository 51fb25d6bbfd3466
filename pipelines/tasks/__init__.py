"""The tasks, one registry entry each: Text-to-Image, Image-to-Image, inpainting, outpainting, ControlNet.

Importing this package registers them all; `TASKS` is then the complete registry.
"""

from pipelines.core.registry import TASKS, task_of
from pipelines.tasks import controlnet, img2img, inpaint, outpaint, txt2img  # noqa: F401  (each registers itself)

__all__ = ["TASKS", "task_of"]
