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
    at most every ``preview_seconds`` (and on the last step, and when a sample preview is
    new), a preview image: the loss curve so far (with the validation series), and beside it
    the newest sample previews of ``previews`` when the run makes them. Raises ComfyUI's
    interrupt exception when the user pressed Cancel.
    """

    def __init__(self, total: int, preview_seconds: float = 2.0) -> None:
        self.bar = comfy.utils.ProgressBar(total)
        self.losses: list[float] = []
        self.validation: list[list[float]] = []
        self.previews = None  # a long_runs.Previews, set by the node when previews are on
        self.preview_seconds = preview_seconds
        self._last_preview = 0.0
        self._shown_rows = 0
        self.server, self.node_id = _server_and_node()

    def __call__(self, report) -> None:
        step, total, loss = report.step, report.total, report.loss
        self.losses.append(loss)
        if report.validation is not None:
            self.validation.append([step, report.validation])
        rows = len(self.previews.rows) if self.previews is not None else 0
        preview = None
        now = time.monotonic()
        if (step == total or rows != self._shown_rows
                or now - self._last_preview >= self.preview_seconds):
            self._last_preview, self._shown_rows = now, rows
            preview = self._preview()
        if self.server is not None and self.node_id is not None:
            text = f"step {step}/{total}  loss {loss:.4f}"
            if self.validation:
                text += f"  validation {self.validation[-1][1]:.4f}"
            try:
                self.server.send_progress_text(text, self.node_id)
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
        series = {"loss": self.losses}
        if self.validation:
            series["validation"] = self.validation
        image = Image.fromarray(render_loss_plot(series, width=width, height=height))
        latest = self.previews.latest() if self.previews is not None else None
        if latest is not None:
            row = Image.fromarray((latest.numpy() * 255).round().astype("uint8"))
            row = row.resize((max(1, round(row.width * height / row.height)), height))
            both = Image.new("RGB", (width + row.width, height), "white")
            both.paste(image, (0, 0))
            both.paste(row, (width, 0))
            image = both
        return ("PNG", image, max(image.width, image.height))
