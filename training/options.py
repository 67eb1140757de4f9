"""Every training option, declared once.

An :class:`Option` holds an option's name, kind, default, range or choices and help text.
From these declarations come the :class:`~.config.TrainConfig` fields and their validation,
the widgets of the Train LoRA and Training Options nodes (``nodes/spec.py``), the training
metadata written into saved files (:func:`training_metadata`) and the README's option table
(:func:`markdown_table`). Adding an option is its declaration here plus the code that uses it.

``TRAIN_NODE`` options are Train LoRA's own widgets (the node contract); ``OPTIONS_NODE``
options are the Training Options node's. Choices that come from a registry (optimizers,
losses, algorithms) are read from it, so a registry line adds the choice everywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import torch

from ..losses import LOSSES
from ..losses.objective import LOSS_WEIGHTINGS, TIMESTEP_SAMPLING, auto_text
from ..lora import ADAPTERS
from ..optimizers import OPTIMIZERS

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
LR_SCHEDULES = ("constant", "linear", "cosine")
TARGET_LAYERS = ("linear", "all", "attention", "attention_and_mlp")

# the algorithms whose default alpha is their rank (a delta scale of 1, PEFT's and diffusers'
# default), chosen with the sample-quality benchmark (README "How training works"); the
# others keep alpha 1
ALPHA_IS_RANK = ("LoRA", "DoRA")

TRAIN_NODE = "train"
OPTIONS_NODE = "options"


@dataclass(frozen=True)
class Option:
    name: str
    kind: str  # "INT", "FLOAT", "BOOLEAN", "COMBO", "STRING"
    default: object
    help: str
    node: str  # TRAIN_NODE or OPTIONS_NODE
    low: float | None = None
    high: float | None = None
    step: float | None = None
    choices: Callable[[], Iterable[str]] | None = None
    ui: dict = field(default_factory=dict)  # extra widget settings (e.g. control_after_generate)
    kohya: str | None = None  # the kohya ``ss_*`` metadata key with the same meaning
    text: str = "text"  # what a STRING option holds, for the README table

    def options(self) -> list[str]:
        return list(self.choices()) if self.choices is not None else []

    def check(self, value) -> None:
        """A ValueError naming the value, what is allowed and the fix."""
        name = self.name
        if self.kind == "COMBO":
            allowed = self.options()
            if value not in allowed:
                raise ValueError(
                    f"{name}={value!r} is not available; choose one of {', '.join(allowed)}.")
        elif self.kind == "BOOLEAN":
            if not isinstance(value, bool):
                raise ValueError(f"{name}={value!r} must be true or false.")
        elif self.kind == "STRING":
            if not isinstance(value, str):
                raise ValueError(f"{name}={value!r} must be text.")
        else:
            integer = self.kind == "INT"
            number = isinstance(value, int) if integer else isinstance(value, (int, float))
            if isinstance(value, bool) or not number or (not integer and not math.isfinite(value)):
                raise ValueError(
                    f"{name}={value!r} must be {'an integer' if integer else 'a number'}; "
                    f"use a value in {self.range_text()}.")
            if value < self.low or value > self.high:
                raise ValueError(f"{name}={value!r} is out of range; use a value in "
                                 f"{self.range_text()}.")

    def range_text(self) -> str:
        if self.kind == "INT":
            return f"{self.low:g}..{self.high:g}"
        return f"[{self.low:g}, {self.high:g}]"

    def widget(self) -> dict:
        """The ComfyUI widget settings (default, min/max/step or options, tooltip)."""
        settings: dict = {"default": self.default, "tooltip": self.help, **self.ui}
        if self.kind == "COMBO":
            settings["options"] = self.options()
        elif self.kind in ("INT", "FLOAT"):
            settings["min"], settings["max"] = self.low, self.high
            if self.step is not None:
                settings["step"] = self.step
        elif self.kind == "STRING":
            settings["multiline"] = False
        return settings


def _opt(name, kind, default, help, node=OPTIONS_NODE, **more) -> Option:
    return Option(name, kind, default, help, node, **more)


DECLARED: tuple[Option, ...] = (
    # -- Train LoRA's own widgets (the node contract; order is the node's) -----------------
    _opt("batch_size", "INT", 1, "Samples per micro-batch. Larger than the number of latents: "
         "all latents are used, with a warning. Every sample is trained with its own "
         "conditioning.", TRAIN_NODE, low=1, high=10000, kohya="ss_batch_size_per_device"),
    _opt("grad_accumulation_steps", "INT", 1, "Micro-batches per optimizer step; gradients are "
         "averaged over them, so an optimizer step sees batch_size x grad_accumulation_steps "
         "samples.", TRAIN_NODE, low=1, high=1024, kohya="ss_gradient_accumulation_steps"),
    _opt("steps", "INT", 16, "Optimizer steps to train for (not counting micro-batches).",
         TRAIN_NODE, low=1, high=100000),
    _opt("learning_rate", "FLOAT", 0.0005, "Learning rate of the optimizer (the peak of the "
         "schedule). Prodigy: a multiplier of its own estimate, usually 1.0; Adafactor: a cap "
         "on its relative step, about 0.1-1.0 for LoRA.", TRAIN_NODE, low=0.0000001,
         high=1.0, step=0.0000001, kohya="ss_learning_rate"),
    _opt("rank", "INT", 8, "Size of the adapters. LoRA, DoRA, LoHa, GLoRA: the inner "
         "dimension r; LoKr: the Kronecker factor; OFT, BOFT: the block size. A layer too small "
         "for it uses what it allows. Ignored when continuing an existing LoRA, which keeps its "
         "own.", TRAIN_NODE, low=1, high=128, kohya="ss_network_dim"),
    _opt("optimizer", "COMBO", "AdamW", "Optimizer, with its own default hyperparameters.",
         TRAIN_NODE, choices=lambda: OPTIMIZERS),
    _opt("loss_function", "COMBO", "MSE", "Loss between the model's prediction and its native "
         "target (noise for eps models, v for v-prediction, velocity noise - x0 for flow "
         "models).", TRAIN_NODE, choices=lambda: LOSSES),
    _opt("seed", "INT", 0, "Seed of the one generator behind LoRA init, batch order, noise and "
         "timesteps: the same inputs and seed give the same LoRA on CPU. The global RNG is left "
         "untouched.", TRAIN_NODE, low=0, high=2**64 - 1, ui={"control_after_generate": True},
         kohya="ss_seed"),
    _opt("training_dtype", "COMBO", "bf16", "bf16: run the model under bf16 autocast (faster, "
         "less memory). fp32: no autocast.", TRAIN_NODE, choices=lambda: DTYPES),
    _opt("lora_dtype", "COMBO", "bf16", "Dtype of the saved adapter weights and of the adapter "
         "in the forward pass. The optimizer always updates fp32 master weights, so small bf16 "
         "updates are not lost.", TRAIN_NODE, choices=lambda: DTYPES),
    _opt("algorithm", "COMBO", "LoRA", "The adapter algorithm to train: LoRA, LoHa, LoKr, OFT, "
         "BOFT, GLoRA or DoRA. When continuing an existing LoRA, the file's own algorithm is "
         "used, whatever this says.", TRAIN_NODE, choices=lambda: ADAPTERS),
    _opt("gradient_checkpointing", "BOOLEAN", True, "Recompute the model's blocks in backward "
         "instead of storing their activations: less memory, about one more forward of time "
         "per step.", TRAIN_NODE),
    # -- Training Options ----------------------------------------------------------------
    _opt("lr_schedule", "COMBO", "constant", "Learning rate over the run after the warm-up: "
         "constant; linear down to min_lr_ratio x learning_rate at the last step; cosine down "
         "to min_lr_ratio x learning_rate.", choices=lambda: LR_SCHEDULES,
         kohya="ss_lr_scheduler"),
    _opt("warmup_steps", "INT", 0, "Optimizer steps of linear warm-up from 0 to the learning "
         "rate (step k of the warm-up uses k / (warmup_steps + 1) of it). Must be shorter "
         "than the run.", low=0, high=100000, kohya="ss_lr_warmup_steps"),
    _opt("min_lr_ratio", "FLOAT", 0.0, "Where linear and cosine end, as a fraction of "
         "learning_rate.", low=0.0, high=1.0, step=0.01),
    _opt("max_grad_norm", "FLOAT", 0.0, "Clip the global gradient norm of the adapter "
         "parameters to this before each optimizer step; 0 = no clipping.", low=0.0,
         high=1000.0, step=0.01, kohya="ss_max_grad_norm"),
    _opt("weight_decay", "FLOAT", 0.01, "Weight decay of the optimizer, as each defines it "
         "(decoupled for AdamW, Lion, Prodigy, schedule-free and Adafactor; L2 for Adam, SGD, "
         "RMSprop).",
         low=0.0, high=10.0, step=0.001),
    _opt("ema_decay", "FLOAT", 0.0, "Keep an exponential moving average of the adapter weights "
         "(updated after every optimizer step) and return and save it instead of the last "
         "weights; 0 = off. 0.99-0.999 are usual. Not with AdamWScheduleFree, which "
         "averages already.", low=0.0, high=0.99999, step=0.0001),
    _opt("alpha", "FLOAT", 0.0, "The adapters' alpha (LoRA's delta is scaled by alpha / "
         f"rank); 0 = the default: the rank for {' and '.join(ALPHA_IS_RANK)} (scale 1), 1 "
         "for the other algorithms.", low=0.0, high=1024.0, step=0.5, kohya="ss_network_alpha"),
    _opt("rslora", "BOOLEAN", False, "Rank-stabilised scaling alpha / sqrt(rank) instead of "
         "alpha / rank (LoRA, LoHa, GLoRA, DoRA). The saved alpha is alpha x sqrt(rank), so "
         "ComfyUI's loader applies the same scale."),
    _opt("lora_plus_ratio", "FLOAT", 1.0, "LoRA+: the up matrices (B) learn at this multiple "
         "of the learning rate; 1 = off. 16 is the paper's suggestion. Not with Prodigy.", low=1.0, high=64.0,
         step=0.5),
    _opt("target_layers", "COMBO", "linear", "Which layers get adapters: linear = every Linear "
         "and 1x1 conv; all = also every larger conv (LoCon); attention = the attention "
         "layers; attention_and_mlp = attention and feed-forward layers.",
         choices=lambda: TARGET_LAYERS),
    _opt("include", "STRING", "", "Only layers whose name matches this regular expression "
         "(Python re.search on names like 'input_blocks.1.1.transformer_blocks.0.attn1.to_q'); "
         "empty = no filter.", text="regular expression"),
    _opt("exclude", "STRING", "", "Leave out layers whose name matches this regular "
         "expression; empty = none.", text="regular expression"),
    _opt("train_norm_bias", "BOOLEAN", False, "Also train a full delta of every normalisation "
         "weight and every bias (what ComfyUI's own trainer does), saved as diff / diff_b "
         "keys that ComfyUI's loader applies."),
    # -- the objective (losses/objective.py) ------------------------------------------------
    _opt("timestep_sampling", "COMBO", "auto", "How noise levels are drawn, as a fraction "
         "t of the model's own noise levels (its schedule and shift apply): auto = chosen per "
         f"model type by measured sample quality ({auto_text('timestep_sampling')}); uniform; "
         "logit_normal = sigmoid(timestep_mean + timestep_std x N(0, 1)), favouring the "
         "middle; mode = SD3's mode sampling with mode_scale. Saved files record the "
         "sampling used.",
         choices=lambda: TIMESTEP_SAMPLING),
    _opt("timestep_mean", "FLOAT", 0.0, "logit_normal: the mean m of the logit of t "
         "(negative: less noise, positive: more).", low=-5.0, high=5.0, step=0.05),
    _opt("timestep_std", "FLOAT", 1.0, "logit_normal: the standard deviation s of the logit "
         "of t (SD3: 1).", low=0.05, high=5.0, step=0.05),
    _opt("mode_scale", "FLOAT", 1.29, "mode: the scale s of t = 1 - u - s (cos^2(pi u / 2) - "
         "1 + u); 0 is uniform, positive favours the middle (SD3: 1.29).", low=-1.0,
         high=1.75, step=0.01),
    _opt("shift", "FLOAT", 0.0, "Flow models: train at the noise levels of this shift "
         "(t' = shift t / (1 + (shift - 1) t); SD3 uses 3) instead of the model's own; 0 = "
         "the model's own.", low=0.0, high=100.0, step=0.05),
    _opt("stratified", "BOOLEAN", False, "Stratify the noise levels of each optimizer step: "
         "its batch_size x grad_accumulation_steps draws take one from each equal slice of "
         "[0, 1) before the distribution is applied, so a step covers the noise range evenly."),
    _opt("loss_weighting", "COMBO", "auto", "Weight of each sample's loss by its noise level: "
         f"auto = chosen per model type by measured sample quality ({auto_text('loss_weighting')}"
         "); none = the model's native objective; min_snr = Min-SNR-gamma "
         "(with min_snr_gamma); x0 = the loss on the denoised image (what ComfyUI's own "
         "trainer optimises); sigma_sqrt and cosmap = SD3's weightings (flow models only). "
         "Saved files record the weighting used.", choices=lambda: LOSS_WEIGHTINGS),
    _opt("min_snr_gamma", "FLOAT", 5.0, "min_snr: the SNR cap gamma (the paper's 5).",
         low=0.01, high=100.0, step=0.1),
    _opt("noise_offset", "FLOAT", 0.0, "eps and v models: add this x a per-channel constant "
         "N(0, 1) to the noise, so the model learns to change an image's mean brightness "
         "(0.05-0.1 usual); 0 = off.", low=0.0, high=1.0, step=0.01, kohya="ss_noise_offset"),
    _opt("caption_dropout", "FLOAT", 0.0, "Probability that a sample trains with the "
         "empty_conditioning input instead of its own (the LoRA then also learns without "
         "its prompt); needs empty_conditioning when above 0.", low=0.0, high=1.0,
         step=0.01, kohya="ss_caption_dropout_rate"),
    # -- long runs: checkpoints, validation, previews ------------------------------------
    _opt("checkpoint_every", "INT", 0, "Every this many optimizer steps, save the LoRA into "
         "the loras folder as <checkpoint_prefix>_<steps>_steps_<counter>_.safetensors (Save "
         "LoRA's naming and metadata, never overwriting) with its training state beside it "
         "(<name>.training_state). Pick such a file in existing_lora to continue the run "
         "exactly. 0 = off.", low=0, high=100000),
    _opt("checkpoint_prefix", "STRING", "", "Name (and subfolder) of the checkpoints in the "
         "loras folder; empty = checkpoints/<model>_<algorithm>_r<rank>_seed<seed>.",
         text="path inside the loras folder"),
    _opt("keep_checkpoints", "INT", 0, "Keep only the newest this many checkpoints of this "
         "run (older ones it wrote are deleted; files it did not write never are); 0 = keep "
         "all.", low=0, high=10000),
    _opt("validation_every", "INT", 0, "Every this many optimizer steps (and at the end), "
         "compute a deterministic loss (fixed samples, noise and noise levels from their own "
         "generator) on the validation_latents / validation_conditioning inputs, or on the "
         "training latents without them; the loss output carries it as a 'validation' "
         "series. 0 = off.", low=0, high=100000),
    _opt("preview_every", "INT", 0, "Every this many optimizer steps (and at the end), sample "
         "one image per preview_conditioning with the LoRA as it is, decode it with the vae "
         "input, and show it while training runs; Train LoRA's previews output is the grid. "
         "Needs vae and preview_conditioning. 0 = off.", low=0, high=100000),
    _opt("preview_seed", "INT", 0, "Seed of the previews' noise (the same for every preview, "
         "so they differ only by what the LoRA learned).", low=0, high=2**64 - 1),
    _opt("preview_steps", "INT", 20, "Sampling steps of a preview (euler, simple schedule, "
         "cfg 1).", low=1, high=200),
)

BY_NAME: dict[str, Option] = {option.name: option for option in DECLARED}


def node_options(node: str) -> list[Option]:
    return [option for option in DECLARED if option.node == node]


def changed(values: Mapping[str, object]) -> dict[str, object]:
    """The values that differ from their option's default."""
    return {k: v for k, v in values.items() if k in BY_NAME and v != BY_NAME[k].default}


