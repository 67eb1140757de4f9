"""The ModelPatcher bridge: a :class:`training.task.DiffusionTask` over a ComfyUI MODEL.

Everything here reads ComfyUI's own machinery, so every family ComfyUI loads trains the
same way:

- the clone's ``model_sampling`` gives the facts the objective (``losses/objective.py``)
  reads: the noise levels (its ``sigmas`` table, else ``percent_to_sigma``), the noising
  (``noise_scaling``), the prediction type (eps, v, flow) and the denoiser
  (``calculate_denoised``, inverted for a target where the type has no formula);
- conditioning goes through ``convert_cond`` + ``encode_model_conds`` (the samplers' path,
  so ``pooled_output``, ``guidance``, size conditioning... reach the model as in sampling)
  once per distinct conditioning, and each sample of a batch gets its own;
- the network runs through ``BaseModel.apply_model``; its raw output (the native
  prediction) is read from ``diffusion_model.forward`` by a forward patch;
- attention: where ComfyUI's global attention is one without a fused backward (its CPU
  defaults sub-quadratic / split / basic, which build the score matrix, and kernels made for
  inference), training forwards use ComfyUI's own ``attention_pytorch`` (PyTorch's
  ``scaled_dot_product_attention``, fused forward and backward) through the
  ``optimized_attention_override`` transformer option, unless the model carries an override
  of its own (:func:`training_attention`);
- the adapters' forward patches are installed as a ``PatcherInjection`` on the clone, so
  ComfyUI applies them when it loads the clone and removes them when it detaches it; the
  run always detaches the clone at the end.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from typing import Iterator

import torch

import comfy.ldm.modules.attention
import comfy.model_management
import comfy.ops
import comfy.model_patcher
import comfy.model_sampling
import comfy.patcher_extension
import comfy.sampler_helpers
import comfy.samplers

from ..lora.inject import ForwardPatches
from ..training.autocast import autocast_dtype

INJECTION_KEY = "lora_lab_training"


def prediction_kind(model_sampling) -> str | None:
    """"eps", "v" or "flow" for the parameterisations with a target formula, else None."""
    ms = comfy.model_sampling
    if isinstance(model_sampling, ms.CONST):
        return "flow"
    if isinstance(model_sampling, (ms.X0, ms.EDM)) or not isinstance(model_sampling, ms.EPS):
        return None
    if isinstance(model_sampling, ms.V_PREDICTION):
        return "v" if float(getattr(model_sampling, "sigma_data", 1.0)) == 1.0 else None
    return "eps"


def sample_latents(latents) -> list[torch.Tensor]:
    """Every sample of ``latents`` (a tensor or a list of batches) as a ``[1, ...]`` view."""
    batches = [latents] if isinstance(latents, torch.Tensor) else list(latents)
    return [batch[i:i + 1] for batch in batches for i in range(batch.shape[0])]


def expand_conditioning(positive, count: int) -> list:
    """One conditioning entry per latent: a single one is repeated."""
    if not isinstance(positive, (list, tuple)) or not positive:
        raise ValueError(
            "positive must be a CONDITIONING (a list of [tensor, dict] pairs) with at least one "
            "entry; connect a CLIP Text Encode or another conditioning node.")
    for i, entry in enumerate(positive):
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2
                and isinstance(entry[0], torch.Tensor) and isinstance(entry[1], dict)):
            raise ValueError(
                f"positive[{i}] is not a [tensor, dict] conditioning pair; connect a CONDITIONING.")
    if len(positive) == 1:
        return [positive[0]] * count
    if len(positive) != count:
        raise ValueError(
            f"positive holds {len(positive)} conditionings but latents hold {count} samples; "
            "give one conditioning (used for every latent) or exactly one per latent.")
    return list(positive)


class ComfyTask:
    """Train on a ComfyUI ModelPatcher ``patcher`` (a clone the caller owns)."""

    key_prefix = "diffusion_model."

    def __init__(self, patcher, positive, latents, training_dtype: str = "bf16",
                 empty=None) -> None:
        """``latents``: a tensor ``[N, C, ...]`` or a list of batches of any sizes, one
        conditioning entry per sample in ``positive`` (or one for all); ``empty``: the
        CONDITIONING of an empty prompt, which caption dropout trains with."""
        self.positive_count = len(positive) if isinstance(positive, (list, tuple)) else 0
        self.patcher = patcher
        self.base = patcher.model
        self.network = self.base.diffusion_model
        self.sampling = self.base.model_sampling
        self.prediction = prediction_kind(self.sampling)
        self.device = torch.device(patcher.load_device)
        table = getattr(self.sampling, "sigmas", None)
        self.sigma_table = table.detach().float().cpu().clone() if table is not None else None
        self._outputs: list[torch.Tensor] = []
        self._recording = True
        self.sample_conds = self._encode_conditioning(positive, latents)
        self.empty_conds = self._encode_empty(empty, latents) if empty is not None else None
        self.can_drop_captions = self.empty_conds is not None
        self._set_compute_dtype(training_dtype)
        self.attention = training_attention()

    def _set_compute_dtype(self, training_dtype: str) -> None:
        """Compute in fp32 when fp32 training is asked of a half-precision model, and in bf16
        rather than fp16 (whose range overflows in backward) under bf16 training. Object
        patches on the clone: the input model keeps its own compute dtype."""
        compute = self.base.manual_cast_dtype or self.base.get_dtype()
        if training_dtype == "fp32" and compute != torch.float32:
            self.patcher.set_model_compute_dtype(torch.float32)
        elif training_dtype == "bf16" and compute == torch.float16:
            self.patcher.set_model_compute_dtype(torch.bfloat16)

    # -- conditioning -----------------------------------------------------------------------
    def _encode_conditioning(self, positive, latents) -> list[dict]:
        samples = sample_latents(latents)
        entries = expand_conditioning(positive, len(samples))
        encoded: dict[tuple, dict] = {}
        per_sample = []
        for index, (entry, latent) in enumerate(zip(entries, samples)):
            key = (id(entry), tuple(latent.shape))  # some conditioning depends on the size
            if key not in encoded:
                try:
                    encoded[key] = self._encode_one(entry, latent)
                except Exception as error:
                    raise ValueError(
                        f"positive[{index if self.positive_count > 1 else 0}] (shape "
                        f"{list(entry[0].shape)}, extras {sorted(entry[1])}) does not fit "
                        f"{type(self.base).__name__}: {type(error).__name__}: {error}. Use "
                        "conditioning from this model's text encoder.") from error
            per_sample.append(encoded[key])
        return per_sample

    def _encode_empty(self, empty, latents) -> dict[tuple, dict]:
        """The empty conditioning encoded for each latent size."""
        if not isinstance(empty, (list, tuple)) or len(empty) != 1:
            count = len(empty) if isinstance(empty, (list, tuple)) else type(empty).__name__
            raise ValueError(
                f"empty_conditioning must be one conditioning (of an empty prompt); got "
                f"{count}. Connect a single CLIP Text Encode with an empty text.")
        [entry] = expand_conditioning(empty, 1)
        sizes = {tuple(latent.shape[1:]): latent for latent in sample_latents(latents)}
        try:
            return {size: self._encode_one(entry, latent) for size, latent in sizes.items()}
        except Exception as error:
            raise ValueError(
                f"empty_conditioning (shape {list(entry[0].shape)}) does not fit "
                f"{type(self.base).__name__}: {type(error).__name__}: {error}. Encode the "
                "empty prompt with this model's text encoder.") from error

    def _encode_one(self, entry, latent: torch.Tensor) -> dict:
        [cond] = comfy.sampler_helpers.convert_cond([[entry[0].clone(), dict(entry[1])]])
        [cond] = comfy.samplers.encode_model_conds(
            self.base.extra_conds, [cond], torch.zeros_like(latent), self.device, "positive",
            latent_image=self.base.process_latent_in(latent.clone()))
        return {
            name: value.process_cond(batch_size=1, area=None)
            for name, value in cond["model_conds"].items()
        }

    # -- DiffusionTask --------------------------------------------------------------------------
    def prepare_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self.base.process_latent_in(latents.clone())

    def percent_to_sigma(self, percent: float) -> float:
        return float(self.sampling.percent_to_sigma(percent))

    def add_noise(self, x0, noise, sigma):
        return self.sampling.noise_scaling(sigma, noise, x0)

    def denoise(self, sigma, output, x_t):
        return self.sampling.calculate_denoised(sigma, output, x_t)

    def predict(self, x_t, sigma, samples, dropped=None):
        conds = [self.sample_conds[int(i)] for i in samples]
        if dropped is not None:
            empty = self.empty_conds[tuple(x_t.shape[1:])]
            conds = [empty if drop else cond for cond, drop in zip(conds, dropped)]
        kwargs = comfy.samplers.cond_cat(conds)
        options = dict(self.patcher.model_options.get("transformer_options", {}))
        options["sigmas"] = sigma
        if self.attention is not None:
            options.setdefault("optimized_attention_override", self.attention)
        self.base.apply_model(x_t, sigma, transformer_options=options, **kwargs)
        return self._outputs.pop()

    def _record_output(self, forward):
        def run(*args, **kwargs):
            out = forward(*args, **kwargs)
            if self._recording:
                self._outputs.append(out)
            return out

        return run

    def for_data(self, positive, latents: torch.Tensor) -> "ComfyTask":
        """This task with other conditioning (and latents for its size): a view that shares
        the clone, its session and its forward (for validation data)."""
        view = copy.copy(self)
        view.positive_count = len(positive) if isinstance(positive, (list, tuple)) else 0
        view.sample_conds = view._encode_conditioning(positive, latents)
        return view

    @contextlib.contextmanager
    def previewing(self) -> Iterator[None]:
        """Sampling (a preview) on the training clone inside its session: the forward is not
        recorded, and afterwards the clone is loaded and injected again in case ComfyUI's
        model management moved it to make room for the sampler or the VAE."""
        self._recording = False
        try:
            yield
        finally:
            self._recording = True
            comfy.model_management.load_models_gpu([self.patcher], force_full_load=True)
            self.patcher.inject_model()

    @contextlib.contextmanager
    def session(self, patches: ForwardPatches) -> Iterator[None]:
        patches.patches.append((self.network, self._record_output))
        injection = comfy.patcher_extension.PatcherInjection(
            inject=lambda _: patches.apply(), eject=lambda _: patches.remove())
        self.patcher.set_injections(INJECTION_KEY, [injection])
        with training_mode():
            try:
                comfy.model_management.load_models_gpu([self.patcher], force_full_load=True)
                self.patcher.inject_model()
                with autograd_weights(self.base):
                    yield
            finally:
                release(self.patcher)
                self.patcher.remove_injections(INJECTION_KEY)
                patches.remove()
                self._outputs.clear()


# ComfyUI's switches for a training run (0.33+; absent before): set for the run, restored after.
# ``in_training`` routes the families that read it to differentiable code (Flux's rope leaves
# its fused kernel, which has no backward; Lumina, LTX, SeedVR, MiniMax and ``ops`` skip
# inference-only kernels that would also bypass a patched Linear's forward).
# ``training_fp8_bwd`` is core's trainer's fp8-backward choice, which it never resets.
TRAINING_FLAGS = {"in_training": True, "training_fp8_bwd": False}


def _fused_kernels() -> tuple[object, dict[str, object]]:
    """comfy_kitchen (ComfyUI 0.33+) and its rope and adaLN kernels by name, mapped to the
    same function of its eager backend. The kernels are custom ops without a backward, and
    Cosmos, MiniMax, Ernie and Ideogram call some of them whatever ``in_training`` says; the
    eager backend computes the same with differentiable PyTorch ops."""
    try:
        import comfy_kitchen
        import comfy_kitchen.backends.eager as eager
    except ImportError:
        return None, {}
    return comfy_kitchen, {
        name: getattr(eager, name) for name in getattr(comfy_kitchen, "__all__", ())
        if ("rope" in name or "adaln" in name) and callable(getattr(eager, name, None))}


@contextlib.contextmanager
def training_mode() -> Iterator[None]:
    """For the run: :data:`TRAINING_FLAGS` that this ComfyUI has, and differentiable versions
    of its fused kernels; everything restored however the run ends."""
    mm = comfy.model_management
    previous = {name: getattr(mm, name) for name in TRAINING_FLAGS if hasattr(mm, name)}
    module, kernels = _fused_kernels()
    fused = {name: getattr(module, name) for name in kernels}
    try:
        for name in previous:
            setattr(mm, name, TRAINING_FLAGS[name])
        for name, function in kernels.items():
            setattr(module, name, function)
        yield
    finally:
        for name, value in previous.items():
            setattr(mm, name, value)
        for name, function in fused.items():
            setattr(module, name, function)


def training_clone(model):
    """The clone a run trains on.

    A dynamic-VRAM patcher (ComfyUI 0.33+ on NVIDIA: ``ModelPatcherDynamic``) streams its
    weights into reused buffers at every forward, so what autograd would save is overwritten
    by the next layer. Training runs on a non-dynamic clone instead, which ComfyUI rebuilds
    from the loader's recorded factory (``clone(disable_dynamic=True)``, as core's trainer
    does); it holds its own weights, so the input MODEL and its buffers are not touched.
    """
    is_dynamic = getattr(model, "is_dynamic", None)
    if is_dynamic is None or not is_dynamic():
        return model.clone()
    try:
        return model.clone(disable_dynamic=True)
    except RuntimeError as error:
        raise ValueError(
            f"This MODEL uses ComfyUI's dynamic VRAM and cannot be reloaded for training "
            f"({error}). Load it with a core loader (Load Diffusion Model, Load Checkpoint), "
            "or start ComfyUI with --disable-dynamic-vram.") from error


@contextlib.contextmanager
def autograd_weights(model, frozen: bool = True) -> Iterator[None]:
    """Let autograd run through the loaded model without copying its weights.

    ComfyUI creates weights under ``torch.inference_mode`` (its loaders, and the samplers
    that patch LoRAs into them), and autograd cannot save such tensors for backward. Which
    weights are inference tensors is only known once the clone is loaded: loading restores or
    patches the shared modules' weights as the previously loaded clone of the same model left
    them (patched outside inference mode by one node, restored from inference-mode backups by
    the next). So this runs after loading:

    - ComfyUI's Linear and ConvNd layers (``frozen``) use a weight stored as it is computed
      through a normal tensor aliasing it (autograd keeps a reference, no copy), and run a
      weight ComfyUI casts (dtype, device, weight functions, low-VRAM patches, autocast)
      through :class:`FrozenLayer`: fetched with ComfyUI's own ``cast_bias_weight``, used and
      dropped, fetched again in backward for the input gradient. Nothing weight-sized is
      saved or copied (a cast is made twice and freed each time);
    - other layers of ComfyUI's ops (or all of them with ``frozen=False``) get an identity
      weight function, which makes ComfyUI's ops hand the layer a per-forward copy
      (``cast_bias_weight`` copies whenever a weight function is present);
    - any other inference parameter or buffer (norm scales, modulation tables, pad tokens,
      positional tables) is replaced for the run by a normal tensor that aliases its memory
      (no copy), and the original object is put back after it.
    """
    swapped, layers, functions_set = [], [], []
    for module in model.modules():
        cast = hasattr(module, "comfy_cast_weights")
        kind = _frozen_kind(module) if cast and frozen else None
        if kind is not None:
            layers.append((module, module.__dict__.get("comfy_cast_weights", _MISSING)))
            module.forward_comfy_cast_weights = functools.partial(_frozen_forward, module, kind)
            module.comfy_cast_weights = True
        for attr in ("weight", "bias") if cast and kind is None else ():
            tensor = getattr(module, attr, None)
            functions = getattr(module, f"{attr}_function", None)
            if (isinstance(tensor, torch.Tensor) and tensor.is_inference()
                    and functions is not None and _normal_copy not in functions):
                # a new list: the ops' empty default is a class attribute shared by all layers
                previous = module.__dict__.get(f"{attr}_function", _MISSING)
                functions_set.append((module, attr, previous))
                setattr(module, f"{attr}_function", list(functions) + [_normal_copy])
        for table in (module._parameters, module._buffers):
            for name, tensor in table.items():
                if (tensor is None or not tensor.is_inference()
                        or (cast and name in ("weight", "bias"))):
                    continue
                alias = _alias(tensor)
                if isinstance(tensor, torch.nn.Parameter):
                    alias = torch.nn.Parameter(alias, requires_grad=False)
                swapped.append((table, name, tensor))
                table[name] = alias
    try:
        yield
    finally:
        for table, name, tensor in reversed(swapped):
            table[name] = tensor
        for module, attr, previous in reversed(functions_set):
            if previous is _MISSING:
                module.__dict__.pop(f"{attr}_function", None)
            else:
                setattr(module, f"{attr}_function", previous)
        for module, previous in layers:
            module.__dict__.pop("forward_comfy_cast_weights", None)
            if previous is _MISSING:
                module.__dict__.pop("comfy_cast_weights", None)
            else:
                module.comfy_cast_weights = previous


_MISSING = object()


def _normal_copy(weight: torch.Tensor) -> torch.Tensor:
    return weight  # ComfyUI already copied it because a weight function is present


def _alias(tensor: torch.Tensor) -> torch.Tensor:
    """A normal tensor on the memory of ``tensor`` (an inference tensor): no copy."""
    if tensor.device.type == "meta" or tensor.numel() == 0:
        return tensor.clone()
    return torch.empty(0, dtype=tensor.dtype, device=tensor.device).set_(
        tensor.untyped_storage(), tensor.storage_offset(), tensor.size(), tensor.stride())


def _frozen_kind(module) -> str | None:
    """``linear`` / ``conv`` for ComfyUI's own Linear and ConvNd layers (whose cast forward is
    ComfyUI's standard one), None for anything else (quantized or custom ops)."""
    for name in ("Linear", "Conv1d", "Conv2d", "Conv3d"):
        standard = getattr(getattr(comfy.ops.disable_weight_init, name, None),
                           "forward_comfy_cast_weights", None)
        if standard is not None and type(module).forward_comfy_cast_weights is standard:
            if name != "Linear" and (isinstance(module.padding, str)
                                     or module.padding_mode != "zeros"):
                return None
            return "linear" if name == "Linear" else "conv"
    return None


