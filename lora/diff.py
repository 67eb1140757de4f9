"""Full additive deltas of normalisation layers and biases (``train_norm_bias``).

What ComfyUI's own trainer trains besides its LoRA (``comfy_extras/nodes_train.py``: 0.3.64
lines 586-637, 0.33.0 ``_create_weight_adapter``/``_create_bias_adapter``/
``_setup_lora_adapters``, lines 696-809): for every module of the model that is a ComfyUI
op (it has ``weight_function``, i.e. ``comfy.ops`` Linear, ConvNd, ConvTransposeNd,
GroupNorm, LayerNorm, RMSNorm, Embedding, and BatchNorm2d in 0.33.0):

- a weight with 2 or more dimensions gets the LoRA-family adapter;
- a **1-D weight** (the scale of a GroupNorm / LayerNorm / RMSNorm) gets a full delta
  ``diff`` of its shape, initialised to zero;
- **every bias** (of a norm, but also of every Linear and Conv) gets a full delta ``diff_b``
  of its shape, initialised to zero.

Modules that are not ComfyUI ops (custom norm classes such as MMDiT's own ``RMSNorm`` for
SD3.5's q/k norms, Flux's ``RMSNorm`` with a ``scale``) get nothing, and neither do norms
without affine parameters (SD3's ``LayerNorm(elementwise_affine=False)``). :func:`norm_targets`
makes the same choice; in a network without ComfyUI ops (plain torch) it selects torch's
``GroupNorm`` / ``LayerNorm`` / ``RMSNorm`` and the biases of ``Linear`` / ``ConvNd`` /
``ConvTransposeNd`` by type.

Saved keys: ``<module>.diff`` (the weight delta, the weight's shape) and ``<module>.diff_b``
(the bias delta, the bias's shape). ComfyUI's loader (``comfy/lora.py`` ``load_lora``, lines
72-82 in both versions) reads them for every ``<module>`` whose ``.weight`` is in the model's
state dict and patches ``weight += strength * diff`` / ``bias += strength * diff_b``
(``calculate_weight``, 0.3.64 lora.py:389-401, 0.33.0 lora.py:475-487); the shapes must
match exactly (else "WARNING SHAPE MISMATCH ... WEIGHT NOT MERGED"). No ``set_weight`` or
``pad_weight`` flag is involved.

Training forward (a bypass forward patch, like the adapters'): the layer's affine part is
``y = n(x) * w + b`` with ``n`` the normalisation without affine parameters, so

    n(x) * (w + dw) + (b + db) = base(x) + n(x) * dw + db

and the patch returns ``base(x) + n(x) * dw + db``: the layer's own forward runs unchanged
(whatever ComfyUI does to get its weight: casting, offloading, weight functions), and only
the normalisation (no weights) is computed once more. That costs one extra activation of
the norm's size per norm layer for backward. For a Linear / Conv bias the patch is
``base(x) + db`` on the channel axis.

Patch order: apply these patches **after** the adapters' (``adapter_patches(network,
adapters) + adapter_patches(network, deltas)``), so a bias delta is added outside an
adapter of the same layer. OFT and BOFT rotate ``base(x) - bias`` with the bias copied at
creation; a bias delta inside them would be rotated too, which ComfyUI's merge does not do.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

SUFFIXES = ("diff", "diff_b")

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
          nn.ConvTranspose3d)
_RMS_NORM = getattr(nn, "RMSNorm", None)


def is_norm_delta_key(key: str) -> bool:
    """Whether a LoRA key is a norm/bias delta (``<module>.diff`` or ``<module>.diff_b``)."""
    return key.endswith(".diff") or key.endswith(".diff_b")


def _is_comfy_op(module: nn.Module) -> bool:
    return hasattr(module, "weight_function")


def _tensor(module: nn.Module, name: str) -> torch.Tensor | None:
    value = getattr(module, name, None)
    return value if isinstance(value, torch.Tensor) else None


@dataclass(frozen=True)
class NormSpec:
    """What a delta needs to know about its layer (no reference to the layer itself).

    ``kind``: ``group`` / ``layer`` / ``rms`` (a norm: ``n(x) * dw`` is trainable) or
    ``bias`` (a Linear / Conv: only ``db``). ``spatial``: the number of spatial dims of a
    conv (the channel axis of its output is ``ndim - 1 - spatial``; 0 for Linear).
    """

    kind: str
    weight_shape: tuple[int, ...] | None
    bias_shape: tuple[int, ...] | None
    num_groups: int = 0
    normalized_shape: tuple[int, ...] = ()
    eps: float | None = None
    spatial: int = 0

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's normalisation of ``x`` without its affine parameters."""
        if self.kind == "group":
            return F.group_norm(x, self.num_groups, None, None, self.eps)
        if self.kind == "layer":
            return F.layer_norm(x, self.normalized_shape, None, None, self.eps)
        if self.kind == "rms":
            if hasattr(F, "rms_norm"):
                return F.rms_norm(x, self.normalized_shape, None, self.eps)
            dims = tuple(range(-len(self.normalized_shape), 0))
            eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
            return x * torch.rsqrt(x.pow(2).mean(dim=dims, keepdim=True) + eps)
        raise ValueError(f"a {self.kind} layer has no normalisation")

    def per_channel(self, delta: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """A weight/bias-shaped delta shaped to broadcast against the layer's output."""
        if self.kind == "group":  # [N, C, *]: channels on dim 1
            return delta.reshape(-1, *([1] * (out.ndim - 2)))
        if self.kind == "bias" and self.spatial:  # conv: [N, C, *spatial] or [C, *spatial]
            return delta.reshape(-1, *([1] * self.spatial))
        return delta  # Linear, LayerNorm, RMSNorm: the trailing dims


def norm_spec(module: nn.Module) -> NormSpec | None:
    """The delta ``module`` gets under ComfyUI's trainer's rule, or None for none/unknown.

    A norm's weight gets ``diff`` and a bias ``diff_b``, for the module types whose forward
    this file can reproduce (GroupNorm, LayerNorm, RMSNorm, Linear, ConvNd, ConvTransposeNd).
    A norm's weight is 1-D except for a LayerNorm/RMSNorm over several trailing dims, where
    it has their shape and still gets ``diff`` (ComfyUI's trainer would try a LoRA on such a
    weight; no diffusion model has one).
    """
    weight, bias = _tensor(module, "weight"), _tensor(module, "bias")
    wshape = tuple(weight.shape) if weight is not None else None  # a norm's: normalized_shape
    bshape = tuple(bias.shape) if bias is not None else None
    if isinstance(module, nn.GroupNorm):
        kind = dict(kind="group", num_groups=module.num_groups, eps=module.eps)
    elif isinstance(module, nn.LayerNorm):
        kind = dict(kind="layer", normalized_shape=tuple(module.normalized_shape), eps=module.eps)
    elif (_RMS_NORM is not None and isinstance(module, _RMS_NORM)) or (
            type(module).__name__ == "RMSNorm" and _is_comfy_op(module)
            and hasattr(module, "normalized_shape")):  # comfy.rmsnorm.RMSNorm on old torch
        kind = dict(kind="rms", normalized_shape=tuple(module.normalized_shape),
                    eps=getattr(module, "eps", None))
    elif isinstance(module, nn.Linear):
        kind, wshape = dict(kind="bias"), None
    elif isinstance(module, _CONVS):
        kind, wshape = dict(kind="bias", spatial=len(module.kernel_size)), None
    else:
        return None
    if wshape is None and bshape is None:
        return None
    return NormSpec(weight_shape=wshape, bias_shape=bshape, **kind)


def norm_targets(network: nn.Module, *, layer_biases: bool = True) -> dict[str, nn.Module]:
    """The layers ComfyUI's trainer gives ``diff`` / ``diff_b`` to, by module path.

    In a ComfyUI model (it has ``comfy.ops`` modules) only the ComfyUI ops count, as in
    ``comfy_extras/nodes_train.py``; in a plain torch network, every norm with affine
    parameters and every Linear / Conv with a bias. ``layer_biases=False`` keeps only the
    norms (their scale and bias), leaving the biases of Linear and Conv layers alone.
    A ComfyUI op with a 1-D weight or a bias whose type this file cannot reproduce
    (0.33.0's BatchNorm2d) is left out with one warning.
    """
    comfy = any(_is_comfy_op(m) for m in network.modules())
    targets, unknown = {}, []
    for name, module in network.named_modules():
        if comfy and not _is_comfy_op(module):
            continue
        spec = norm_spec(module)
        if spec is None:
            weight, bias = _tensor(module, "weight"), _tensor(module, "bias")
            if comfy and ((weight is not None and weight.ndim == 1) or bias is not None):
                unknown.append(f"{name} ({type(module).__name__})")
            continue
        if spec.kind == "bias" and not layer_biases:
            continue
        targets[name] = module
    if unknown:
        log.warning("train_norm_bias: %d layers of a type it cannot train are left out "
                    "(first: %s).", len(unknown), unknown[0])
    return targets


class NormDelta(nn.Module):
    """``diff`` (delta of a norm's 1-D weight) and/or ``diff_b`` (delta of a bias).

    Parameters are float32 master weights initialised to zero (the layer is unchanged at
    step 0); every forward rounds them to ``compute_dtype`` (the dtype they are saved in),
    as the adapters do. ``diff`` / ``diff_b`` are None where the layer has no such tensor.
    """

    NAME = "diff"
    UP_PARAMETERS: tuple[str, ...] = ()  # no up/B factor (LoRA+ leaves the deltas' rate alone)

    def __init__(self, spec: NormSpec, compute_dtype: torch.dtype) -> None:
        super().__init__()
        self.spec = spec
        self.compute_dtype = compute_dtype
        self.diff = None if spec.weight_shape is None else nn.Parameter(torch.zeros(spec.weight_shape))
        self.diff_b = None if spec.bias_shape is None else nn.Parameter(torch.zeros(spec.bias_shape))

    @classmethod
    def for_module(cls, module: nn.Module, compute_dtype: torch.dtype) -> "NormDelta | None":
        """A zero delta for ``module`` (None if it has nothing :func:`norm_spec` trains)."""
        spec = norm_spec(module)
        return None if spec is None else cls(spec, compute_dtype)

    def cast(self, tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.compute_dtype).to(like.dtype)

    def delta(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None:
        """``n(x) * dw + db``, shaped like ``out`` (None if the layer has neither)."""
        s, term = self.spec, None
        if self.diff is not None:
            normalised = s.normalise(x).to(out.dtype)
            term = normalised * s.per_channel(self.cast(self.diff, out), out)
        if self.diff_b is not None:
            bias = s.per_channel(self.cast(self.diff_b, out), out)
            term = bias if term is None else term + bias
        return term

    def bypass(self, base_forward: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """A replacement for the layer's ``forward``: ``base(x) + n(x) * dw + db``."""

        def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            out = base_forward(x, *args, **kwargs)
            term = self.delta(x, out)
            return out if term is None else out + term

        return forward

    def to_state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        state = {}
        for suffix in SUFFIXES:
            param = getattr(self, suffix)
            if param is not None:
                state[f"{prefix}.{suffix}"] = param.detach().to(self.compute_dtype).clone()
        return state

    @staticmethod
    def expected_shapes(module: nn.Module, prefix: str) -> dict[str, tuple[int, ...]]:
        """The keys a file may hold for ``module`` and the shape each must have."""
        spec = norm_spec(module)
        if spec is None:
            return {}
        shapes = {}
        if spec.weight_shape is not None:
            shapes[f"{prefix}.diff"] = spec.weight_shape
        if spec.bias_shape is not None:
            shapes[f"{prefix}.diff_b"] = spec.bias_shape
        return shapes

    @classmethod
    def from_state_dict(cls, module: nn.Module, tensors: Mapping[str, torch.Tensor], prefix: str,
                        compute_dtype: torch.dtype) -> "NormDelta":
        """Rebuild from saved ``<prefix>.diff`` / ``<prefix>.diff_b`` (either may be absent,
        that delta then starts at zero and is trained and saved from then on).

        A ValueError names the key if the layer cannot take it or its shape differs."""
        shapes = cls.expected_shapes(module, prefix)
        for suffix in SUFFIXES:
            key = f"{prefix}.{suffix}"
            if key not in tensors:
                continue
            value = tensors[key]
            if key not in shapes:
                what = "a 1-D weight (a norm's scale)" if suffix == "diff" else "a bias"
                raise ValueError(
                    f"The LoRA key {key} is a delta of {what}, which the layer "
                    f"{prefix} ({type(module).__name__}) does not have or which cannot be "
                    "trained; the LoRA was made for another model. Pick a LoRA trained on "
                    "this model.")
            if not value.is_floating_point():
                raise ValueError(f"The LoRA key {key} holds {value.dtype} values; a float "
                                 "tensor is expected. The file is damaged.")
            if tuple(value.shape) != shapes[key]:
                raise ValueError(
                    f"The LoRA key {key} has shape {list(value.shape)} but this model needs "
                    f"{list(shapes[key])}; the LoRA was made for another model. Pick a LoRA "
                    "trained on this model.")
            if not torch.isfinite(value).all():
                raise ValueError(f"The LoRA key {key} holds NaN or Inf; the file is damaged.")
        delta = cls(norm_spec(module), compute_dtype)
        with torch.no_grad():
            for suffix in SUFFIXES:
                key = f"{prefix}.{suffix}"
                if key in tensors:
                    getattr(delta, suffix).copy_(tensors[key].float())
        return delta


def create_norm_deltas(
    network: nn.Module,
    dtype: torch.dtype,
    targets: Mapping[str, nn.Module] | None = None,
) -> dict[str, NormDelta]:
    """Zero deltas for ``targets`` (default :func:`norm_targets`), by module path."""
    targets = norm_targets(network) if targets is None else targets
    deltas = {}
    for name, module in targets.items():
        delta = NormDelta.for_module(module, dtype)
        if delta is not None:
            deltas[name] = delta
    return deltas


def norm_delta_modules(tensors: Mapping[str, torch.Tensor], prefix: str = "") -> list[str]:
    """The module names (after ``prefix``) that a file's ``diff`` / ``diff_b`` keys name."""
    names = set()
    for key in tensors:
        if key.startswith(prefix) and is_norm_delta_key(key):
            names.add(key[len(prefix):].rsplit(".", 1)[0])
    return sorted(names)


def norm_deltas_from_state_dict(
    network: nn.Module,
    tensors: Mapping[str, torch.Tensor],
    prefix: str,
    dtype: torch.dtype,
) -> dict[str, NormDelta]:
    """Deltas rebuilt from a file's ``<prefix><module>.diff`` / ``.diff_b`` keys.

    Every named module must exist in ``network`` and take that delta with that shape (a
    ValueError naming the key otherwise). Keys outside ``prefix`` are ignored.
    """
    modules = dict(network.named_modules())
    deltas = {}
    for name in norm_delta_modules(tensors, prefix):
        key_prefix = prefix + name
        module = modules.get(name)
        if module is None or not name:
            key = next(k for k in (f"{key_prefix}.diff", f"{key_prefix}.diff_b") if k in tensors)
            raise ValueError(
                f"The LoRA key {key} names a layer this model does not have; the LoRA was made "
                "for another model family. Pick a LoRA trained on this model.")
        deltas[name] = NormDelta.from_state_dict(module, tensors, key_prefix, dtype)
    return deltas
