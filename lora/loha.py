"""LoHa (Hyeon-Woo et al. 2022, "FedPara"; LyCORIS): a Hadamard product of two low-rank maps.

``dW = (alpha / rank) * (w1_a @ w1_b) * (w2_a @ w2_b)`` (elementwise product), reshaped to the
layer's weight: ``w1_a``/``w2_a`` are [out, r], ``w1_b``/``w2_b`` [r, in * kernel].

- ``rank`` is r, the inner dimension of each factor (the delta can reach rank r^2).
- Training forward: ``base(x) + delta(x)``, with ``delta`` the layer's op (same kernel,
  stride, padding) applied with ``dW``. The Hadamard product has no low-rank shortcut, so
  ``dW`` (the size of the layer's weight) is built each step; the base weight is not.
- Init (LyCORIS): ``w1_a`` N(0, 0.1), ``w1_b`` and ``w2_b`` N(0, 1), ``w2_a`` zeros, so the
  delta is exactly zero at step 0 and ``w2_a`` gets the first gradient.
- Saved keys: ``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b`` (2-D) and ``alpha``;
  ComfyUI applies ``(alpha / w1_b.shape[0]) * (w1_a @ w1_b) * (w2_a @ w2_b)``
  (comfy/weight_adapter/loha.py:195-229).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Adapter, LayerGeometry, Saved, full_precision, size


def _factor(key: str, attribute: str, outer: bool) -> Saved:
    if outer:  # [out, r]
        return Saved(key, attribute, lambda g, d: ((g.out_features, d["rank"]),))
    return Saved(key, attribute, lambda g, d: ((d["rank"], g.fan_in),))


class LoHa(Adapter):
    NAME = "LoHa"
    UP_PARAMETERS = ("w1_a", "w2_a")
    SAVED = (
        _factor("hada_w1_a", "w1_a", True), _factor("hada_w1_b", "w1_b", False),
        _factor("hada_w2_a", "w2_a", True), _factor("hada_w2_b", "w2_b", False),
    )

    def __init__(self, geometry: LayerGeometry, rank: int, alpha: float,
                 compute_dtype: torch.dtype, generator: torch.Generator | None = None, *,
                 weight=None, bias=None) -> None:
        super().__init__(geometry, compute_dtype, weight, bias)
        self.rank = rank
        self.alpha = float(alpha)
        out, fan_in = geometry.out_features, geometry.fan_in
        self.w1_a = nn.Parameter(torch.zeros(out, rank))
        self.w1_b = nn.Parameter(torch.zeros(rank, fan_in))
        self.w2_a = nn.Parameter(torch.zeros(out, rank))
        self.w2_b = nn.Parameter(torch.zeros(rank, fan_in))
        if generator is not None:
            with torch.no_grad():
                self.w1_a.normal_(0.0, 0.1, generator=generator)
                self.w1_b.normal_(0.0, 1.0, generator=generator)
                self.w2_b.normal_(0.0, 1.0, generator=generator)

    @classmethod
    def canonical(cls, own, prefix):
        if "hada_t1" in own:
            raise ValueError(
                f"The LoRA key {prefix}.hada_t1 is a Tucker-decomposed LoHa, which cannot be "
                "continued; start a new LoHa or pick another file.")
        return own

    @classmethod
    def file_dims(cls, own):
        return {"rank": size(own["hada_w1_b"], 0)}

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        w1a, w1b, w2a, w2b = (self.rounded(p) for p in (self.w1_a, self.w1_b, self.w2_a, self.w2_b))
        with full_precision(w1a):
            product = (w1a @ w1b) * (w2a @ w2b) * self.scale
        return product.reshape(self.geometry.weight_shape)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return self.geometry.linear_op(x, self.delta_weight().to(x.dtype))