def _fetch(module, dtype, device):
    """The layer's weight and bias as ComfyUI's ops would use them for this dtype/device."""
    with torch.no_grad():
        weight, bias = comfy.ops.cast_bias_weight(module, dtype=dtype, device=device,
                                                  bias_dtype=dtype)[:2]
    return weight, bias


def _apply(module, kind: str, x: torch.Tensor, weight, bias) -> torch.Tensor:
    if kind == "linear":
        return torch.nn.functional.linear(x, weight, bias)
    return module._conv_forward(x, weight, bias)


class FrozenLayer(torch.autograd.Function):
    """``y = op(x, W, b)`` of a frozen ComfyUI layer with the gradient of ``x`` only: ``W`` is
    fetched again in backward instead of being saved (a cast that would otherwise stay alive
    until backward, a second copy of the model over a whole forward). Inside a backward (a
    checkpointed block's recomputation, whose backward follows at once) the fetched weight is
    kept instead: one block's casts live at a time. ``compute``: the dtype the op computes in
    (autocast's, else ``x``'s), which the weight is fetched in; the input gradient is
    computed in it too, as autograd computes it for ``F.linear``/``conv`` under autocast."""

    @staticmethod
    def forward(ctx, x, module, kind, compute):
        weight, bias = _fetch(module, compute, x.device)
        out = _apply(module, kind, x, weight, bias)
        ctx.kept = torch._C._current_autograd_node() is not None and not weight.is_inference()
        ctx.save_for_backward(x if kind == "conv" else None, weight if ctx.kept else None)
        ctx.module, ctx.kind, ctx.dtype, ctx.compute = module, kind, x.dtype, compute
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        if not ctx.kept:
            weight, _ = _fetch(ctx.module, ctx.compute, grad.device)
        grad = grad.to(ctx.compute)
        if ctx.kind == "linear":
            return grad.matmul(weight).to(ctx.dtype), None, None, None
        m = ctx.module
        grad_x = torch.ops.aten.convolution_backward(
            grad, x.to(ctx.compute), weight, None, list(m.stride), list(m.padding),
            list(m.dilation), False, [0] * len(m.kernel_size), m.groups, [True, False, False])[0]
        return grad_x.to(ctx.dtype), None, None, None


