"""The REST API's HTTP edge (studio/rest_api.py serves it): A1111's request bodies with their names and defaults,
its error answers, and the HTTP basic auth of `--auth`."""

from __future__ import annotations

import logging
import secrets
from typing import Any

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException

from pipelines.io import metadata
from pipelines.models.memory import is_out_of_memory
from studio import a1111

log = logging.getLogger("studio.rest_api")


# ----------------------------------------------------------------------------- bodies (A1111's names and defaults)


class GenerationBody(BaseModel):
    """What txt2img and img2img share (A1111's StableDiffusionProcessing fields); other keys are accepted."""
    model_config = ConfigDict(extra="allow")
    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] = []
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    scheduler: str | None = None
    sampler_index: str = a1111.A1111_DEFAULT_SAMPLER
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    distilled_cfg_scale: float | None = None   # Forge's: Flux.1 dev's distilled guidance (None: 3.5)
    width: int | None = None           # A1111: 512; here the loaded model's native size
    height: int | None = None
    restore_faces: bool | None = None
    tiling: bool | None = None
    override_settings: dict[str, Any] = {}
    override_settings_restore_afterwards: bool = True
    script_name: str | None = None
    script_args: list = []
    send_images: bool = True
    save_images: bool = False          # as in A1111, API images go to outputs/ only when asked
    alwayson_scripts: dict[str, Any] = {}


class Txt2ImgBody(GenerationBody):
    enable_hr: bool = False
    denoising_strength: float | None = None


class Img2ImgBody(GenerationBody):
    init_images: list[str] | None = None
    resize_mode: int = 0
    denoising_strength: float = 0.75
    mask: str | None = None
    mask_blur: int = 4
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    include_init_images: bool = False


class PngInfoBody(BaseModel):
    image: str


# ----------------------------------------------------------------------------- errors, as A1111 answers them


def error_response(error: Exception) -> JSONResponse:
    """`{"error", "detail", "body", "errors"}` with the status the error deserves: what was sent is named."""
    headers = None
    if isinstance(error, HTTPException):
        status, detail, headers = error.status_code, str(error.detail), getattr(error, "headers", None)
    elif isinstance(error, RequestValidationError):
        status = 422
        detail = "; ".join(f"`{'.'.join(str(part) for part in item['loc'] if part != 'body')}`: {item['msg']} "
                           f"(it is {item.get('input')!r})" for item in error.errors())
    elif is_out_of_memory(error):
        status, detail = 500, f"Out of memory: {error}. Lower the size or batch."
    elif isinstance(error, metadata.DiskSpaceError):     # the server's disk, not the request, is at fault
        status, detail = 507, str(error)
    elif isinstance(error, ValueError):
        status, detail = 422, a1111.in_a1111_terms(str(error))
    else:
        log.exception("unexpected error in a REST call", exc_info=error)
        status = 500
        detail = (f"Unexpected error ({type(error).__name__}: {error}). The studio is still running; the console "
                  "has the details.")
    return JSONResponse(status_code=status, headers=headers,
                        content={"error": type(error).__name__, "detail": detail, "body": "", "errors": detail})


class A1111Route(APIRoute):
    """A route whose every error, request validation included, answers as A1111's API does."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def answer(request: Request):
            try:
                return await handler(request)
            except Exception as error:
                return error_response(error)
        return answer


def basic_auth(user: str, password: str):
    """A dependency that lets through only HTTP basic auth with these credentials (A1111's --api-auth)."""
    security = HTTPBasic(auto_error=False)

    def check(credentials: HTTPBasicCredentials | None = Depends(security)) -> None:
        if credentials is None or not (secrets.compare_digest(credentials.username.encode(), user.encode()) &
                                       secrets.compare_digest(credentials.password.encode(), password.encode())):
            raise HTTPException(status_code=401, detail="Incorrect username or password (this studio was started "
                                "with --auth; send HTTP basic auth).", headers={"WWW-Authenticate": "Basic"})
    return check