def training_metadata(config, *, steps: int, algorithm: str, rank: int, alpha: float,
                      batch_size: int, base_model: str, version: str) -> dict[str, str]:
    """What a saved file's header records about its training: ``lora_lab.<option>`` for every
    declared option (the values of this run), the facts of the result (``steps`` in total,
    the algorithm, rank and alpha actually used, the batch size after clamping), and
    ``lora_lab.base_model`` / ``lora_lab.version``. Kohya's ``ss_*`` keys are derived from
    these when the file is saved (``lora.io.lora_file_metadata``)."""
    meta = {f"lora_lab.{option.name}": getattr(config, option.name) for option in DECLARED}
    meta.update({
        "lora_lab.steps": steps, "lora_lab.algorithm": algorithm, "lora_lab.rank": rank,
        "lora_lab.alpha": alpha, "lora_lab.batch_size": batch_size,
        "lora_lab.base_model": base_model, "lora_lab.version": version,
    })
    return {k: str(v) for k, v in meta.items()}


def markdown_table(node: str) -> str:
    """The README table of ``node``'s options: name, default, range or choices, meaning."""
    rows = ["| option | default | values | meaning |", "|---|---|---|---|"]
    for option in node_options(node):
        if option.kind == "COMBO":
            values = ", ".join(option.options())
        elif option.kind in ("INT", "FLOAT"):
            values = option.range_text()
        else:
            values = "true / false" if option.kind == "BOOLEAN" else option.text
        default = repr(option.default) if option.kind == "STRING" else str(option.default)
        rows.append(f"| `{option.name}` | {default} | {values} | {option.help} |")
    return "\n".join(rows)
