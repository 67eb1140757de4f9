"""OFT (Qiu et al. 2023, "Controlling Text-to-Image Diffusion by Orthogonal Finetuning").

``W' = R^T W`` with ``R`` block-diagonal and orthogonal: the layer's outputs are split into
``out / b`` blocks of ``b`` channels, and block ``k`` is rotated by the Cayley transform
``R_k = (I + Q_k)(I - Q_k)^-1`` of the skew-symmetric ``Q_k = B_k - B_k^T``.

- ``rank`` is the **block size** b: the largest divisor of ``out`` not above ``rank`` (at
  least 2; a prime ``out`` above ``rank`` gets one block). Parameters: ``out * b``.
- ``alpha`` is the COFT constraint, not a scale: when ``||Q||_F`` (over all blocks of the
  layer) exceeds ``alpha``, ``Q`` is scaled down to norm ``alpha``; ``alpha = 0`` leaves it
  free. This is how ComfyUI reads ``alpha`` for OFT (comfy/weight_adapter/oft.py:122-147).
- Training forward: the rotation acts on the base layer's output, so no weight is built:
  ``y = base(x) + (R^T - I)(base(x) - bias)`` per block of output channels (the bias is not
  rotated, as ComfyUI patches only the weight). The adapter keeps a float32 copy of the bias.
- Init: ``B = 0``, so ``R = I`` and the delta is exactly zero at step 0.
- Saved keys: ``<module>.oft_blocks`` [out / b, b, b] (3-D, which is what makes ComfyUI read it
  as OFT rather than BOFT) and ``alpha``. ComfyUI applies
  ``W + einsum("k n m, k n ... -> k m ...", R - I, W)`` (oft.py:149-158), i.e. ``R_k^T W_k``.
  At a loader strength ``s != 1`` ComfyUI scales that delta by ``s`` twice (oft.py:152, 158).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Adapter, LayerGeometry, Saved, full_precision, size


def block_size(dimension: int, rank: int) -> int:
    """The largest divisor of ``dimension`` not above ``rank``, at least 2 where possible."""
    size = max(d for d in range(1, max(1, min(rank, dimension)) + 1) if dimension % d == 0)
    if size == 1 and dimension > 1:
        size = min(d for d in range(2, dimension + 1) if dimension % d == 0)
    return size


def cayley(blocks: torch.Tensor, constraint: float) -> torch.Tensor:
    """``(I + Q)(I - Q)^-1`` of ``Q = B - B^T`` (float32), Q scaled to norm ``constraint``."""
    q = blocks - blocks.transpose(-1, -2)
    if constraint > 0:
        norm = torch.linalg.vector_norm(q) + 1e-8
        q = q * torch.clamp(constraint / norm, max=1.0)
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
    return torch.linalg.solve(eye - q, eye + q)  # (I - Q)^-1 (I + Q) = (I + Q)(I - Q)^-1


def rotate_blocks(matrices: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``matrices[k]^T`` applied to block ``k`` of dim 0 of ``t`` (ComfyUI's OFT einsum)."""
    count, size = matrices.shape[0], matrices.shape[1]
    blocks = t.reshape(count, size, *t.shape[1:])
    return torch.einsum("knm,kn...->km...", matrices, blocks).reshape(t.shape)


class Rotation(Adapter):
    """What OFT and BOFT share: ``blocks`` saved as ``oft_blocks`` with the constraint
    ``alpha``, and the base output without its bias (the part a rotation acts on)."""

    def without_bias(self, out: torch.Tensor) -> torch.Tensor:
        if self.base_bias is None:
            return out
        return out - self.per_channel(self.base_bias.to(out.dtype), out)

    ALPHA = "constraint"


class OFT(Rotation):
    NAME = "OFT"
    SAVED = (Saved("oft_blocks", "blocks", lambda g, d: (
        (g.out_features // d["size"], d["size"], d["size"]),), ndim=3),)
    USES_BASE_BIAS = True

    def __init__(self, geometry: LayerGeometry, rank: int, alpha: float,
                 compute_dtype: torch.dtype, generator: torch.Generator | None = None, *,
                 weight=None, bias=None, size: int | None = None) -> None:
        super().__init__(geometry, compute_dtype, weight, bias)
        self.rank = size or block_size(geometry.out_features, rank)
        self.alpha = float(alpha)
        out = geometry.out_features
        self.blocks = nn.Parameter(torch.zeros(out // self.rank, self.rank, self.rank))

    @classmethod
    def layer_rank(cls, geometry, rank):
        return rank  # a block size: block_size() picks what the layer allows

    @classmethod
    def supports(cls, geometry):
        return geometry.out_features >= 2

    @classmethod
    def file_dims(cls, own):
        block = size(own["oft_blocks"], -1)
        return {"rank": block, "size": block}

    @classmethod
    def check_dims(cls, geometry, dims, key):
        block, out = dims["size"], geometry.out_features
        if block < 1 or out % block:
            block = block_size(out, 4)
        return {"rank": block, "size": block}

    def rotation(self) -> torch.Tensor:
        blocks = self.rounded(self.blocks)
        with full_precision(blocks):
            return cayley(blocks, self.alpha)

    def transform(self, t: torch.Tensor) -> torch.Tensor:
        """``(R^T - I) t`` over dim 0 of ``t`` (the output channels)."""
        eye = torch.eye(self.rank, dtype=torch.float32, device=t.device)
        return rotate_blocks((self.rotation() - eye).to(t.dtype), t)

    def bypass(self, base_forward):
        def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            out = base_forward(x, *args, **kwargs)
            linear = self.without_bias(out)
            return out + self.channels_back(self.transform(self.channels_last(linear)))

        return forward

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        return self.transform(self.weight_of(base_weight))
