"""LoRA files that name modules another way, mapped to ``diffusion_model.<module>.<suffix>``.

ComfyUI's own key map for the model (``comfy.lora.model_lora_keys_unet``) resolves kohya
names (``lora_unet_<path with _>``), diffusers/PEFT names (``unet.down_blocks...``,
``transformer.transformer_blocks...``, ``base_model.model...``) and the plain
``diffusion_model.<module>`` form to the model's weight keys. PEFT's ``lora_A``/``lora_B``
become ``lora_down``/``lora_up`` (the same matrices: ``lora_B @ lora_A``). Keys no map
resolves are kept as they are, so the reader reports them with its own precise error.
"""

from __future__ import annotations

import comfy.lora
import comfy.lora_convert

_SUFFIXES = {
    "lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
    "lora_A.default.weight": "lora_down.weight", "lora_B.default.weight": "lora_up.weight",
    "lora.down.weight": "lora_down.weight", "lora.up.weight": "lora_up.weight",
}


def to_diffusion_model_keys(patcher, tensors: dict) -> dict:
    """``tensors`` with every key ComfyUI can place renamed to ``diffusion_model.<path>.<suffix>``."""
    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    tensors = comfy.lora_convert.convert_lora(dict(tensors))
    out = {}
    for key, value in tensors.items():
        out[_rename(key, key_map)] = value
    return out


def _rename(key: str, key_map: dict) -> str:
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):  # longest module name first
        module, suffix = ".".join(parts[:cut]), ".".join(parts[cut:])
        target = key_map.get(module)
        if isinstance(target, str) and target.endswith(".weight"):
            return f"{target[:-len('.weight')]}.{_SUFFIXES.get(suffix, suffix)}"
    return key