def _frozen_forward(module, kind: str, x: torch.Tensor) -> torch.Tensor:
    """ComfyUI's cast forward of a Linear/ConvNd without weight copies.

    Where the stored weight is what the op computes with (same device, the dtype of ``x`` or
    of autocast, no weight functions), autograd gets a normal tensor aliasing it and keeps a
    reference for backward (no copy, no Python in the graph); where ComfyUI would cast, the
    layer runs through :class:`FrozenLayer`, which casts again in backward instead of
    keeping the cast. Under autocast the weight is fetched in autocast's dtype at once
    (ComfyUI casts it to the input's dtype first and autocast casts that again: the same
    values, since every stored dtype widens to float32 exactly).
    """
    compute = autocast_dtype(x.device.type) or x.dtype
    if not (torch.is_grad_enabled() and x.requires_grad):
        weight, bias = _fetch(module, compute, x.device)
        return _apply(module, kind, x, weight, bias)
    weight, bias = module.weight, module.bias
    if (weight.dtype == compute and weight.device == x.device and not module.weight_function
            and not module.bias_function
            and (bias is None or (bias.dtype == compute and bias.device == x.device))):
        if weight.is_inference():
            weight = _alias(weight)
        if bias is not None and bias.is_inference():
            bias = _alias(bias)
        return _apply(module, kind, x, weight, bias)
    return FrozenLayer.apply(x, module, kind, compute)


