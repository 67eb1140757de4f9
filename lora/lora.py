"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

``dW = (alpha / rank) * up @ down``; the bypass forward is ``base(x) + scale * up(down(x))``.

- ``rank`` is the inner dimension r: ``down`` is [r, in] (Linear) or [r, in, *kernel]
  (Conv, the same kernel, stride, padding and dilation as the base layer); ``up`` is [out, r]
  (Linear) or [out, r, 1, ...] (Conv, 1x1).
- Init: ``down`` kaiming-uniform (a=sqrt(5)) from the run's generator, ``up`` zeros, so the
  delta is exactly zero at step 0.
- Saved keys (ComfyUI core, kohya and A1111 read them): ``<module>.lora_up.weight``,
  ``<module>.lora_down.weight``, ``<module>.alpha``. Conv weights are stored 4-D. ComfyUI
  applies ``W + (alpha / down.shape[0]) * (up.flatten(1) @ down.flatten(1)).reshape(W)``
  (comfy/weight_adapter/lora.py:174-208); a file without ``alpha`` gets scale 1.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Adapter, LayerGeometry, Saved, kaiming_uniform_, size


def _ones(g: LayerGeometry) -> tuple[int, ...]:
    return (1,) * len(g.kernel_size)


class LoRA(Adapter):
    NAME = "LoRA"
    UP_PARAMETERS = ("up",)
    SAVED = (
        Saved("lora_up.weight", "up",
              lambda g, d: ((g.out_features, d["rank"], *_ones(g)), (g.out_features, d["rank"]))),
        Saved("lora_down.weight", "down",
              lambda g, d: ((d["rank"], g.in_features, *g.kernel_size), (d["rank"], g.fan_in))),
    )

    def __init__(
        self,
        geometry: LayerGeometry,
        rank: int,
        alpha: float,
        compute_dtype: torch.dtype,
        generator: torch.Generator | None = None,
        *,
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__(geometry, compute_dtype, weight, bias)
        self.rank = rank
        self.alpha = float(alpha)
        g = geometry
        self.down = nn.Parameter(torch.empty(rank, g.in_features, *g.kernel_size))
        self.up = nn.Parameter(torch.zeros(g.out_features, rank, *_ones(g)))
        if generator is not None:
            kaiming_uniform_(self.down, generator)

    @classmethod
    def file_dims(cls, own):
        return {"rank": size(own["lora_down.weight"], 0)}

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        g = self.geometry
        hidden = g.linear_op(x, self.cast(self.down, x))
        up = (self.rounded(self.up).flatten(1) * self.scale).to(x.dtype)  # scale on the small side
        return g.pointwise_op(hidden, up)

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        down = self.rounded(self.down).flatten(1)
        up = self.rounded(self.up).flatten(1)
        return (up @ down).reshape(self.geometry.weight_shape) * self.scale
