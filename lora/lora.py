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

from .base import Adapter, LayerGeometry, alpha_of, kaiming_uniform_


class LoRA(Adapter):
    NAME = "LoRA"
    ALPHA_OVER_RANK = True
    UP_PARAMETERS = ("up",)
    KEYS = ("lora_up.weight", "lora_down.weight")

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
        spatial_ones = (1,) * len(g.kernel_size)
        self.down = nn.Parameter(torch.empty(rank, g.in_features, *g.kernel_size))
        self.up = nn.Parameter(torch.zeros(g.out_features, rank, *spatial_ones))
        if generator is not None:
            kaiming_uniform_(self.down, generator)

    @classmethod
    def identifies(cls, tensors, prefix) -> bool:
        return f"{prefix}.lora_up.weight" in tensors and f"{prefix}.dora_scale" not in tensors

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        g = self.geometry
        hidden = g.linear_op(x, self.cast(self.down, x))
        up = (self.rounded(self.up).flatten(1) * self.scale).to(x.dtype)  # scale on the small side
        return g.pointwise_op(hidden, up)

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        down = self.rounded(self.down).flatten(1)
        up = self.rounded(self.up).flatten(1)
        return (up @ down).reshape(self.geometry.weight_shape) * self.scale

    def to_state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        return {
            f"{prefix}.lora_up.weight": self.saved(self.up),
            f"{prefix}.lora_down.weight": self.saved(self.down),
            f"{prefix}.alpha": torch.tensor(self.alpha, dtype=torch.float32),
        }

    @classmethod
    def from_state_dict(
        cls, geometry: LayerGeometry, tensors: dict[str, torch.Tensor], prefix: str,
        compute_dtype: torch.dtype, *, weight=None, bias=None,
    ) -> "LoRA":
        """Rebuild from saved keys; shapes were checked with :meth:`expected_shapes`."""
        up = tensors[f"{prefix}.lora_up.weight"]
        down = tensors[f"{prefix}.lora_down.weight"]
        rank = down.shape[0]
        alpha = alpha_of(tensors, prefix)
        alpha = alpha if alpha is not None else float(rank)  # absent: ComfyUI uses scale 1
        adapter = cls(geometry, rank, alpha, compute_dtype, weight=weight, bias=bias)
        with torch.no_grad():
            adapter.down.copy_(down.float().reshape(adapter.down.shape))
            adapter.up.copy_(up.float().reshape(adapter.up.shape))
        return adapter

    @staticmethod
    def expected_shapes(geometry: LayerGeometry, tensors: dict[str, torch.Tensor], prefix: str):
        """The shapes the saved keys must have for ``geometry``: {key: accepted shapes}."""
        g = geometry
        down_shape = tensors[f"{prefix}.lora_down.weight"].shape
        rank = down_shape[0] if len(down_shape) else 0
        ones = (1,) * len(g.kernel_size)
        down = (rank, g.in_features, *g.kernel_size)
        flat_down = (rank, g.fan_in)
        up = (g.out_features, rank, *ones)
        return {
            f"{prefix}.lora_down.weight": {down, flat_down},
            f"{prefix}.lora_up.weight": {up, (g.out_features, rank)},
        }
