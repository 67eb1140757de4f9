"""What every adapter algorithm shares: the wrapped layer, its scale and the bypass forward.

An adapter never changes the layer it wraps. During training the layer's ``forward`` is
replaced by :meth:`Adapter.forward`, which computes ``base(x) + delta(x)`` where ``delta`` is
a low-rank path: ``W + dW`` is never materialised on a training step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

_CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@dataclass(frozen=True)
class LayerGeometry:
    """A Linear or ConvNd layer reduced to what an adapter needs to know about it."""

    out_features: int
    in_features: int
    kernel_size: tuple[int, ...]  # () for Linear
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()
    dilation: tuple[int, ...] = ()

    @property
    def is_conv(self) -> bool:
        return bool(self.kernel_size)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_features, self.in_features, *self.kernel_size)

    def linear_op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Apply ``weight`` (shaped like the base weight, or with rank in place of out/in)."""
        if not self.is_conv:
            return F.linear(x, weight)
        conv = _CONV_FUNCTIONS[len(self.kernel_size)]
        return conv(x, weight, None, self.stride, self.padding, self.dilation)

    def pointwise_op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """A 1x1 (no spatial extent) map with a 2-D ``weight`` of shape [out, in]."""
        if not self.is_conv:
            return F.linear(x, weight)
        conv = _CONV_FUNCTIONS[len(self.kernel_size)]
        return conv(x, weight.reshape(*weight.shape, *([1] * len(self.kernel_size))))


def layer_geometry(module: nn.Module) -> LayerGeometry | None:
    """The geometry of a Linear or ungrouped ConvNd layer, or None for anything else."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None
    if isinstance(module, nn.Linear):
        return LayerGeometry(module.out_features, module.in_features, ())
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if module.groups != 1 or module.padding_mode != "zeros":
            return None
        return LayerGeometry(
            module.out_channels,
            module.in_channels,
            tuple(module.kernel_size),
            tuple(module.stride),
            module.padding if isinstance(module.padding, str) else tuple(module.padding),
            tuple(module.dilation),
        )
    return None


class Adapter(nn.Module):
    """Base class of an adapter around one Linear or Conv layer.

    Subclasses define ``delta(x)`` (the bypass path), ``delta_weight()`` (the same map as a
    weight of the base layer's shape), ``to_state_dict`` / ``from_state_dict`` (the keys
    ComfyUI's LoRA loader reads) and ``KEYS``, the suffixes that identify their files.

    Parameters are kept in float32 (master weights); ``compute_dtype`` is the dtype the
    adapter's weights are rounded to on every forward and saved in, so training sees exactly
    the weights that are saved.
    """

    NAME: ClassVar[str]
    KEYS: ClassVar[tuple[str, ...]]

    def __init__(self, geometry: LayerGeometry, compute_dtype: torch.dtype) -> None:
        super().__init__()
        self.geometry = geometry
        self.compute_dtype = compute_dtype

    # -- what an algorithm defines -------------------------------------------------------
    def delta(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def to_state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    # -- shared --------------------------------------------------------------------------
    def cast(self, tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Round a master weight to the adapter dtype, then compute in the activation dtype."""
        return tensor.to(self.compute_dtype).to(like.dtype)

    def bypass(self, base_forward: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """A replacement for the wrapped layer's ``forward``: ``base(x) + delta(x)``."""

        def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            out = base_forward(x, *args, **kwargs)
            return out + self.delta(x).to(out.dtype)

        return forward

    def merged_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        return base_weight + self.delta_weight().to(base_weight.dtype)


def kaiming_uniform_(tensor: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``nn.init.kaiming_uniform_(a=sqrt(5))`` on ``tensor`` drawn from ``generator``.

    That is U(-1/sqrt(fan_in), 1/sqrt(fan_in)), the init of torch's Linear layers and of the
    down projection in the original LoRA paper (Hu et al. 2021) and in kohya/PEFT.
    """
    fan_in = tensor[0].numel()
    bound = 1.0 / math.sqrt(fan_in)
    with torch.no_grad():
        return tensor.uniform_(-bound, bound, generator=generator)
