"""The Train LoRA node's inputs and outputs as plain data (no ComfyUI import).

``nodes/train.py`` builds the V3 schema from these tables; the CI tests compare them with
the node contract without needing ComfyUI.
"""

from __future__ import annotations

from ..training.options import BY_NAME, OPTIONS_NODE, TRAIN_NODE, node_options
from .companion_spec import NodeSpec

NONE_LORA = "[None]"
OPTIONS_TYPE = "LORALAB_OPTIONS"


def option_input(name: str) -> tuple[str, str, dict]:
    """A node input made from the declared option ``name`` (training/options.py)."""
    option = BY_NAME[name]
    return name, option.kind, option.widget()


OPTIONS_INPUT = (
    "options", OPTIONS_TYPE, {"optional": True, "tooltip": (
        "Training Options (warm-up, schedule, clipping, EMA, LoRA+, target layers, timestep "
        "sampling, loss weighting, noise offset, caption dropout...). "
        "Unconnected: every option at its default.")})

EMPTY_CONDITIONING_INPUT = (
    "empty_conditioning", "CONDITIONING", {"optional": True, "tooltip": (
        "The conditioning of an empty prompt (CLIP Text Encode with no text): what a sample "
        "trains with when caption_dropout (Training Options) drops its own. Needed only "
        "then.")})

# Training Options' data inputs (not options: they carry ComfyUI objects, which the options
# socket hands to Train LoRA beside the option values)
OPTIONS_SOCKETS: list[tuple[str, str, dict]] = [
    ("vae", "VAE", {"optional": True, "tooltip": (
        "The VAE that decodes the previews (preview_every); the model's own VAE.")}),
    ("preview_conditioning", "CONDITIONING", {"optional": True, "tooltip": (
        "The prompts of the previews: one image per conditioning entry (e.g. CLIP Text Encode, "
        "or several combined), sampled at preview_every steps from the same noise.")}),
    ("validation_latents", "LATENT", {"optional": True, "tooltip": (
        "Held-out latents for the validation loss (validation_every); unconnected: the "
        "training latents. Same size as the training latents.")}),
    ("validation_conditioning", "CONDITIONING", {"optional": True, "tooltip": (
        "The conditioning of validation_latents: one for all, or one per latent. Needed with "
        "validation_latents.")}),
]

# Train LoRA's inputs in the contract's order, then the optional sockets.
TRAIN_INPUTS: list[tuple[str, str, dict]] = [
    ("model", "MODEL", {"tooltip": "The diffusion model to train on. It is not modified: the "
                        "LoRA trains on a clone and other branches keep the original."}),
    ("latents", "LATENT", {"tooltip": "Training data: one latent per image or clip (VAE "
                           "Encode, Load Image Dataset), or a list of LATENTs of several sizes "
                           "(Load Image Dataset's bucket mode, ComfyUI's Make Training Dataset / "
                           "Resolution Bucket); each micro-batch holds one size. A noise_mask "
                           "(Set Latent Noise Mask) weights the loss per element."}),
    ("positive", "CONDITIONING", {"tooltip": "Conditioning to train with: one for all latents, or "
                                  "exactly one per latent (in the same order); with a list of "
                                  "LATENTs, a list of conditionings, one per LATENT."}),
    *(option_input(option.name) for option in node_options(TRAIN_NODE)),
    ("existing_lora", "COMBO", {"options": [NONE_LORA], "default": NONE_LORA, "tooltip":
                                "A LoRA from the loras folder to continue training (safetensors "
                                "only; it keeps its own rank and alpha), or [None] for a new LoRA. "
                                "A checkpoint with its .training_state beside it resumes its run "
                                "exactly (optimizer, schedule, EMA, data order; its settings "
                                "must match). Its previous steps are added to the steps "
                                "output."}),
    OPTIONS_INPUT,
    EMPTY_CONDITIONING_INPUT,
]
# (id, ComfyUI type, display name, tooltip)
TRAIN_OUTPUTS: list[tuple[str, str, str, str]] = [
    ("model_with_lora", "MODEL", "model_with_lora",
     "The input model with the trained LoRA applied at strength 1.0, exactly as ComfyUI's LoRA "
     "loader applies it (inference costs what the base model costs)."),
    ("lora", "LORA_MODEL", "lora",
     "The trained LoRA weights (diffusion_model.<layer>.lora_up/lora_down/alpha); connect Save "
     "LoRA, Apply LoRA or ComfyUI's own LoRA nodes."),
    ("loss", "LOSS_MAP", "loss",
     "{'loss': one value per optimizer step} and, with validation_every, 'validation': "
     "[step, loss] pairs; connect Plot Loss (core's Plot Loss reads 'loss' only)."),
    ("total_steps", "INT", "steps",
     "Steps of this run plus the steps of a continued LoRA."),
    ("previews", "IMAGE", "previews",
     "The previews (Training Options preview_every): one row per preview step, one column "
     "per preview conditioning, in step order; a small black image when previews are off."),
]


TRAIN_LORA = NodeSpec(
    node_id="LoRALab_TrainLoRA",
    display_name="Train LoRA",
    description=(
        "Train a LoRA on a diffusion model from latents and conditioning. The loss is taken in "
        "the model's native prediction space (noise, v or flow velocity), weighted per noise "
        "level as Training Options' loss_weighting says."),
    inputs=TRAIN_INPUTS,
    outputs=TRAIN_OUTPUTS,
    # lists: ComfyUI's dataset nodes hand over lists of LATENTs and CONDITIONINGs
    flags={"not_idempotent": True, "is_input_list": True},
)


TRAINING_OPTIONS = NodeSpec(
    node_id="LoRALab_TrainingOptions",
    display_name="Training Options",
    description=(
        "Options of a Train LoRA run beyond its own widgets: learning-rate schedule and "
        "warm-up, gradient clipping, weight decay, EMA, alpha and rsLoRA, LoRA+, which layers "
        "to train, norm and bias deltas, timestep sampling and loss weighting, noise offset, "
        "caption dropout, checkpoints, validation and previews. Chain several: a later node's "
        "changed values and connected inputs win."),
    inputs=[*(option_input(option.name) for option in node_options(OPTIONS_NODE)),
            ("options", OPTIONS_TYPE, {"optional": True, "tooltip": (
                "Options from another Training Options node; the values changed on this node "
                "(different from their default) replace them.")}), *OPTIONS_SOCKETS],
    # the output's id differs from the input's (ComfyUI requires it); both show as "options"
    outputs=[("options_out", OPTIONS_TYPE, "options",
              "Connect to Train LoRA's options input (or to another Training Options node).")],
)
