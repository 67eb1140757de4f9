"""BOFT (Liu et al. 2024, "Parameter-Efficient Orthogonal Finetuning via Butterfly
Factorization").

``W' = M W`` with ``M = B_m ... B_1`` a product of ``m`` butterfly stages: stage ``i``
permutes the output channels (pairs ``2^i * b/2`` apart), rotates blocks of ``b`` channels
by Cayley-transformed orthogonal matrices (as in OFT), and permutes back. ``m`` stages mix
``2^(m-1) * b`` channels, so a few small blocks reach far more channels than OFT's.

- ``rank`` is the **block size** b: the largest even divisor of ``out`` not above
  ``max(rank, 2)``. The number of stages ``m`` is the largest ``out`` allows
  (``out`` divisible by ``2^(m-1) * b``; ``log2(out / b) + 1`` when ``out / b`` is a power
  of two). Parameters: ``m * out * b``. Layers with an odd ``out`` are left out (warning).
- ``alpha``: the COFT constraint on ``||Q||_F`` over all stages and blocks, as for OFT. The
  file always stores it: ComfyUI's BOFT compares ``alpha > 0`` without OFT's None check
  (comfy/weight_adapter/boft.py:62, 77), so a BOFT file without ``alpha`` does not apply.
- Training forward: ``y = base(x) + (M - I)(base(x) - bias)`` on the output channels; the
  layer's weight is never built or copied. With at least ``out`` tokens, ``M`` is built as
  an [out, out] matrix (the stages applied to the identity, O(m b out^2)) and applied with
  one channel matmul, which saves one activation for backward instead of one per stage;
  with fewer tokens the stages are applied to the activations (O(m b out tokens)). The
  adapter keeps a float32 copy of the bias.
- Init: all blocks zero, so every stage is the identity and the delta is exactly zero.
- Saved keys: ``<module>.oft_blocks`` [m, out / b, b, b] (4-D: ComfyUI reads it as BOFT) and
  ``alpha``. ComfyUI applies the stages to ``W`` exactly as :func:`butterfly` does
  (boft.py:84-112).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import LayerGeometry, Saved, full_precision, size
from .oft import Rotation, cayley


def butterfly_shape(dimension: int, rank: int) -> tuple[int, int]:
    """(stages m, block size b) for ``dimension`` output channels and a requested ``rank``."""
    size = max(d for d in range(2, max(2, min(rank, dimension)) + 1, 2) if dimension % d == 0)
    stages = 1
    while dimension % (2 ** stages * size) == 0:
        stages += 1
    return stages, size


def butterfly(rotations: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The stages ``rotations`` [m, blocks, b, b] applied to dim 0 of ``t``."""
    size = rotations.shape[-1]
    for i in range(rotations.shape[0]):
        stride = 2 ** i * (size // 2)
        t = t.unflatten(0, (-1, 2, stride)).transpose(1, 2).flatten(0, 2).unflatten(0, (-1, size))
        t = torch.einsum("bij,bj...->bi...", rotations[i], t)
        t = t.flatten(0, 1).unflatten(0, (-1, stride, 2)).transpose(1, 2).flatten(0, 2)
    return t


class BOFT(Rotation):
    NAME = "BOFT"
    SAVED = (Saved("oft_blocks", "blocks", lambda g, d: (
        (d["shape"][0], g.out_features // d["shape"][1], d["shape"][1], d["shape"][1]),), ndim=4),)
    USES_BASE_BIAS = True

    def __init__(self, geometry: LayerGeometry, rank: int, alpha: float,
                 compute_dtype: torch.dtype, generator: torch.Generator | None = None, *,
                 weight=None, bias=None, shape: tuple[int, int] | None = None) -> None:
        super().__init__(geometry, compute_dtype, weight, bias)
        self.stages, self.rank = shape or butterfly_shape(geometry.out_features, rank)
        self.alpha = float(alpha)
        count = geometry.out_features // self.rank
        self.blocks = nn.Parameter(torch.zeros(self.stages, count, self.rank, self.rank))

    @classmethod
    def layer_rank(cls, geometry, rank):
        return rank  # a block size: butterfly_shape() picks what the layer allows

    @classmethod
    def supports(cls, geometry):
        return geometry.out_features % 2 == 0

    @classmethod
    def file_dims(cls, own):
        blocks = own["oft_blocks"]
        stages, block = (size(blocks, 0), size(blocks, -1)) if blocks.ndim == 4 else (0, 0)
        return {"rank": block, "shape": (stages, block)}

    @classmethod
    def check_dims(cls, geometry, dims, key):
        (stages, block), out = dims["shape"], geometry.out_features
        if stages < 1 or block < 2 or block % 2 or out % (2 ** (stages - 1) * block):
            stages, block = butterfly_shape(out, 4) if out % 2 == 0 else (1, out)
        return {"rank": block, "shape": (stages, block)}

    def rotations(self) -> torch.Tensor:
        blocks = self.rounded(self.blocks)
        with full_precision(blocks):
            return cayley(blocks, self.alpha)

    def output_map(self) -> torch.Tensor:
        """``M - I`` as an [out, out] matrix (float32): the stages applied to the identity."""
        eye = torch.eye(self.geometry.out_features, device=self.blocks.device)
        with full_precision(eye):
            return butterfly(self.rotations(), eye) - eye

    def bypass(self, base_forward):
        g = self.geometry

        def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            out = base_forward(x, *args, **kwargs)
            linear = self.without_bias(out)
            if linear.numel() >= g.out_features ** 2:  # many tokens: one [out, out] matmul
                return out + g.pointwise_op(linear, self.output_map().to(out.dtype))
            moved = self.channels_last(linear)  # few tokens: the stages on the activations
            rotated = butterfly(self.rotations().to(out.dtype), moved)
            return out + self.channels_back(rotated - moved)

        return forward

    def merged_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        weight = base_weight.float().reshape(self.geometry.weight_shape)
        return butterfly(self.rotations(), weight).to(base_weight.dtype)

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        weight = self.weight_of(base_weight)
        return butterfly(self.rotations(), weight) - weight
