"""Plot Loss: a LOSS_MAP as a chart, shown in the node and returned as an IMAGE."""

from __future__ import annotations

import torch
from comfy_api.latest import io, ui

from ..training.plot import render_loss_plot
from .companion_spec import PLOT_LOSS
from .schema import build_schema


class PlotLoss(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return build_schema(PLOT_LOSS)

    @classmethod
    def execute(cls, loss, smoothing, log_scale, width, height) -> io.NodeOutput:
        if not isinstance(loss, dict):
            raise ValueError("loss must be a LOSS_MAP (a dict of named value lists); connect "
                             "Train LoRA's loss output.")
        pixels = render_loss_plot(loss, smoothing, log_scale, width, height)
        image = torch.from_numpy(pixels).float().div(255.0).unsqueeze(0)  # [1, H, W, 3]
        return io.NodeOutput(image, ui=ui.PreviewImage(image, cls=cls))