# ComfyUI's attention functions that training replaces: those that materialise the score
# matrix or chunk it in Python (autograd then saves and differentiates every piece) and those
# made for inference only. PyTorch's, xformers' and flash-attn's have fused backwards.
_REPLACED_ATTENTION = ("attention_basic", "attention_split", "attention_sub_quad",
                       "attention_sage", "attention3_sage", "attention_comfy_kitchen_int8")


def training_attention():
    """The ``optimized_attention_override`` training forwards use, or None to keep ComfyUI's
    global attention (already one with a fused backward)."""
    attention = comfy.ldm.modules.attention
    replaced = [getattr(attention, name, None) for name in _REPLACED_ATTENTION]
    if not any(f is not None and f is attention.optimized_attention for f in replaced):
        return None
    fused = attention.attention_pytorch

    def override(_, *args, **kwargs):
        return fused(*args, **kwargs)

    return override


def release(patcher) -> None:
    """Unload ``patcher`` and leave the shared modules as an unloaded model has them.

    Ejects the injections, restores any patched weights, and clears the per-layer weight
    functions ComfyUI attached for this clone (the next clone to load attaches its own).
    """
    loaded = comfy.model_management.current_loaded_models
    for i in reversed(range(len(loaded))):
        if loaded[i].model is patcher:
            entry = loaded.pop(i)
            if entry.model_finalizer is not None:
                entry.model_finalizer.detach()
    patcher.detach(unpatch_all=True)
    for module in patcher.model.modules():
        comfy.model_patcher.wipe_lowvram_weight(module)


def check_latents_fit(patcher, latents) -> None:
    """Latent channels and dimensions the model expects, checked before anything runs
    (``latents``: a tensor or a list of batches)."""
    from ..training.loop import as_batches, check_latents

    check_latents(latents)
    for samples in as_batches(latents):
        _check_fit(patcher, samples)


def _check_fit(patcher, samples: torch.Tensor) -> None:
    latent_format = patcher.model.latent_format
    channels = getattr(latent_format, "latent_channels", None)
    dims = getattr(latent_format, "latent_dimensions", 2)
    if samples.ndim != dims + 2:
        raise ValueError(
            f"latents have shape {list(samples.shape)} ({samples.ndim}-D) but this model "
            f"({type(patcher.model).__name__}) takes {dims + 2}-D latents "
            f"{'[N, C, T, H, W]' if dims == 3 else '[N, C, H, W]'}; encode the images with "
            "this model's VAE.")
    if channels is not None and samples.shape[1] != channels:
        raise ValueError(
            f"latents have {samples.shape[1]} channels but this model "
            f"({type(patcher.model).__name__}) uses {channels}; encode the images with this "
            "model's VAE.")
