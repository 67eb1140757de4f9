"""LoRA files that name modules another way: read into ``diffusion_model.<module>.<suffix>``,
and written under kohya's or diffusers' names (Save LoRA's ``format``).

Reading: ComfyUI's own key map for the model (``comfy.lora.model_lora_keys_unet``) resolves
kohya names (``lora_unet_<path with _>``), diffusers/PEFT names (``unet.down_blocks...``,
``transformer.transformer_blocks...``, ``base_model.model...``) and the plain
``diffusion_model.<module>`` form to the model's weight keys. PEFT's ``lora_A``/``lora_B``
become ``lora_down``/``lora_up`` (the same matrices: ``lora_B @ lora_A``). Names that cover
rows of one fused layer (diffusers' ``to_q``/``to_k``/``to_v`` of SD3's ``qkv``) are merged
into one LoRA of that layer (:func:`lora.export.merge_slices`). Keys no map resolves are kept
as they are, so the reader reports them with its own precise error.

Writing (:func:`export_names`), from the same facts ComfyUI reads files with:

- SD1.x/SD2.x: kohya's ``lora_unet_<diffusers module>`` names (kohya sd-scripts trains
  diffusers' UNet2DConditionModel; ``comfy.utils.unet_to_diffusers`` gives the module names);
- SDXL: kohya's ``lora_unet_<LDM module>`` names (sd-scripts' SDXL UNet keeps the LDM names;
  diffusers maps them with ``_maybe_map_sgm_blocks_to_diffusers``);
- other families: diffusers' ``transformer.<module>`` names where ComfyUI's key map has them
  (SD3, Flux, AuraFlow, PixArt, HiDream...), else the original ``diffusion_model.<module>``
  names (Wan and others: the form diffusers converts for them), both with PEFT suffixes.
"""

from __future__ import annotations

import functools
import logging

import comfy.lora
import comfy.lora_convert
import comfy.model_base
import comfy.utils

from ..lora.diff import SUFFIXES as DELTA_SUFFIXES
from ..lora.export import (PEFT_SUFFIXES, ExportName, ExportNames, Part, Slice, export_lora,
                           merge_slices, split_key)
from ..lora.base import alpha_value
from ..lora.io import IMPLEMENTATION_COMFYUI
from ..lora.weights import metadata_of

log = logging.getLogger(__name__)

_SUFFIXES = {  # other tools' names of LoRA's two matrices -> this pack's
    **{peft: own for own, peft in PEFT_SUFFIXES.items()},
    "lora_A.default.weight": "lora_down.weight", "lora_B.default.weight": "lora_up.weight",
    "lora.down.weight": "lora_down.weight", "lora.up.weight": "lora_up.weight",
}
_PREFIX = "diffusion_model."
_KOHYA_LDM = ("SDXL", "SDXLRefiner")  # model classes whose kohya names are LDM names
# families whose diffusers model keeps a layer fused where ComfyUI's key map offers both the
# fused name and a split (Flux's single-block linear1: split in Flux.1, fused in Flux.2)
_FUSED_IN_DIFFUSERS = {"Flux2"}


def base_model(model):
    """The BaseModel of a ModelPatcher (or the BaseModel itself)."""
    return getattr(model, "model", model)


def family(model) -> str:
    base = base_model(model)
    return type(getattr(base, "model_config", None) or base).__name__


def to_diffusion_model_keys(patcher, tensors: dict) -> dict:
    """``tensors`` with every key ComfyUI can place renamed to ``diffusion_model.<path>.<suffix>``."""
    base = base_model(patcher)
    key_map = comfy.lora.model_lora_keys_unet(base, {})
    tensors = comfy.lora_convert.convert_lora(dict(tensors))
    out, sliced = {}, {}  # sliced: fused layer's weight key -> {name: (target, its tensors)}
    for key, value in tensors.items():
        name, suffix, target = _resolve(key, key_map)
        suffix = _SUFFIXES.get(suffix, suffix)
        if target is None:
            out[key] = value
        elif isinstance(target, str):
            out[f"{target[:-len('.weight')]}.{suffix}"] = value
        else:
            parts = sliced.setdefault(target[0], {})
            parts.setdefault(name, (target, {}))[1][suffix] = value
    if sliced:
        shapes = {k: v.shape for k, v in base.state_dict().items() if k in sliced}
        for weight_key, parts in sliced.items():
            out.update(_merged(weight_key, parts, shapes[weight_key][0]))
    return out


