"""GLoRA (Chavan et al. 2023, "One-for-All: Generalized LoRA for Parameter-Efficient
Fine-tuning"), in the form ComfyUI and LyCORIS load.

``W' = W + (alpha / rank) * (W A + b1 @ b2)`` with ``A = a1 @ a2`` an [in, in] map on the
layer's input channels (for a conv: ``einsum("o i ..., i j -> o j ...", W, A)``):
``a1`` [in, r], ``a2`` [r, in], ``b1`` [out, r], ``b2`` [r, in, *kernel].

- ``rank`` is r, the inner dimension of both low-rank pairs. On a square layer it stays
  below ``in``: with ``r == in == out`` ComfyUI reads the file as old-style LyCORIS GLoRA
  (comfy/weight_adapter/glora.py:55-65).
- Training forward: ``W A x`` is the base layer applied to ``A x``, so
  ``y = base(x + s * a1(a2(x))) + s * b1(b2(x))`` (``s = alpha / rank``; ``a1``/``a2`` act on
  channels, ``b2`` is the layer's op with its kernel, stride and padding): the base layer
  runs once, on a shifted input, and no weight is built or copied.
- Init (LoRA-like, per pair): ``a2`` and ``b2`` kaiming-uniform (a=sqrt(5)), ``a1`` and ``b1``
  zeros, so the delta is exactly zero at step 0.
- Saved keys: ``a1.weight`` [in, r], ``a2.weight`` [r, in], ``b1.weight`` [out, r, 1, ...],
  ``b2.weight`` [r, in, *kernel] and ``alpha``. ComfyUI applies
  ``(alpha / a2.shape[0]) * ((W a1) a2 + b1 b2)`` (glora.py:67-90).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Adapter, LayerGeometry, Saved, kaiming_uniform_, size



def _ones(g: LayerGeometry) -> tuple[int, ...]:
    return (1,) * len(g.kernel_size)


class GLoRA(Adapter):
    NAME = "GLoRA"
    UP_PARAMETERS = ("a1", "b1")
    SAVED = (
        Saved("a1.weight", "a1",
              lambda g, d: ((g.in_features, d["rank"]), (g.in_features, d["rank"], *_ones(g)))),
        Saved("a2.weight", "a2",
              lambda g, d: ((d["rank"], g.in_features), (d["rank"], g.in_features, *_ones(g)))),
        Saved("b1.weight", "b1", lambda g, d: (
            (g.out_features, d["rank"], *_ones(g)), (g.out_features, d["rank"]))),
        Saved("b2.weight", "b2", lambda g, d: (
            (d["rank"], g.in_features, *g.kernel_size), (d["rank"], g.fan_in))),
    )

    def __init__(self, geometry: LayerGeometry, rank: int, alpha: float,
                 compute_dtype: torch.dtype, generator: torch.Generator | None = None, *,
                 weight=None, bias=None) -> None:
        super().__init__(geometry, compute_dtype, weight, bias)
        g = geometry
        self.rank = rank
        self.alpha = float(alpha)
        ones = (1,) * len(g.kernel_size)
        self.a1 = nn.Parameter(torch.zeros(g.in_features, rank))
        self.a2 = nn.Parameter(torch.empty(rank, g.in_features))
        self.b1 = nn.Parameter(torch.zeros(g.out_features, rank, *ones))
        self.b2 = nn.Parameter(torch.empty(rank, g.in_features, *g.kernel_size))
        nn.init.zeros_(self.a2)
        nn.init.zeros_(self.b2)
        if generator is not None:
            kaiming_uniform_(self.a2, generator)
            kaiming_uniform_(self.b2, generator)

    @classmethod
    def layer_rank(cls, geometry, rank):
        g = geometry
        rank = min(rank, g.fan_in, g.out_features, g.in_features)
        if g.in_features == g.out_features and rank >= g.out_features:
            rank = g.out_features - 1  # r == in == out would load as old-style GLoRA
        return max(1, rank)

    @classmethod
    def file_dims(cls, own):
        return {"rank": size(own["a2.weight"], 0)}

    @classmethod
    def check_dims(cls, geometry, dims, key):
        rank = dims["rank"]
        if geometry.in_features == geometry.out_features == rank:
            raise ValueError(
                f"The LoRA key {key[:-len('a1.weight')]}a2.weight has rank {rank} on a square "
                f"{rank}x{rank} layer, which ComfyUI reads as old-style LyCORIS GLoRA; it cannot "
                "be continued.")
        return dims

    def bypass(self, base_forward):
        g = self.geometry

        def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            a1, a2 = self.cast(self.a1, x), self.cast(self.a2, x)
            shifted = x + g.pointwise_op(g.pointwise_op(x, a2), a1) * self.scale
            out = base_forward(shifted, *args, **kwargs)
            b1, b2 = self.cast(self.b1, x), self.cast(self.b2, x)
            extra = g.pointwise_op(g.linear_op(x, b2), b1.flatten(1)) * self.scale
            return out + extra.to(out.dtype)

        return forward

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        g = self.geometry
        weight = self.weight_of(base_weight)
        a1, a2, b1, b2 = (self.rounded(p).flatten(1) for p in (self.a1, self.a2, self.b1, self.b2))
        mixed = torch.einsum("oi...,ij->oj...", weight, a1 @ a2)
        return (mixed + (b1 @ b2).reshape(g.weight_shape)) * self.scale
