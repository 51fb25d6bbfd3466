"""The one error boundary between the pipeline layer and the browser.

Bad input (ValueError, ModelLoadError) becomes a `gr.Error` with the message as written by the
pipeline layer, which says what was received and what to do. Anything unexpected is logged
with its traceback and shown plainly; the worker and the app keep serving either way.

Gradio reads an API call's values into its components before a handler runs (a slider's range, a
dropdown's choices, an uploaded file as an image), in words that name neither the setting nor,
for a file it cannot read, the user's file (its message names the server's temporary copy);
`name_input_errors` makes them name both, and what is accepted.
"""

from __future__ import annotations

import functools
import inspect
import logging
from pathlib import Path

import gradio as gr

from pipelines.models.memory import is_out_of_memory

log = logging.getLogger("studio")


def _as_gr_error(error: Exception) -> gr.Error:
    if isinstance(error, gr.Error):
        return error
    if is_out_of_memory(error):
        return gr.Error(f"Out of memory: {error}. Lower the size or batch, or pick a lower memory mode "
                        "in Models & memory.")
    if isinstance(error, ValueError):
        return gr.Error(str(error))
    log.exception("unexpected error in a UI handler")
    return gr.Error(f"Unexpected error ({type(error).__name__}: {error}). The studio is still running; "
                    "the console has the details.")


def user_errors(handler):
    """Decorate a Gradio handler (function or generator) so that errors reach the user as gr.Error."""
    if inspect.isgeneratorfunction(handler):
        @functools.wraps(handler)
        def generator_wrapper(*args, **kwargs):
            try:
                yield from handler(*args, **kwargs)
            except Exception as error:
                raise _as_gr_error(error) from error
        return generator_wrapper

    @functools.wraps(handler)
    def wrapper(*args, **kwargs):
        try:
            return handler(*args, **kwargs)
        except Exception as error:
            raise _as_gr_error(error) from error
    return wrapper


def name_input_errors(controls: dict) -> None:
    """Make each control's input errors name its request field (`controls`: field -> component) and what it takes.
    The components are ours, built for this app: their own `preprocess` is wrapped, not Gradio's classes."""
    for name, component in controls.items():
        if getattr(component, "_errors_named", False):     # shared by two tabs' triggers (inpaint, outpaint)
            continue
        component.preprocess = _named_preprocess(name, component, component.preprocess)
        component._errors_named = True


def _named_preprocess(name: str, component, preprocess):
    @functools.wraps(preprocess)
    def named(payload):
        try:
            return preprocess(payload)
        except Exception as error:
            raise gr.Error(_input_message(name, component, payload, error)) from error
    return named


def _input_message(name: str, component, payload, error: Exception) -> str:
    if isinstance(component, (gr.Slider, gr.Number)):
        low, high = component.minimum, component.maximum
        if low is not None and high is not None:
            return f"`{name}` must be a number from {low:g} to {high:g} but is {payload!r}."
        return f"`{name}` must be a number but is {payload!r}."
    if isinstance(component, (gr.Image, gr.ImageEditor)):
        # the user's own file name, never the server's copy of it (a temp path) nor the reader's exception
        what = "damaged or truncated" if "truncated" in str(error) else "damaged or not an image at all"
        return (f"`{name}` could not be read as an image from {_file_name(payload)}: it is {what}. Upload a PNG, "
                "JPEG or WebP file.")
    # a dropdown's or radio's choices, in Gradio's words (a gr.Error's str() is its message's repr)
    return f"`{name}`: {error.message if isinstance(error, gr.Error) else error}"


def _file_name(payload) -> str:
    """The name an uploaded file had on the user's machine (an image editor's: its background's); never a folder."""
    background = payload.get("background") if isinstance(payload, dict) else getattr(payload, "background", None)
    upload = background or payload
    field = upload.get if isinstance(upload, dict) else lambda key: getattr(upload, key, None)
    name = field("orig_name") or field("path")
    return Path(name).name if isinstance(name, str) and name and not name.startswith("data:") else "the file"