def _weight_key(target) -> str | None:
    """The model weight a key-map target names (a key, or a tuple starting with one)."""
    key = target[0] if isinstance(target, tuple) and target else target
    return key if isinstance(key, str) and key.endswith(".weight") else None


def _resolve(key: str, key_map: dict):
    """(the file's module name, the key's suffix, its key-map target) or Nones."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):  # longest module name first
        module, suffix = ".".join(parts[:cut]), ".".join(parts[cut:])
        target = key_map.get(module)
        if _weight_key(target) is not None:
            return module, suffix, target
    return None, None, None


def _rows(target: tuple, out_features: int) -> Slice | None:
    """The output rows a key-map target ``(weight key, (dim, offset, size) or None[,
    function])`` covers; None for a slice along another axis."""
    offset = target[1] if len(target) > 1 else None
    transform = target[2] if len(target) > 2 else None
    if offset is None:
        return Slice(0, out_features, transform)
    if offset[0] != 0:
        return None
    return Slice(offset[1], offset[2], transform)


def _merged(weight_key: str, parts: dict, out_features: int) -> dict:
    """One ``lora_down``/``lora_up`` pair for the named slices of one fused layer."""
    pieces = []
    for name, (target, own) in sorted(parts.items()):
        if "lora_down.weight" not in own or "lora_up.weight" not in own or set(own) - {
                "lora_down.weight", "lora_up.weight", "alpha"}:
            raise ValueError(
                f"The LoRA names {name}, a part of the fused layer {weight_key}, with keys "
                f"{sorted(own)}; only LoRA's matrices (lora_A/lora_B or lora_down/lora_up) can "
                "be continued on a part of a layer. Pick another file.")
        rows = _rows(target, out_features)
        if rows is None:
            raise ValueError(f"The LoRA names {name}, a slice of {weight_key} along its inputs; "
                             "it cannot be continued. Pick another file.")
        down, up = own["lora_down.weight"], own["lora_up.weight"].float()
        if rows.transform is not None:  # a row permutation that is its own inverse
            up = rows.transform(up)
        alpha = alpha_value(own.get("alpha"), f"{name}.alpha")
        scale = 1.0 if alpha is None else alpha / down.shape[0]
        pieces.append(Part(rows.offset, rows.size, down, up, scale))
    down, up = merge_slices(sorted(pieces, key=lambda p: p.offset), out_features)
    module = weight_key[:-len(".weight")]
    return {f"{module}.lora_down.weight": down, f"{module}.lora_up.weight": up}


def export_names(model, format: str, modules=None) -> ExportNames:
    """How ``model``'s modules are named in ``format`` ("kohya"; see the module docstring).

    ``modules``: the modules (after ``diffusion_model.``) to name; all weights if None.
    """
    if format != "kohya":
        raise ValueError(f"format {format!r} has no names to compute; choose kohya.")
    base = base_model(model)
    name = family(model)
    weights = {k[len(_PREFIX):-len(".weight")]: v.shape for k, v in base.state_dict().items()
               if k.startswith(_PREFIX) and k.endswith(".weight")}
    wanted = set(weights) if modules is None else set(modules)
    unet_config = getattr(getattr(base, "model_config", None), "unet_config", {}) or {}
    diffusers = comfy.utils.unet_to_diffusers(unet_config)
    if diffusers:  # a UNet: kohya's lora_unet_ names
        ldm = isinstance(base, tuple(getattr(comfy.model_base, n) for n in _KOHYA_LDM))
        renamed = {} if ldm else {v[:-len(".weight")]: k[:-len(".weight")]
                                  for k, v in diffusers.items() if k.endswith(".weight")}
        names, missing = {}, []
        for module in sorted(wanted):
            if not ldm and module not in renamed:
                missing.append(module)
            path = renamed.get(module, module)
            names[module] = (ExportName("lora_unet_" + path.replace(".", "_")),)
        if missing:
            log.warning("%d layers of %s have no diffusers name (first: %s); they keep kohya's "
                        "LDM names, which ComfyUI loads and diffusers may not.",
                        len(missing), name, missing[0])
        impl = "https://github.com/Stability-AI/generative-models"
        return ExportNames("kohya", names, name, impl)
    key_map = comfy.lora.model_lora_keys_unet(base, {})
    found: dict[str, list[ExportName]] = {}
    for key, target in key_map.items():
        if not key.startswith("transformer."):
            continue
        weight = _weight_key(target)
        if weight is None or not weight.startswith(_PREFIX):
            continue
        module = weight[len(_PREFIX):-len(".weight")]
        if module not in wanted:
            continue
        rows = None
        if not isinstance(target, str):
            rows = _rows(target, weights[module][0])
            if rows is None:
                continue
        found.setdefault(module, []).append(ExportName(key, rows))
    if not found:  # no diffusers names: the original checkpoint's, as diffusers converts them
        names = {m: (ExportName(_PREFIX + m),) for m in sorted(wanted)}
        return ExportNames("peft", names, name, "diffusers")
    names = {}
    for module, options in found.items():
        whole = sorted((o for o in options if o.rows is None), key=lambda o: o.name)
        chosen = sorted((o for o in options if o.rows is not None),
                        key=lambda o: (o.rows.offset, o.name))
        complete = bool(chosen) and sum(o.rows.size for o in chosen) == weights[module][0] and all(
            a.rows.offset + a.rows.size == b.rows.offset for a, b in zip(chosen, chosen[1:]))
        if whole and (not complete or name in _FUSED_IN_DIFFUSERS):
            names[module] = (whole[0],)
        elif complete:
            names[module] = tuple(chosen)
        # else a partial or overlapping split only: unnamed (an error if the LoRA has it)
    return ExportNames("peft", names, name, "diffusers")


def exported(lora, format: str, model=None):
    """``(tensors, implementation)`` of ``lora`` under ``format``'s key names."""
    if format == "comfyui":
        return lora, IMPLEMENTATION_COMFYUI
    if format != "kohya":
        raise ValueError(f"format {format!r} is not known; choose comfyui or kohya.")
    namer = functools.partial(export_names, model) if model is not None else getattr(
        lora, "namer", None)
    if namer is None:
        raise ValueError(
            "format kohya names the LoRA's layers the way its model's other tools do, and this "
            "LORA_MODEL does not say which model it was trained on: connect that model to Save "
            "LoRA's model input (Train LoRA's lora output needs nothing).")
    modules = {split_key(key, _PREFIX)[0] for key in lora}
    names = namer("kohya", modules)
    tensors = export_lora(lora, names, _PREFIX)
    algorithm = metadata_of(lora).get("lora_lab.algorithm", "LoRA")
    if names.style == "kohya" and algorithm != "LoRA":
        log.warning(
            "Save LoRA: a %s keeps all its keys in kohya names (ComfyUI's loader applies them); "
            "diffusers loads LoRA only from such files%s.", algorithm,
            " (it drops dora_scale, leaving a plain LoRA)" if algorithm == "DoRA" else "")
    deltas = [k for k in tensors if k.rsplit(".", 1)[-1] in DELTA_SUFFIXES]
    if deltas:
        log.warning(
            "Save LoRA: %d norm/bias delta keys (diff, diff_b; first %s) are saved under kohya "
            "names: ComfyUI's loader applies them, diffusers leaves them out.",
            len(deltas), deltas[0])
    return tensors, names.implementation
