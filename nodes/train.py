"""Train LoRA: validate and convert the UI values, call ``training.train``, wrap the result."""

from __future__ import annotations

import functools
import logging

import torch
from comfy_api.latest import io

import comfy.sd
import folder_paths

from ..lora.weights import LoraWeights
from ..training.config import DTYPES, TrainConfig
from ..training.loop import Validation, train
from ..training.options import OPTIONS_NODE, node_options
from .bridge import ComfyTask, check_latents_fit, training_clone
from .lora_keys import export_names
from .long_runs import CheckpointWriter, Previews, blank_image, continuation, run_metadata
from .options import SOCKETS
from .progress import LiveProgress
from .schema import build_schema
from .spec import NONE_LORA, TRAIN_LORA

log = logging.getLogger(__name__)

OPTIONS_FIELDS = {option.name for option in node_options(OPTIONS_NODE)}


def lora_files() -> list[str]:
    return folder_paths.get_filename_list("loras")


def load_existing(name: str, task: ComfyTask, lora_dtype: torch.dtype):
    """Continue the LoRA file ``name`` of the loras folder (:func:`.long_runs.continuation`):
    ``(adapters, previous steps, training state or None)``."""
    path = folder_paths.get_full_path("loras", name)
    if path is None:
        raise ValueError(
            f"existing_lora {name!r} is not in the loras folder; refresh the node and pick a "
            "listed file, or [None] for a new LoRA.")
    return continuation(path, task, lora_dtype)


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
        # the node takes lists (ComfyUI's dataset nodes give lists of LATENTs and
        # CONDITIONINGs): every other input comes as a one-element list
        model, batch_size, grad_accumulation_steps, steps, learning_rate, rank, optimizer, \
            loss_function, seed, training_dtype, lora_dtype, algorithm, \
            gradient_checkpointing, existing_lora, options, empty_conditioning = (
                single(value) for value in (
                    model, batch_size, grad_accumulation_steps, steps, learning_rate, rank,
                    optimizer, loss_function, seed, training_dtype, lora_dtype, algorithm,
                    gradient_checkpointing, existing_lora, options, empty_conditioning))
        values, inputs = options_values(options)
        config = TrainConfig(
            batch_size=batch_size, grad_accumulation_steps=grad_accumulation_steps, steps=steps,
            learning_rate=learning_rate, rank=rank, optimizer=optimizer,
            loss_function=loss_function, seed=seed, training_dtype=training_dtype,
            lora_dtype=lora_dtype, algorithm=algorithm,
            gradient_checkpointing=gradient_checkpointing, **values)
        samples, masks = latent_batches(latents)
        positive = per_sample_conditioning(positive, samples)
        check_latents_fit(model, samples)
        batch = min(config.batch_size, sum(len(b) for b in samples))
        writer = CheckpointWriter(model, config, batch) if config.checkpoint_every else None
        if writer is not None:
            writer.check()
        on_step = LiveProgress(steps)
        with torch.inference_mode(False):
            patcher = training_clone(model)
            task = ComfyTask(patcher, positive, samples, training_dtype, empty_conditioning)
            validation = validation_data(task, config, inputs)
            previews = None
            if config.preview_every:
                previews = Previews(task, inputs.get("vae"), inputs.get("preview_conditioning"),
                                    samples[0], config.preview_seed, config.preview_steps)
                on_step.previews = previews
            existing, previous_steps, state = None, 0, None
            if existing_lora != NONE_LORA:
                existing, previous_steps, state = load_existing(
                    existing_lora, task, DTYPES[config.lora_dtype])
            if writer is not None:  # a checkpoint's steps count from the file's first
                writer.steps_before = previous_steps - (state.step if state else 0)
            result = train(task, samples, config, masks=masks, existing=existing,
                           on_step=on_step, resume=state, validation=validation,
                           on_checkpoint=writer, on_preview=previews)
        total_steps = steps + previous_steps
        metadata = run_metadata(result.config, steps=total_steps, adapters=result.adapters,
                                batch_size=result.batch_size, model=model)
        lora = LoraWeights(result.lora, metadata, namer=functools.partial(export_names, model))
        trained, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0)
        loss = {"loss": result.losses}
        if result.validation:
            loss["validation"] = [[step, value] for step, value in result.validation]
        grid = previews.grid() if previews is not None else blank_image()
        return io.NodeOutput(trained, lora, loss, total_steps, grid)


