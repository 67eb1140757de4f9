"""Train LoRA: validate and convert the UI values, call ``training.train``, wrap the result."""

from __future__ import annotations

import logging
import os

import torch
from comfy_api.latest import io

import comfy.sd
import folder_paths

from .. import __version__
from ..lora.io import lora_from_state_dict, read_lora_file, steps_of
from ..lora.weights import LoraWeights
from ..training.config import DTYPES, TrainConfig
from ..training.loop import train
from ..training.options import OPTIONS_NODE, node_options, training_metadata
from .bridge import ComfyTask, check_latents_fit, training_clone
from .lora_keys import to_diffusion_model_keys
from .progress import LiveProgress
from .schema import build_schema
from .spec import NONE_LORA, TRAIN_LORA

log = logging.getLogger(__name__)

OPTIONS_FIELDS = {option.name for option in node_options(OPTIONS_NODE)}


def lora_files() -> list[str]:
    return folder_paths.get_filename_list("loras")


def load_existing(name: str, task: ComfyTask, lora_dtype: torch.dtype):
    """Adapters, norm/bias deltas and steps of the LoRA file ``name`` in the loras folder.

    kohya (``lora_unet_...``) and PEFT/diffusers (``lora_A``/``lora_B``) names are mapped to
    ``diffusion_model.<layer>`` through ComfyUI's own key map for the model."""
    path = folder_paths.get_full_path("loras", name)
    if path is None:
        raise ValueError(
            f"existing_lora {name!r} is not in the loras folder; refresh the node and pick a "
            "listed file, or [None] for a new LoRA.")
    tensors, metadata = read_lora_file(path)
    tensors = to_diffusion_model_keys(task.patcher, tensors)
    adapters, deltas = lora_from_state_dict(task.network, tensors, task.key_prefix, lora_dtype)
    return adapters, deltas, steps_of(metadata, os.path.basename(path))


class TrainLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        # the loras folder is listed each time the node list is built, so new files appear
        return build_schema(TRAIN_LORA, existing_lora={"options": [NONE_LORA] + lora_files()})

    @classmethod
    def execute(
        cls, model, latents, positive, batch_size, grad_accumulation_steps, steps,
        learning_rate, rank, optimizer, loss_function, seed, training_dtype, lora_dtype,
        algorithm, gradient_checkpointing, existing_lora, options=None, empty_conditioning=None,
    ) -> io.NodeOutput:
        config = TrainConfig(
            batch_size=batch_size, grad_accumulation_steps=grad_accumulation_steps, steps=steps,
            learning_rate=learning_rate, rank=rank, optimizer=optimizer,
            loss_function=loss_function, seed=seed, training_dtype=training_dtype,
            lora_dtype=lora_dtype, algorithm=algorithm,
            gradient_checkpointing=gradient_checkpointing, **options_values(options))
        if not isinstance(latents, dict) or not isinstance(latents.get("samples"), torch.Tensor):
            raise ValueError(
                "latents must be a LATENT (a dict with a 'samples' tensor); connect VAE Encode, "
                "Load Latent or Load Image Dataset.")
        samples = latents["samples"]
        check_latents_fit(model, samples)
        on_step = LiveProgress(steps)
        with torch.inference_mode(False):
            patcher = training_clone(model)
            task = ComfyTask(patcher, positive, samples, training_dtype, empty_conditioning)
            existing, deltas, previous_steps = None, None, 0
            if existing_lora != NONE_LORA:
                existing, deltas, previous_steps = load_existing(
                    existing_lora, task, DTYPES[config.lora_dtype])
            result = train(task, samples, config, existing=existing, existing_deltas=deltas,
                           on_step=on_step)
        total_steps = steps + previous_steps
        adapter = next(iter(result.adapters.values()))
        model_config = getattr(model.model, "model_config", None)
        metadata = training_metadata(
            result.config, steps=total_steps, algorithm=type(adapter).NAME,
            rank=getattr(adapter, "rank", config.rank),
            alpha=getattr(adapter, "alpha", config.adapter_alpha), batch_size=result.batch_size,
            base_model=type(model_config or model.model).__name__, version=__version__)
        lora = LoraWeights(result.lora, metadata)
        trained, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0)
        return io.NodeOutput(trained, lora, {"loss": result.losses}, total_steps)


def options_values(options) -> dict:
    """The option values a LORALAB_OPTIONS socket carries (a dict; None: none)."""
    if options is None:
        return {}
    if not isinstance(options, dict) or any(k not in OPTIONS_FIELDS for k in options):
        raise ValueError(
            "options must come from a Training Options node (LORALAB_OPTIONS); connect one or "
            "leave the input empty.")
    return dict(options)
