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

from .base import Adapter, LayerGeometry, alpha_of, full_precision, kaiming_uniform_, split_dimension


class LoKr(Adapter):
    NAME = "LoKr"
    ALPHA_OVER_RANK = False
    UP_PARAMETERS = ("w2",)
    KEYS = ("lokr_w1", "lokr_w2")

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
    def identifies(cls, tensors, prefix):
        return f"{prefix}.lokr_w1" in tensors or f"{prefix}.lokr_w1_a" in tensors

    @classmethod
    def identifying_suffixes(cls):
        return ("lokr_w1", "lokr_w1_a")

    @classmethod
    def required_keys(cls, tensors, prefix):
        keys = []
        for w in ("w1", "w2"):
            full = f"{prefix}.lokr_{w}"
            keys += [full] if full in tensors or f"{full}_a" not in tensors else [f"{full}_a", f"{full}_b"]
        return keys

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

    def to_state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        return {
            f"{prefix}.lokr_w1": self.saved(self.w1),
            f"{prefix}.lokr_w2": self.saved(self.w2),
            f"{prefix}.alpha": torch.tensor(self.alpha, dtype=torch.float32),
        }

    @staticmethod
    def factors(tensors, prefix) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``w1``, ``w2`` (float32, as stored or multiplied out) and ComfyUI's scale."""
        dim, factors = None, []
        for w in ("w1", "w2"):
            full = tensors.get(f"{prefix}.lokr_{w}")
            if full is None:
                if f"{prefix}.lokr_{w}_a" not in tensors:
                    raise ValueError(f"The LoRA lacks {prefix}.lokr_{w}; the file is incomplete.")
                if w == "w2" and f"{prefix}.lokr_t2" in tensors:
                    raise ValueError(
                        f"The LoRA key {prefix}.lokr_t2 is a Tucker-decomposed LoKr, which "
                        "cannot be continued; start a new LoKr or pick another file.")
                a, b = tensors[f"{prefix}.lokr_{w}_a"].float(), tensors[f"{prefix}.lokr_{w}_b"].float()
                dim = b.shape[0]
                full = a.flatten(1) @ b.flatten(1)
            factors.append(full.float())
        alpha = alpha_of(tensors, prefix)
        scale = alpha / dim if (alpha is not None and dim is not None) else 1.0
        return factors[0], factors[1], scale

    @classmethod
    def from_state_dict(cls, geometry, tensors, prefix, compute_dtype, *, weight=None, bias=None):
        w1, w2, scale = cls.factors(tensors, prefix)
        adapter = cls(geometry, min(w1.shape), 1.0, compute_dtype, weight=weight, bias=bias,
                      w1_shape=tuple(w1.shape))
        with torch.no_grad():
            adapter.w1.copy_(w1)
            adapter.w2.copy_((w2 * scale).reshape(adapter.w2.shape))
        return adapter

    @staticmethod
    def expected_shapes(geometry, tensors, prefix):
        """Shapes for this layer, given the file's own ``w1`` (which fixes the split)."""
        g = geometry
        kernel = g.fan_in // g.in_features

        def dims(t: torch.Tensor) -> tuple[int, int]:
            return (t.shape[0], t[0].numel()) if t.ndim >= 2 and t.shape[0] else (0, 0)

        w1 = tensors.get(f"{prefix}.lokr_w1")
        if w1 is not None:
            o1, i1 = dims(w1)
        else:
            o1, i1 = dims(tensors[f"{prefix}.lokr_w1_a"])[0], dims(tensors[f"{prefix}.lokr_w1_b"])[1]
        if o1 < 1 or i1 < 1 or g.out_features % o1 or g.in_features % i1:
            want = (split_dimension(g.out_features, 4)[0], split_dimension(g.in_features, 4)[0])
            key = f"{prefix}.lokr_w1" if w1 is not None else f"{prefix}.lokr_w1_a"
            return {key: {want}}
        shapes = {}
        if w1 is None:
            inner = tensors[f"{prefix}.lokr_w1_b"].shape[0]
            shapes[f"{prefix}.lokr_w1_a"] = {(o1, inner)}
            shapes[f"{prefix}.lokr_w1_b"] = {(inner, i1)}
        else:
            shapes[f"{prefix}.lokr_w1"] = {(o1, i1)}
        o2, i2 = g.out_features // o1, g.in_features // i1
        if f"{prefix}.lokr_w2" in tensors:
            shapes[f"{prefix}.lokr_w2"] = {(o2, i2 * kernel), (o2, i2, *g.kernel_size)}
        else:
            b = tensors[f"{prefix}.lokr_w2_b"]
            inner = b.shape[0] if b.ndim else 0
            shapes[f"{prefix}.lokr_w2_a"] = {(o2, inner)}
            shapes[f"{prefix}.lokr_w2_b"] = {(inner, i2 * kernel), (inner, i2, *g.kernel_size)}
        return shapes
