"""DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation").

``W' = (W + dW) * m / ||W + dW||`` with ``dW`` a LoRA (``(alpha / rank) * up @ down``) and
``m`` a learned magnitude, one per **input** channel: the norm is taken over the output (and
kernel) axes of each input column, the axis on which ComfyUI normalises by the merged weight.

Why the input axis: ComfyUI's loader (``weight_decompose``, comfy/weight_adapter/base.py:56-85)
normalises by ``||W + dW||`` only when ``dora_scale`` is [1, in, 1, ...]; a dora_scale on the
output axis ([out, 1, ...]) is divided by the norm of the *base* weight ``||W||`` instead
(base.py:68-73), which is not DoRA. It adds ``finfo(float32).eps`` to the norm.

- ``rank``: the LoRA inner dimension, as for LoRA. ``alpha``: the LoRA scale alpha / rank.
- Training forward: a per-input-channel scale ``c = m / (||W + dW||_col + eps)`` commutes
  into the input, so ``y = base(c * x) + scale * up(down(c * x))``: no ``W + dW`` is built.
  The column norms come from ``||W||^2 + 2 <W, dW> + ||dW||^2``, where ``<W, dW>`` needs only
  ``up^T W`` (rank x in) and ``||dW||^2`` only ``up^T up`` (rank x rank). This needs ``W``:
  the adapter keeps a copy of the layer's weight in its own dtype, taken when it is created
  (the one algorithm that costs weight-sized memory; ``up^T W`` runs in that dtype).
- Init: LoRA's (``up`` zeros) and ``m = ||W||_col + eps`` computed by the same code as the
  forward, so ``c`` is exactly 1 and the delta exactly zero at step 0.
- Saved keys: LoRA's plus ``<module>.dora_scale`` [1, in, 1, ...] (Linear: [1, in]), always
  float32 (rounding ``m`` to bf16 would change the model by up to 0.4%).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import LayerGeometry, Saved, full_precision
from .lora import LoRA

EPS = torch.finfo(torch.float32).eps  # what ComfyUI adds to the norm of its float32 weight


class DoRA(LoRA):
    NAME = "DoRA"
    UP_PARAMETERS = ("up",)
    SAVED = (
        Saved("dora_scale", "magnitude", lambda g, d: (
            (1, g.in_features, *((1,) * len(g.kernel_size))), (1, g.in_features)), float32=True),
        *LoRA.SAVED,
    )
    USES_BASE_WEIGHT = True

    def __init__(self, geometry: LayerGeometry, rank: int, alpha: float,
                 compute_dtype: torch.dtype, generator: torch.Generator | None = None, *,
                 weight: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> None:
        super().__init__(geometry, rank, alpha, compute_dtype, generator, weight=weight, bias=bias)
        g = geometry
        columns = self.base_weight.float().reshape(g.out_features, g.in_features, -1)
        self.register_buffer("base_sq", columns.square().sum(dim=(0, 2)), persistent=False)
        with torch.no_grad():
            norm = self.column_norm(self.rounded(self.up).flatten(1), self.rounded(self.down).flatten(1))
        self.magnitude = nn.Parameter(norm.clone())

    def column_norm(self, up: torch.Tensor, down: torch.Tensor,
                    weight: torch.Tensor | None = None) -> torch.Tensor:
        """``||W + scale * up @ down||`` per input channel, + eps (float32, [in]).

        ``W`` is the copy taken at creation unless ``weight`` is given.
        """
        g, s = self.geometry, self.scale
        rank = down.shape[0]
        with full_precision(up):
            if weight is None:
                weight, base_sq = self.base_weight, self.base_sq
            else:
                base_sq = weight.float().reshape(g.out_features, g.in_features, -1).square().sum(dim=(0, 2))
            # <W, up @ down> terms, in W's dtype (a bf16 model's copy stays bf16)
            projected = (up.t().to(weight.dtype) @ weight.flatten(1)).float()
            cross = down * projected
            own = down * ((up.t() @ up) @ down)  # ||up @ down||^2 terms
            cross = cross.reshape(rank, g.in_features, -1).sum(dim=(0, 2))
            own = own.reshape(rank, g.in_features, -1).sum(dim=(0, 2))
            squared = base_sq + (2 * s) * cross + (s * s) * own
        return squared.clamp_min(0).sqrt() + EPS

    def input_scale(self) -> torch.Tensor:
        up = self.rounded(self.up).flatten(1)
        down = self.rounded(self.down).flatten(1)
        return self.magnitude / self.column_norm(up, down)

    def bypass(self, base_forward):
        def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            scaled = x * self.per_channel(self.input_scale().to(x.dtype), x)
            out = base_forward(scaled, *args, **kwargs)
            return out + self.delta(scaled).to(out.dtype)

        return forward

    def merged_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        g = self.geometry
        weight = base_weight.float().reshape(g.weight_shape)
        merged = weight + super().delta_weight()
        up, down = self.rounded(self.up).flatten(1), self.rounded(self.down).flatten(1)
        norm = self.column_norm(up, down, weight)  # = ||merged||_col + eps, as the forward has it
        shape = (1, g.in_features, *([1] * len(g.kernel_size)))
        return (merged * (self.magnitude / norm).reshape(shape)).to(base_weight.dtype)

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        weight = self.weight_of(base_weight)
        return self.merged_weight(weight) - weight
