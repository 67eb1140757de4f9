"""Live progress of a training run in ComfyUI: the progress bar, the current loss as node
text, a small loss-curve preview, and Cancel."""

from __future__ import annotations

import logging
import time

import comfy.model_management
import comfy.utils

from ..training.plot import render_loss_plot

log = logging.getLogger(__name__)

PREVIEW_SIZE = (448, 256)  # width, height of the in-node loss curve


def _server_and_node():
    """ComfyUI's PromptServer and the id of the executing node, when running in the server."""
    try:
        from comfy_execution.utils import get_executing_context
        from server import PromptServer
    except ImportError:
        return None, None
    context = get_executing_context()
    server = getattr(PromptServer, "instance", None)
    return server, (context.node_id if context is not None else None)


class LiveProgress:
    """The ``on_step`` callback of a run: call it after every optimizer step.

    Updates ComfyUI's progress bar each step; sends "step i/n, loss" text to the node and,
    at most every ``preview_seconds`` (and on the last step), a preview of the loss curve so
    far. Raises ComfyUI's interrupt exception when the user pressed Cancel.
    """

    def __init__(self, total: int, preview_seconds: float = 2.0) -> None:
        self.bar = comfy.utils.ProgressBar(total)
        self.losses: list[float] = []
        self.preview_seconds = preview_seconds
        self._last_preview = 0.0
        self.server, self.node_id = _server_and_node()

    def __call__(self, report) -> None:
        step, total, loss = report.step, report.total, report.loss
        self.losses.append(loss)
        preview = None
        now = time.monotonic()
        if step == total or now - self._last_preview >= self.preview_seconds:
            self._last_preview = now
            preview = self._preview()
        if self.server is not None and self.node_id is not None:
            try:
                self.server.send_progress_text(
                    f"step {step}/{total}  loss {loss:.4f}", self.node_id)
            except Exception as error:  # the UI text is a courtesy; training goes on
                log.debug("could not send progress text: %s", error)
        self.bar.update_absolute(step, total, preview)
        comfy.model_management.throw_exception_if_processing_interrupted()

    def _preview(self):
        try:
            from PIL import Image
        except ImportError:
            return None
        width, height = PREVIEW_SIZE
        image = render_loss_plot({"loss": self.losses}, width=width, height=height)
        return ("PNG", Image.fromarray(image), max(width, height))
