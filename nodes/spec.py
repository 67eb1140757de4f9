"""The Train LoRA node's inputs and outputs as plain data (no ComfyUI import).

``nodes/train.py`` builds the V3 schema from these tables; the CI tests compare them with
the node contract without needing ComfyUI.
"""

from __future__ import annotations

from ..lora import ADAPTERS
from ..losses import LOSSES
from ..optimizers import OPTIMIZERS
from ..training.config import DTYPES, TrainConfig
from .companion_spec import NodeSpec

NONE_LORA = "[None]"

# (name, ComfyUI type, options) in the contract's order. Options: default/min/max/step for
# numbers, "options" for combos. Tooltips come from TrainConfig where it has the field.
TRAIN_INPUTS: list[tuple[str, str, dict]] = [
    ("model", "MODEL", {"tooltip": "The diffusion model to train on. It is not modified: the "
                        "LoRA trains on a clone and other branches keep the original."}),
    ("latents", "LATENT", {"tooltip": "Training data: one latent per image (VAE Encode or "
                           "Load Image Dataset). All latents share one size."}),
    ("positive", "CONDITIONING", {"tooltip": "Conditioning to train with: one for all latents, or "
                                  "exactly one per latent (in the same order)."}),
    ("batch_size", "INT", {"default": 1, "min": 1, "max": 10000}),
    ("grad_accumulation_steps", "INT", {"default": 1, "min": 1, "max": 1024}),
    ("steps", "INT", {"default": 16, "min": 1, "max": 100000}),
    ("learning_rate", "FLOAT", {"default": 0.0005, "min": 0.0000001, "max": 1.0, "step": 0.0000001}),
    ("rank", "INT", {"default": 8, "min": 1, "max": 128}),
    ("optimizer", "COMBO", {"options": list(OPTIMIZERS), "default": "AdamW"}),
    ("loss_function", "COMBO", {"options": list(LOSSES), "default": "MSE"}),
    ("seed", "INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                     "control_after_generate": True}),
    ("training_dtype", "COMBO", {"options": list(DTYPES), "default": "bf16"}),
    ("lora_dtype", "COMBO", {"options": list(DTYPES), "default": "bf16"}),
    ("algorithm", "COMBO", {"options": list(ADAPTERS), "default": next(iter(ADAPTERS))}),
    ("gradient_checkpointing", "BOOLEAN", {"default": True}),
    ("existing_lora", "COMBO", {"options": [NONE_LORA], "default": NONE_LORA, "tooltip":
                                "A LoRA from the loras folder to continue training (safetensors "
                                "only; it keeps its own rank and alpha), or [None] for a new LoRA. "
                                "Its previous steps are added to the steps output."}),
]

# (id, ComfyUI type, display name, tooltip)
TRAIN_OUTPUTS: list[tuple[str, str, str, str]] = [
    ("model_with_lora", "MODEL", "model_with_lora",
     "The input model with the trained LoRA applied at strength 1.0, exactly as ComfyUI's LoRA "
     "loader applies it (inference costs what the base model costs)."),
    ("lora", "LORA_MODEL", "lora",
     "The trained LoRA weights (diffusion_model.<layer>.lora_up/lora_down/alpha); connect Save "
     "LoRA, Apply LoRA or ComfyUI's own LoRA nodes."),
    ("loss", "LOSS_MAP", "loss", "{'loss': one value per optimizer step}; connect Plot Loss."),
    ("total_steps", "INT", "steps",
     "Steps of this run plus the steps of a continued LoRA."),
]


def tooltip(name: str, options: dict) -> str:
    if "tooltip" in options:
        return options["tooltip"]
    return TrainConfig.help(name)


TRAIN_LORA = NodeSpec(
    node_id="LoRALab_TrainLoRA",
    display_name="Train LoRA",
    description=(
        "Train a LoRA on a diffusion model from latents and conditioning. The loss is taken in "
        "the model's native prediction space (noise, v or flow velocity)."),
    inputs=[(name, kind, {**options, "tooltip": tooltip(name, options)})
            for name, kind, options in TRAIN_INPUTS],
    outputs=TRAIN_OUTPUTS,
    flags={"not_idempotent": True},
)