def single(value):
    """One input's value: under ``is_input_list`` ComfyUI passes ``[value]``."""
    if isinstance(value, list) and not is_conditioning(value):
        if len(value) != 1:
            raise ValueError(f"got {len(value)} values where one is expected; connect a single "
                             "value (only latents and positive take lists).")
        return value[0]
    return value


def is_pair(entry) -> bool:
    return (isinstance(entry, (list, tuple)) and len(entry) == 2
            and isinstance(entry[0], torch.Tensor) and isinstance(entry[1], dict))


def is_conditioning(value) -> bool:
    """A CONDITIONING: a non-empty list of [tensor, dict] pairs."""
    return isinstance(value, (list, tuple)) and bool(value) and all(is_pair(e) for e in value)


def latent_batches(latents) -> tuple[list[torch.Tensor], list]:
    """A LATENT or a list of LATENTs as batches of samples and their noise masks."""
    items = latents if isinstance(latents, (list, tuple)) else [latents]
    if not items or not all(isinstance(item, dict) and isinstance(item.get("samples"),
                                                                  torch.Tensor) for item in items):
        raise ValueError(
            "latents must be a LATENT (a dict with a 'samples' tensor) or a list of them; "
            "connect VAE Encode, Load Latent, Load Image Dataset or ComfyUI's Make Training "
            "Dataset / Resolution Bucket.")
    return [item["samples"] for item in items], [item.get("noise_mask") for item in items]


def per_sample_conditioning(positive, batches: list[torch.Tensor]) -> list:
    """One conditioning entry per sample of ``batches``.

    ``positive`` is one CONDITIONING (one entry for all samples, or one per sample) or a list
    of them, one per LATENT of the latents list (each with one entry for all of that LATENT's
    samples, or one per sample), as ComfyUI's dataset nodes give them."""
    if is_conditioning(positive):
        return list(positive)  # one for all or one per sample: checked by the task
    if not (isinstance(positive, (list, tuple)) and positive
            and all(is_conditioning(c) for c in positive)):
        raise ValueError(
            "positive must be a CONDITIONING (a list of [tensor, dict] pairs) or a list of "
            "them; connect a CLIP Text Encode or ComfyUI's dataset nodes.")
    if len(positive) == 1:
        return list(positive[0])
    if len(positive) != len(batches):
        raise ValueError(
            f"positive is a list of {len(positive)} conditionings but latents a list of "
            f"{len(batches)} LATENTs; give one conditioning per LATENT (or one for all).")
    entries = []
    for index, (conditioning, batch) in enumerate(zip(positive, batches)):
        if len(conditioning) == 1:
            entries += [conditioning[0]] * batch.shape[0]
        elif len(conditioning) == batch.shape[0]:
            entries += list(conditioning)
        else:
            raise ValueError(
                f"positive[{index}] holds {len(conditioning)} conditionings for the "
                f"{batch.shape[0]} latents of latents[{index}]; give one for all or one per "
                "latent.")
    return entries


def validation_data(task: ComfyTask, config, inputs: dict) -> Validation | None:
    """The validation data of Training Options' inputs: held-out latents with their
    conditioning, or None (the loop then validates on the training latents)."""
    latents, conditioning = inputs.get("validation_latents"), inputs.get("validation_conditioning")
    if not config.validation_every or (latents is None and conditioning is None):
        return None
    if latents is None or conditioning is None:
        missing = "validation_conditioning" if conditioning is None else "validation_latents"
        raise ValueError(
            f"Validation data needs both validation_latents and validation_conditioning; "
            f"{missing} is not connected. Connect it, or disconnect both to validate on the "
            "training latents.")
    try:
        batches, masks = latent_batches(latents)
    except ValueError:
        raise ValueError("validation_latents must be a LATENT; connect VAE Encode or Load "
                         "Latent.") from None
    entries = per_sample_conditioning(conditioning, batches)
    return Validation(task.for_data(entries, batches), batches, masks)


def options_values(options) -> tuple[dict, dict]:
    """The option values and the data inputs (VAE, conditioning, latents) a LORALAB_OPTIONS
    socket carries (a dict; None: none)."""
    if options is None:
        return {}, {}
    if not isinstance(options, dict) or any(
            k not in OPTIONS_FIELDS and k not in SOCKETS for k in options):
        raise ValueError(
            "options must come from a Training Options node (LORALAB_OPTIONS); connect one or "
            "leave the input empty.")
    return ({k: v for k, v in options.items() if k in OPTIONS_FIELDS},
            {k: v for k, v in options.items() if k in SOCKETS})
