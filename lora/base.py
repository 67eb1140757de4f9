"""What every adapter algorithm shares: the wrapped layer, its scale and the bypass forward.

An adapter never changes the layer it wraps. During training the layer's ``forward`` is
replaced by :meth:`Adapter.bypass`: ``base(x) + delta(x)`` for additive algorithms, or a
transform of the base layer's input or output; ``W + dW`` is never materialised on a
training step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar, Mapping

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
    def fan_in(self) -> int:
        return self.in_features * math.prod(self.kernel_size)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_features, self.in_features, *self.kernel_size)

    @property
    def is_pointwise(self) -> bool:
        """A 1x1 conv with unit stride and dilation and no padding: a Linear over channels."""
        ones = (1,) * len(self.kernel_size)
        return (self.is_conv and self.kernel_size == ones and tuple(self.stride) == ones
                and tuple(self.dilation) == ones and self.padding in ((0,) * len(ones), "valid"))

    def linear_op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Apply ``weight`` (shaped like the base weight, or with rank in place of out/in)."""
        if not self.is_conv:
            return F.linear(x, weight)
        if self.is_pointwise:
            return self.pointwise_op(x, weight.flatten(1))
        conv = _CONV_FUNCTIONS[len(self.kernel_size)]
        return conv(x, weight, None, self.stride, self.padding, self.dilation)

    def pointwise_op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """A 1x1 (no spatial extent) map with a 2-D ``weight`` of shape [out, in]: one batched
        matmul over the flattened positions (CPU convolution kernels take a slow path for
        such thin maps)."""
        if not self.is_conv:
            return F.linear(x, weight)
        return torch.matmul(weight, x.flatten(2)).unflatten(2, x.shape[2:])


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


@dataclass(frozen=True)
class Saved:
    """One tensor an algorithm saves per module: the declaration every file operation reads.

    ``key`` is the suffix after ``<module>.`` in a file, ``attribute`` the adapter parameter it
    holds. ``shapes(geometry, dims)`` lists the shapes a file may store for a layer of that
    geometry, given the sizes ``dims`` read from the file (:meth:`Adapter.file_dims`); the
    first is the shape the adapter writes. ``float32``: saved in float32 whatever the adapter
    dtype (DoRA's magnitude). ``ndim``: the identifying tensor has exactly this many axes
    (OFT's blocks are 3-D, BOFT's 4-D). ``factored``: keys a file may hold instead of this
    one (LyCORIS's ``lokr_w1_a``/``lokr_w1_b`` for ``lokr_w1``).
    """

    key: str
    attribute: str
    shapes: Callable[[LayerGeometry, Mapping[str, object]], tuple[tuple[int, ...], ...]]
    float32: bool = False
    ndim: int | None = None
    factored: tuple[str, ...] = ()


def size(tensor: torch.Tensor, axis: int) -> int:
    """``tensor.shape[axis]``, or 0 where the tensor has no such axis (a malformed file)."""
    return tensor.shape[axis] if -tensor.ndim <= axis < tensor.ndim else 0


