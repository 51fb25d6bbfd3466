"""The one error boundary between the pipeline layer and the browser.

Bad input (ValueError, ModelLoadError) becomes a `gr.Error` with the message as written by the
pipeline layer, which says what was received and what to do. Anything unexpected is logged
with its traceback and shown plainly; the worker and the app keep serving either way.
"""

from __future__ import annotations

import functools
import inspect
import logging

import gradio as gr

from pipelines.memory import is_out_of_memory

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
