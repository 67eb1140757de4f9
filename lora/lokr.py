"""LoKr (Edalati et al. 2022, "KronA"; LyCORIS): a Kronecker product of two factors.

``dW = kron(w1, w2)`` reshaped to the layer's weight, with ``out = o1 * o2`` and
``in = i1 * i2``: ``w1`` is [o1, i1] (small), ``w2`` [o2, i2 * kernel] (large).

- ``rank`` is the Kronecker **factor**: ``o1`` and ``i1`` are the divisors of ``out`` and
  ``in`` closest to it from below (``rank`` itself when it divides and ``rank^2 <= dim``;
  :func:`lora.base.split_dimension`), so a larger rank gives a larger ``w1`` and a smaller
  ``w2``. Both factors are full matrices.
- ``alpha``: not used. With full factors ComfyUI applies ``kron(w1, w2)`` at scale 1 whatever
  the file's alpha (comfy/weight_adapter/lokr.py:183-210, ``dim`` stays None), as LyCORIS
  does; the file stores ``alpha`` = 1.0.
- Training forward: ``base(x) + delta(x)`` with ``delta`` computed in Kronecker form, never as
  a weight: the input's channels are split into [i1, i2], ``w2`` is applied as the layer's op
  over the i2 axis (same kernel, stride, padding), then ``w1`` mixes the i1 axis into o1.
- Init (LyCORIS): ``w1`` kaiming-uniform (a=sqrt(5)), ``w2`` zeros: exactly zero at step 0.
- Saved keys: ``lokr_w1``, ``lokr_w2`` (2-D), ``alpha``. Continuing also accepts files with the
  factors as ``lokr_w1_a``/``lokr_w1_b`` and ``lokr_w2_a``/``lokr_w2_b``: they are multiplied
  out with ComfyUI's scale (``alpha / dim``, ``dim`` the inner size of the last factored
  one) folded into ``w2``, and saved again as full factors.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import (Adapter, LayerGeometry, Saved, alpha_value, full_precision, kaiming_uniform_,
                   size, split_dimension)


def _w2_shapes(g: LayerGeometry, d) -> tuple[tuple[int, ...], ...]:
    o1, i1 = d["w1_shape"]
    o2, i2 = g.out_features // o1, g.in_features // i1
    return (o2, i2 * (g.fan_in // g.in_features)), (o2, i2, *g.kernel_size)


class LoKr(Adapter):
    NAME = "LoKr"
    ALPHA = "one"
    UP_PARAMETERS = ("w2",)
    SAVED = (
        Saved("lokr_w1", "w1", lambda g, d: (tuple(d["w1_shape"]),),
              factored=("lokr_w1_a", "lokr_w1_b")),
        Saved("lokr_w2", "w2", _w2_shapes, factored=("lokr_w2_a", "lokr_w2_b")),
    )

    def __init__(self, geometry: LayerGeometry, rank: int, alpha: float,
                 compute_dtype: torch.dtype, generator: torch.Generator | None = None, *,
                 weight=None, bias=None, w1_shape: tuple[int, int] | None = None) -> None:
        super().__init__(geometry, compute_dtype, weight, bias)
        g = geometry
        if w1_shape is None:
            w1_shape = (split_dimension(g.out_features, rank)[0],
                        split_dimension(g.in_features, rank)[0])
        o1, i1 = w1_shape
        self.rank = rank
        self.alpha = 1.0
        kernel = g.fan_in // g.in_features
        self.w1 = nn.Parameter(torch.empty(o1, i1))
        self.w2 = nn.Parameter(torch.zeros(g.out_features // o1, (g.in_features // i1) * kernel))
        nn.init.zeros_(self.w1)
        if generator is not None:
            kaiming_uniform_(self.w1, generator)

    @classmethod
    def layer_rank(cls, geometry, rank):
        return rank  # a factor, not a rank: split_dimension picks what the layer allows

    @classmethod
    def file_dims(cls, own):
        w1 = own["lokr_w1"]
        o1, i1 = size(w1, 0), (w1[0].numel() if w1.ndim >= 2 and size(w1, 0) else 0)
        return {"rank": min(o1, i1), "w1_shape": (o1, i1)}

    @classmethod
    def check_dims(cls, geometry, dims, key):
        o1, i1 = dims["w1_shape"]
        if o1 < 1 or i1 < 1 or geometry.out_features % o1 or geometry.in_features % i1:
            return {"rank": 4, "w1_shape": (split_dimension(geometry.out_features, 4)[0],
                                            split_dimension(geometry.in_features, 4)[0])}
        return dims

    @classmethod
    def canonical(cls, own, prefix):
        """Factored ``lokr_w*_a``/``_b`` multiplied out, with ComfyUI's scale (``alpha / dim``,
        ``dim`` the inner size of the last factored one) folded into ``w2``."""
        own, dim = dict(own), None
        for w in ("w1", "w2"):
            full, a_key, b_key = f"lokr_{w}", f"lokr_{w}_a", f"lokr_{w}_b"
            if full in own or a_key not in own:
                continue
            if w == "w2" and "lokr_t2" in own:
                raise ValueError(
                    f"The LoRA key {prefix}.lokr_t2 is a Tucker-decomposed LoKr, which "
                    "cannot be continued; start a new LoKr or pick another file.")
            a, b = own.pop(a_key).float(), own.pop(b_key).float()
            if a.ndim < 2 or b.ndim < 2 or a[0].numel() != b.shape[0] or 0 in (*a.shape, *b.shape):
                raise ValueError(
                    f"The LoRA keys {prefix}.{a_key} {list(a.shape)} and {prefix}.{b_key} "
                    f"{list(b.shape)} do not multiply; the file is damaged.")
            dim = b.shape[0]
            own[full] = a.flatten(1) @ b.flatten(1)
        if dim is not None:
            alpha = alpha_value(own.get("alpha"), f"{prefix}.alpha")
            if alpha is not None:
                own["lokr_w2"] = own["lokr_w2"].float() * (alpha / dim)
        return own

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        w1, w2 = self.rounded(self.w1), self.rounded(self.w2)
        with full_precision(w1):
            return torch.kron(w1, w2).reshape(self.geometry.weight_shape)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        g = self.geometry
        w1, w2 = self.cast(self.w1, x), self.cast(self.w2, x)
        i1, o2 = w1.shape[1], w2.shape[0]
        if not g.is_conv:
            split = x.unflatten(-1, (i1, -1))  # [..., i1, i2]
            hidden = torch.matmul(split, w2.t())  # [..., i1, o2]
            return torch.matmul(w1, hidden).flatten(-2)  # [..., o1, o2] -> [..., out]
        batch = x.shape[0]
        split = x.reshape(batch * i1, -1, *x.shape[2:])  # [N * i1, i2, *spatial]
        hidden = g.linear_op(split, w2.reshape(o2, -1, *g.kernel_size))
        hidden = hidden.reshape(batch, i1, o2, *hidden.shape[2:])
        return torch.einsum("ai,ni...->na...", w1, hidden).flatten(1, 2)