class Adapter(nn.Module):
    """Base class of an adapter around one Linear or Conv layer.

    An algorithm is its maths plus a declaration of what it saves:

    - ``SAVED``: one :class:`Saved` per tensor of a module (``SAVED[0]`` identifies the
      algorithm in a file), and ``ALPHA``: what the file's ``alpha`` means (``"scale"``: the
      delta is scaled by ``alpha / rank``; ``"constraint"``: a norm bound, 0 when absent;
      ``"one"``: not used, stored as 1). Saving, loading, detection, the required-key and
      shape checks all derive from these (:meth:`to_state_dict`, :meth:`from_state_dict`,
      :meth:`identifies`, :meth:`required_keys`, :meth:`expected_shapes`).
    - :meth:`file_dims`: the sizes a file's tensors fix (its rank, block size...), passed to
      the constructor as keyword arguments (``rank`` positionally).
    - either ``delta(x)`` and ``delta_weight()``: an additive adapter, trained as
      ``base(x) + delta(x)`` (the default :meth:`bypass`), or their own :meth:`bypass` and
      :meth:`merged_weight`: an adapter that transforms the base layer's input or output
      (DoRA, GLoRA, OFT, BOFT).

    No training forward builds ``W + dW``. Parameters are kept in float32 (master weights);
    ``compute_dtype`` is the dtype the adapter's weights are rounded to on every forward and
    saved in, so training sees exactly the weights that are saved.

    Constructors take ``(geometry, rank, alpha, compute_dtype, generator=None, *, weight=None,
    bias=None, **dims)``; ``weight``/``bias`` are the wrapped layer's tensors. An algorithm
    that needs them at training time (``USES_BASE_WEIGHT`` / ``USES_BASE_BIAS``) keeps a
    detached copy, taken once at creation (the layer's own tensors may be inference tensors or
    offloaded): the weight in its own dtype if that is fp32/bf16/fp16 (else float32), the bias
    in float32. The others ignore them.
    """

    NAME: ClassVar[str]
    SAVED: ClassVar[tuple[Saved, ...]]
    ALPHA: ClassVar[str] = "scale"
    USES_BASE_WEIGHT: ClassVar[bool] = False
    USES_BASE_BIAS: ClassVar[bool] = False
    # the zero-initialised output-side factors ("B"), which LoRA+ trains at a higher rate
    UP_PARAMETERS: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if cls.ALPHA not in ("scale", "constraint", "one"):
            raise TypeError(f"{cls.__name__}.ALPHA must be 'scale', 'constraint' or 'one'.")
        # the delta is scaled by alpha / rank (what rsLoRA rescales to alpha / sqrt(rank))
        cls.ALPHA_OVER_RANK = cls.ALPHA == "scale"

    def __init__(
        self,
        geometry: LayerGeometry,
        compute_dtype: torch.dtype,
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.geometry = geometry
        self.compute_dtype = compute_dtype
        if self.USES_BASE_WEIGHT:
            if weight is None:
                raise ValueError(f"{self.NAME} needs the weight of the layer it adapts.")
            dtype = weight.dtype if weight.dtype in _COPY_DTYPES else torch.float32
            copy = weight.detach().to(dtype, copy=True).reshape(geometry.weight_shape)
            self.register_buffer("base_weight", copy, persistent=False)
        if self.USES_BASE_BIAS:
            copy = None if bias is None else bias.detach().to(torch.float32, copy=True)
            self.register_buffer("base_bias", copy, persistent=False)

    @property
    def scale(self) -> float:
        """The factor the delta is scaled by: ``alpha / rank`` where ``ALPHA`` is a scale."""
        return self.alpha / self.rank if self.ALPHA == "scale" else 1.0

    # -- what a class says about layers ----------------------------------------------------
    @classmethod
    def layer_rank(cls, geometry: LayerGeometry, rank: int) -> int:
        """The rank this layer gets for a requested ``rank`` (low-rank: at most min(in, out))."""
        return max(1, min(rank, geometry.fan_in, geometry.out_features))

    @classmethod
    def supports(cls, geometry: LayerGeometry) -> bool:
        """Whether the algorithm can adapt a layer of this shape at all."""
        return True

    # -- what a class says about files (hooks; the defaults fit most algorithms) -------------
    @classmethod
    def file_dims(cls, own: Mapping[str, torch.Tensor]) -> dict[str, object]:
        """The constructor sizes a module's tensors fix (``own``: suffix -> tensor).

        Read before the shapes are checked, so a malformed tensor gives sizes of 0.
        """
        raise NotImplementedError

    @classmethod
    def check_dims(cls, geometry: LayerGeometry, dims: dict, key: str) -> dict:
        """``dims`` if a layer of ``geometry`` can hold them, else the sizes it could hold (so
        the shape check names what the layer needs); raise for a form that cannot be read."""
        return dims

    @classmethod
    def canonical(cls, own: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
        """A module's tensors in the form ``SAVED`` declares (factored forms multiplied out);
        a ValueError for a form that cannot be continued. ``prefix`` names the module."""
        return own

    # -- derived from SAVED and ALPHA --------------------------------------------------------
    @classmethod
    def _alternatives(cls, saved: Saved) -> tuple[tuple[str, ...], ...]:
        return ((saved.key,), saved.factored) if saved.factored else ((saved.key,),)

    @classmethod
    def identifies(cls, tensors: Mapping[str, torch.Tensor], prefix: str) -> bool:
        """Whether the keys under ``<prefix>.`` are a module of this algorithm (the registry
        asks the most specific algorithm first: DoRA before LoRA)."""
        first = cls.SAVED[0]
        for keys in cls._alternatives(first):
            value = tensors.get(f"{prefix}.{keys[0]}")
            if value is not None and (first.ndim is None or value.ndim == first.ndim):
                return True
        return False

    @classmethod
    def identifying_suffixes(cls) -> tuple[str, ...]:
        """Suffixes whose keys name a module of this algorithm (for finding module names)."""
        return tuple(keys[0] for keys in cls._alternatives(cls.SAVED[0]))

    @classmethod
    def required_keys(cls, tensors: Mapping[str, torch.Tensor], prefix: str) -> list[str]:
        """The keys a module must hold: each saved tensor, or all of its factored form."""
        keys = []
        for saved in cls.SAVED:
            full = f"{prefix}.{saved.key}"
            factored = [f"{prefix}.{k}" for k in saved.factored]
            use_factored = factored and full not in tensors and factored[0] in tensors
            keys += factored if use_factored else [full]
        return keys

    @classmethod
    def module_tensors(cls, tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
        """The tensors under ``<prefix>.`` by suffix, in canonical form (:meth:`canonical`)."""
        own = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        return cls.canonical(own, prefix)

    @classmethod
    def expected_shapes(cls, geometry: LayerGeometry, own: Mapping[str, torch.Tensor],
                        prefix: str) -> dict[str, set[tuple[int, ...]]]:
        """The shapes a module's tensors (``own``, from :meth:`module_tensors`) must have for
        ``geometry``: {suffix: accepted shapes}."""
        dims = cls.check_dims(geometry, cls.file_dims(own), f"{prefix}.{cls.SAVED[0].key}")
        return {s.key: set(s.shapes(geometry, dims)) for s in cls.SAVED}

    def to_state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        """The module's keys as ComfyUI's loader reads them (each ``SAVED`` tensor + alpha)."""
        dims = self.file_dims({s.key: getattr(self, s.attribute) for s in self.SAVED})
        state = {}
        for saved in self.SAVED:
            value = getattr(self, saved.attribute).detach()
            value = value.float() if saved.float32 else value.to(self.compute_dtype)
            state[f"{prefix}.{saved.key}"] = value.reshape(saved.shapes(self.geometry, dims)[0]).clone()
        state[f"{prefix}.alpha"] = torch.tensor(self.alpha, dtype=torch.float32)
        return state

    @classmethod
    def from_state_dict(
        cls, geometry: LayerGeometry, tensors: Mapping[str, torch.Tensor], prefix: str,
        compute_dtype: torch.dtype, *, weight=None, bias=None,
    ) -> "Adapter":
        """Rebuild from saved keys (shapes checked with :meth:`expected_shapes` first)."""
        own = cls.module_tensors(tensors, prefix)
        dims = dict(cls.file_dims(own))
        alpha = alpha_of(tensors, prefix)
        if cls.ALPHA == "scale":
            alpha = alpha if alpha is not None else float(dims["rank"])  # absent: scale 1
        elif cls.ALPHA == "constraint":
            alpha = alpha or 0.0
        else:
            alpha = 1.0
        adapter = cls(geometry, dims.pop("rank"), alpha, compute_dtype, weight=weight, bias=bias,
                      **dims)
        with torch.no_grad():
            for saved in cls.SAVED:
                parameter = getattr(adapter, saved.attribute)
                parameter.copy_(own[saved.key].float().reshape(parameter.shape))
        return adapter

    # -- what an algorithm defines -------------------------------------------------------
    def delta(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """``W' - W`` in float32 (``base_weight``: ``W``, needed where the delta depends on it)."""
        raise NotImplementedError

    # -- shared --------------------------------------------------------------------------
    def cast(self, tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Round a master weight to the adapter dtype, then compute in the activation dtype."""
        return tensor.to(self.compute_dtype).to(like.dtype)

    def rounded(self, tensor: torch.Tensor) -> torch.Tensor:
        """A master weight rounded to the adapter dtype, as float32 (for weight-space maths)."""
        return tensor.to(self.compute_dtype).float()

    def bypass(self, base_forward: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """A replacement for the wrapped layer's ``forward``: ``base(x) + delta(x)``."""

        def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            out = base_forward(x, *args, **kwargs)
            return out + self.delta(x).to(out.dtype)

        return forward

    def merged_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        return base_weight + self.delta_weight(base_weight).to(base_weight.dtype)

    def weight_of(self, base_weight: torch.Tensor | None) -> torch.Tensor:
        """``base_weight`` as float32 of the layer's shape, else the copy taken at creation."""
        if base_weight is None:
            base_weight = getattr(self, "base_weight", None)
            if base_weight is None:
                raise ValueError(f"{self.NAME}.delta_weight needs the layer's weight.")
        return base_weight.float().reshape(self.geometry.weight_shape)

    def channels_last(self, t: torch.Tensor) -> torch.Tensor:
        """Move the channel axis of an activation to the front (dim 0)."""
        return t.movedim(-1 if not self.geometry.is_conv else 1, 0)

    def channels_back(self, t: torch.Tensor) -> torch.Tensor:
        return t.movedim(0, -1 if not self.geometry.is_conv else 1)

    def per_channel(self, vector: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A per-channel vector shaped to broadcast against the activation ``like``."""
        if not self.geometry.is_conv:
            return vector
        return vector.reshape(-1, *([1] * (like.ndim - 2)))


def full_precision(like: torch.Tensor):
    """No autocast while building weight-space tensors (they are small and need float32)."""
    return torch.autocast(like.device.type, enabled=False)


def split_dimension(dimension: int, factor: int) -> tuple[int, int]:
    """``dimension = small * large`` with ``small`` the divisor closest to ``factor`` from below.

    ``small <= large``; ``small`` is ``factor`` itself when it divides ``dimension`` and
    ``factor**2 <= dimension`` (the rule LyCORIS and ComfyUI use for Kronecker factors).
    """
    if factor > 0 and dimension % factor == 0 and factor * factor <= dimension:
        return factor, dimension // factor
    limit = min(factor if factor > 0 else dimension, int(math.isqrt(dimension)))
    small = max(d for d in range(1, max(limit, 1) + 1) if dimension % d == 0)
    return small, dimension // small


def alpha_of(tensors: Mapping[str, torch.Tensor], prefix: str) -> float | None:
    """The scalar ``<prefix>.alpha`` of a file, None if absent; a ValueError if malformed."""
    return alpha_value(tensors.get(f"{prefix}.alpha"), f"{prefix}.alpha")


def alpha_value(value: torch.Tensor | None, key: str) -> float | None:
    """The number an ``alpha`` tensor (file key ``key``) holds, None for None; a ValueError
    if it is not one finite number."""
    if value is None:
        return None
    if value.numel() != 1 or not (value.is_floating_point() or value.dtype in _INT_DTYPES):
        raise ValueError(
            f"The LoRA key {key} must be one number; it has shape {list(value.shape)} "
            f"and dtype {value.dtype}. The file is damaged.")
    alpha = float(value.reshape(()).item())
    if not math.isfinite(alpha):
        raise ValueError(f"The LoRA key {key} is {alpha}; the file is damaged.")
    return alpha


_COPY_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def kaiming_uniform_(tensor: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``nn.init.kaiming_uniform_(a=sqrt(5))`` on ``tensor`` drawn from ``generator``.

    That is U(-1/sqrt(fan_in), 1/sqrt(fan_in)), the init of torch's Linear layers and of the
    down projection in the original LoRA paper (Hu et al. 2021) and in kohya/PEFT.
    """
    fan_in = tensor[0].numel()
    bound = 1.0 / math.sqrt(fan_in)
    with torch.no_grad():
        return tensor.uniform_(-bound, bound, generator=generator)
